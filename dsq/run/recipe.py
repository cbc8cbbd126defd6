"""Recipes: one YAML file is one run.

The schema is strict: every key maps to a typed field and an unknown or mistyped key fails
with the key's dotted path, the file and the allowed keys. Values are not coerced (``"4"`` is
not 4), NaN and infinities are refused, and every number, name and path has a range, so a
recipe that loads is one that can run. Command-line overrides (``quantize.weights.bits=4``) are
dotted paths into the same tree, applied before validation so they get exactly the same checks.

The YAML itself is read with a loader that refuses duplicate keys (naming the line), deep
nesting and alias expansion beyond small limits; every message is cut to a few lines.

Example:
    >>> recipe = load_recipe("recipes/demo.yaml", overrides=["quantize.weights.bits=4"])
    >>> recipe.quantize.weights.bits
    4
"""
from __future__ import annotations

import re
import reprlib
import stat
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from dsq.core.errors import RecipeError

SEED_MAX = 2**32 - 1  # numpy, torch and random all take a seed in [0, 2**32 - 1]
MAX_SEQUENCE = 1 << 20  # longest token sequence any setting may ask for
MAX_TOKEN_BUDGET = 1 << 32  # largest token budget (tokens read from a data set)
MAX_COUNT = 1 << 30  # largest step, sample or item count
MAX_WIDTH = 1 << 16  # largest group, block, batch or rank size
BNB_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' 4-bit kernels accept

MAX_RECIPE_BYTES = 1 << 20  # a recipe is a few kilobytes; this refuses a wrong file early
MAX_YAML_DEPTH = 32  # recipes nest 4 levels deep
MAX_YAML_ALIASES = 100  # aliases (``*name``) per document
MAX_YAML_NODES = 10_000  # nodes after aliases are expanded (a "billion laughs" document has 10**9)
MAX_ERRORS_SHOWN = 5  # validation errors listed in one message
MAX_MESSAGE_CHARS = 3000  # an error message never exceeds this, whatever the input


def _short(value: Any) -> str:
    """``repr(value)`` cut to a few dozen characters, whatever its size or depth."""
    short = reprlib.Repr()
    short.maxlevel, short.maxdict, short.maxlist, short.maxtuple, short.maxset = 2, 4, 4, 4, 4
    short.maxstring, short.maxother, short.maxlong = 80, 80, 40
    return short.repr(value)


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    if "\x00" in value:
        raise ValueError("must not contain a NUL character")
    return value


def _compiles(pattern: str) -> str:
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise ValueError(f"invalid module pattern {_short(pattern)}: {exc}") from None
    return pattern


Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]
PathText = Annotated[str, Field(max_length=4096), AfterValidator(_not_blank)]  # a file or directory path
Name = Annotated[str, Field(max_length=256), AfterValidator(_not_blank)]  # a column, split or data set name
Pattern = Annotated[str, Field(max_length=1000), AfterValidator(_compiles)]  # a module-name regular expression


class Strict(BaseModel):
    """Base of every section: unknown keys, coerced types (``"4"`` for 4, ``1.0`` for 1) and NaN/inf are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, strict=True, allow_inf_nan=False)


class WeightsSection(Strict):
    """Integer weight format."""

    bits: Literal[4, 8] = 8
    granularity: Literal["channel", "group"] = "group"
    group_size: int = Field(128, ge=2, le=MAX_WIDTH)
    symmetric: bool = True


class TargetsSection(Strict):
    """Which modules are quantized (regular expressions searched in module names)."""

    include: list[Pattern] = Field(default_factory=lambda: [".*"], min_length=1)
    exclude: list[Pattern] = Field(default_factory=list)
    lm_head: bool = False


class CalibrationSection(Strict):
    """Calibration data for gptq / awq / w8a8 (read through ``datasets``)."""

    data: PathText | None = None  # .txt / .jsonl / .json / .parquet file or a save_to_disk dir; None: bundled sample
    dataset: Name | None = None  # hub dataset name, only when data is None and the machine is online
    split: Name = "train"
    text_field: Name = "text"
    messages_field: Name | None = None  # chat messages rendered with the tokenizer's chat template
    samples: int = Field(128, ge=1, le=MAX_COUNT)
    seq_len: int = Field(256, ge=2, le=MAX_SEQUENCE)
    seed: Seed = 0
    batch_size: int = Field(8, ge=1, le=MAX_WIDTH)


class GPTQSection(Strict):
    damp: float = Field(0.01, gt=0, lt=1)  # lambda = damp * mean(diag H)
    block_size: int = Field(128, ge=1, le=MAX_WIDTH)
    act_order: bool = True  # columns by decreasing diag(H); groups stay in place (static groups)
    mse_scales: bool = True  # each group's range from a shrink search instead of min/max
    unrouted_weight: float = Field(0.1, ge=0, le=1)  # weight of tokens not routed to an expert in its Hessian


class AWQSection(Strict):
    grid: int = Field(20, ge=1, le=1000)  # scale exponents tried
    clip: bool = False  # output-aware clipping search per group (raised perplexity on the bundled model)
    mse_scales: bool = True  # each group's range from a shrink search instead of min/max
    duo_scaling: bool = False  # candidates mean|x|^r / mean|w|^(1-r)
    search_tokens: int = Field(4096, ge=1, le=MAX_TOKEN_BUDGET)
    unrouted_weight: float = Field(1.0, ge=0, le=1)


class W8A8Section(Strict):
    activations: Literal["dynamic", "static"] = "dynamic"  # per-token at run time, or per-tensor from calibration
    smoothquant_alpha: float | None = Field(0.5, ge=0, le=1)  # None: no smoothing


class BnbSection(Strict):
    blocksize: Literal[BNB_BLOCKSIZES] = 64  # weights per absmax block (4-bit methods)
    double_quant: bool = False
    threshold: float = Field(6.0, gt=0)  # bnb-int8 outlier threshold


# which optional sections each method reads; any other explicitly written section is an error
OPTIONAL_SECTIONS = frozenset({"weights", "calibration", "gptq", "awq", "w8a8", "bnb"})
METHOD_SECTIONS = {
    "rtn": {"weights"},
    "gptq": {"weights", "calibration", "gptq"},
    "awq": {"weights", "calibration", "awq"},
    "w8a8": {"calibration", "w8a8"},
    "bnb-nf4": {"bnb"},
    "bnb-fp4": {"bnb"},
    "bnb-int8": {"bnb"},
}
_DEVICE = re.compile(r"(cpu|cuda)(:[0-9]{1,4})?")


class QuantizeSection(Strict):
    method: Literal["rtn", "gptq", "awq", "w8a8", "bnb-nf4", "bnb-fp4", "bnb-int8"] = "rtn"
    weights: WeightsSection = WeightsSection()
    targets: TargetsSection = TargetsSection()
    calibration: CalibrationSection = CalibrationSection()
    gptq: GPTQSection = GPTQSection()
    awq: AWQSection = AWQSection()
    w8a8: W8A8Section = W8A8Section()
    bnb: BnbSection = BnbSection()
    device: str | None = None  # e.g. "cuda": each decoder layer is moved there to be calibrated and quantized; the rest stays on CPU

    @field_validator("device")
    @classmethod
    def _device_parses(cls, v: str | None) -> str | None:
        if v is not None and _DEVICE.fullmatch(v) is None:
            raise ValueError("a device is 'cpu', 'cuda' or 'cuda:N'")
        return v


class TrainDataSection(Strict):
    """Fine-tuning data (read through ``datasets``); ``bundled:NAME`` names a file shipped with dsq."""

    train: PathText = "bundled:calibration.txt"  # .txt / .jsonl / .json / .parquet file or a save_to_disk dir
    validation: PathText | None = None  # None: hold out val_fraction of the train documents
    split: Name = "train"
    text_field: Name = "text"
    prompt_field: Name | None = None  # with response_field: instruction data, prompts not scored
    response_field: Name | None = None
    messages_field: Name | None = None  # chat messages rendered with the tokenizer's chat template
    seq_len: int = Field(256, ge=2, le=MAX_SEQUENCE)
    val_fraction: float = Field(0.1, ge=0, lt=1)
    pack: bool = True
    seed: Seed = 0


class TrainingSection(Strict):
    """The training loop (accelerate): one optimizer step = batch_size x grad_accum x processes blocks."""

    max_steps: int = Field(200, ge=1, le=MAX_COUNT)
    batch_size: int = Field(8, ge=1, le=MAX_WIDTH)
    grad_accum: int = Field(1, ge=1, le=MAX_WIDTH)
    lr: float = Field(1e-4, gt=0, le=1)
    warmup_steps: int = Field(20, ge=0, le=MAX_COUNT)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    mixed_precision: Literal["no", "bf16"] = "no"
    eval_every: int = Field(50, ge=0, le=MAX_COUNT)
    save_every: int = Field(50, ge=0, le=MAX_COUNT)
    keep_checkpoints: int = Field(2, ge=1, le=1000)
    checkpoint_dir: PathText | None = None  # None: <output>.checkpoints
    resume: bool = True  # continue from the last complete checkpoint there
    seed: Seed = 0
    fsdp: bool = False  # several processes: shard parameters, gradients and AdamW state (FSDP2) instead of DDP


class QATSection(Strict):
    """Quantization-aware training to the ``quantize:`` section's format (method rtn, gptq or awq)."""

    learnable_scales: bool = False  # LSQ-style trained per-group scales
    mse_init: bool = False  # learnable scales start from the |w - Q(w)|^2.4 range search instead of min/max
    distill_weight: float = Field(1.0, ge=0, le=1)  # share of KL(original || student) in the loss


class LoraSection(Strict):
    """LoRA through peft on the FP base (no ``quantize:``) or the quantized base (QLoRA)."""

    r: int = Field(8, ge=1, le=MAX_WIDTH)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: list[Pattern] | None = Field(None, min_length=1)  # module-name regexes; None: MLA projections, dense and shared-expert MLPs
    routed_experts: bool = False  # also adapt the fused routed experts (FP base only)
    merge: bool = True  # merge into the base (re-quantized with the same scheme on a quantized base)


class FinetuneSection(Strict):
    """QAT or LoRA (exactly one of ``qat:`` / ``lora:``)."""

    data: TrainDataSection = TrainDataSection()
    training: TrainingSection = TrainingSection()
    qat: QATSection | None = None
    lora: LoraSection | None = None


class PerplexitySection(Strict):
    data: PathText | None = None  # text / JSONL / parquet file; None: bundled held-out split
    context: int = Field(256, ge=2, le=MAX_SEQUENCE)
    stride: int = Field(128, ge=1, le=MAX_SEQUENCE)
    max_tokens: int | None = Field(None, ge=2, le=MAX_TOKEN_BUDGET)


class MultipleChoiceSection(Strict):
    data: PathText | None = None  # JSONL {context, choices, gold}; None: bundled set
    limit: int | None = Field(None, ge=1, le=MAX_COUNT)
    num_fewshot: int = Field(0, ge=0, le=1000)  # solved exemplars (context + gold choice) before each item's context
    fewshot_seed: Seed = 1234  # item i draws its exemplars with random.Random(f"{fewshot_seed}-{i}")
    fewshot_data: PathText | None = None  # JSONL of the same form to draw from; None: the data file, the item itself left out
    fewshot_delimiter: str = Field("\n\n", max_length=1000)  # after every exemplar (lm-evaluation-harness's fewshot_delimiter)


class FidelitySection(Strict):
    seq_len: int = Field(128, ge=2, le=MAX_SEQUENCE)
    max_tokens: int = Field(4096, ge=2, le=MAX_TOKEN_BUDGET)


def _gate(needs: str | None, **bounds: float) -> Any:
    """A gate threshold: ``None`` (unchecked) or a finite number within ``bounds``.

    ``needs`` names the ``eval`` section whose measurement the gate reads (``None``: always measured).
    """
    return Field(None, json_schema_extra={"needs": needs}, **bounds)


class GatesSection(Strict):
    """Thresholds; a run whose artifact misses one exits 1 naming the metric.

    The one definition of the gates, their ranges and what each needs measured: recipes, the gates
    file of ``dsq validate`` and :class:`dsq.eval.Gates` all validate through it.
    """

    max_ppl_increase_pct: float | None = _gate("perplexity", gt=-100)  # % over the original (negative: must improve)
    max_ppl: float | None = _gate("perplexity", ge=1)  # a perplexity is at least 1
    min_mc_acc: float | None = _gate("multiple_choice", ge=0, le=1)  # fraction
    max_mc_acc_drop_pts: float | None = _gate("multiple_choice", ge=-100, le=100)  # percentage points
    min_top1_agreement: float | None = _gate("perplexity", ge=0, le=1)  # fraction; fidelity reads the held-out text
    max_mean_kl: float | None = _gate("perplexity", ge=0)  # nats
    max_size_ratio: float | None = _gate(None, gt=0)  # weight bytes on disk, candidate / original
    min_mc_recovery_pct: float | None = _gate("multiple_choice", gt=0)  # candidate accuracy in % of the original's
    min_prefill_speed_ratio: float | None = _gate("speed", gt=0)  # tokens/s, candidate / original
    min_decode_speed_ratio: float | None = _gate("speed", gt=0)

    @classmethod
    def needs(cls, gate: str) -> str | None:
        """The ``eval`` section (``perplexity``, ``multiple_choice``, ``speed``) gate ``gate`` reads, or ``None``."""
        extra = cls.model_fields[gate].json_schema_extra
        return extra.get("needs") if isinstance(extra, dict) else None


class SpeedSection(Strict):
    """Prefill and decode tokens/s with a KV cache (torch and ONNX Runtime rows alike)."""

    batch: int = Field(1, ge=1, le=MAX_WIDTH)
    prompt_len: int = Field(128, ge=1, le=MAX_SEQUENCE)
    new_tokens: int = Field(32, ge=1, le=MAX_SEQUENCE)
    repeats: int = Field(3, ge=1, le=1000)


class EvalSection(Strict):
    perplexity: PerplexitySection | None = PerplexitySection()
    multiple_choice: MultipleChoiceSection | None = MultipleChoiceSection()
    fidelity: FidelitySection = FidelitySection()
    speed: SpeedSection | None = None
    gates: GatesSection = GatesSection()
    reload_check: bool = True  # reload the artifact with transformers and compare logits


class ExportValidationSection(Strict):
    """Shapes of the ONNX Runtime vs PyTorch check run inside every export."""

    batch_sizes: list[Annotated[int, Field(ge=1, le=MAX_WIDTH)]] = Field(default_factory=lambda: [1, 3], min_length=1, max_length=64)
    seq_lens: list[Annotated[int, Field(ge=1, le=MAX_SEQUENCE)]] = Field(default_factory=lambda: [1, 17, 64], min_length=1, max_length=64)
    decode_steps: int = Field(8, ge=1, le=MAX_SEQUENCE)
    greedy_tokens: int = Field(32, ge=1, le=MAX_SEQUENCE)
    tolerance: float | None = Field(None, gt=0)  # None: 1e-4 fp, 1e-3 weight-only, 0.25 int8 activations


class ExportSection(Strict):
    """ONNX export of the artifact to ``<output>/onnx``, validated against PyTorch; a mismatch fails the run."""

    accuracy_level: Literal[0, 1, 2, 3, 4] = 0  # MatMulNBits compute: 0/1 fp32, 4 int8 activations
    weight_op: Literal["matmul_nbits", "dequantize_linear"] = "matmul_nbits"  # ORT contrib op | standard opset 21
    quantize_embeddings: bool = False  # input embedding stored int8, one scale per row
    evaluate: bool = True  # run the benchmark suite on the ONNX model too (an "-onnx" report row)
    threads: int | None = Field(None, ge=1, le=4096)  # ONNX Runtime intra-op threads (None: its default)
    validation: ExportValidationSection = ExportValidationSection()


class Recipe(Strict):
    """A whole run: model in, quantized artifact and report out."""

    model: PathText | None = None  # local HF directory; None: the bundled tiny DeepSeek-V3
    trust_remote_code: bool = False
    dtype: Literal["float32", "bfloat16"] = "float32"
    output: PathText = "runs/out"
    overwrite: bool = False
    seed: Seed = 0
    progress: bool = True
    streaming: bool | None = None  # one decoder layer in memory at a time; None: when the model exceeds half the free memory
    max_shard_mb: int = Field(4096, ge=1, le=1 << 20)  # artifact weight shards of at most this size (1 MiB .. 1 TiB)
    quantize: QuantizeSection | None = QuantizeSection()  # null: no quantization (LoRA on the FP base)
    finetune: FinetuneSection | None = None
    export: ExportSection | None = None  # ONNX decoder with KV cache (dsq formats only)
    eval: EvalSection = EvalSection()


def _allowed_keys(root: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the section at ``loc`` (the parent of the offending key), walking down from ``root``."""
    model = root
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            break
        annotation = field.annotation
        candidates = [a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type)]
        sub = next((a for a in candidates if issubclass(a, BaseModel)), None)
        if sub is None:
            break
        model = sub
    return sorted(model.model_fields)


def _key_path(loc: tuple) -> str:
    """``('quantize', 'weights', 'bits')`` -> ``quantize.weights.bits`` (each part cut to 80 characters)."""
    parts = [str(p) if len(str(p)) <= 80 else str(p)[:77] + "..." for p in loc]
    return ".".join(parts) or "(top level)"


def format_errors(exc: ValidationError, source: str, root: type[BaseModel] | None = None) -> str:
    """One line per validation error: the dotted key path, ``source``, what is wrong and what was given.

    Args:
        exc: The pydantic error.
        source: The file (and overrides) the values came from.
        root: The model validated (default :class:`Recipe`): unknown keys list the keys allowed at their place.

    Returns:
        At most ``MAX_ERRORS_SHOWN`` lines, each with the given value cut short; at most
        ``MAX_MESSAGE_CHARS`` characters in all.
    """
    root = root or Recipe
    errors = exc.errors()
    lines = []
    for err in errors[:MAX_ERRORS_SHOWN]:
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        path = _key_path(loc)
        if err["type"] == "extra_forbidden":
            allowed = ", ".join(_allowed_keys(root, loc[:-1]))
            lines.append(f"unknown key '{path}' in {source}; allowed keys here: {allowed}")
        else:
            message = err["msg"].removeprefix("Value error, ")
            lines.append(f"invalid value for '{path}' in {source}: {message} (got {_short(err.get('input'))})")
    if len(errors) > MAX_ERRORS_SHOWN:
        lines.append(f"... and {len(errors) - MAX_ERRORS_SHOWN} more errors in {source}")
    return _cut("\n".join(lines), MAX_MESSAGE_CHARS)


_format_errors = format_errors  # the name dsq.run.validate imports


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing what a recipe never needs and a hostile file uses.

    Duplicate keys (YAML keeps the last one silently), nesting deeper than ``MAX_YAML_DEPTH``, more
    than ``MAX_YAML_ALIASES`` aliases, and aliases that expand to more than ``MAX_YAML_NODES`` nodes
    or refer to themselves are :class:`RecipeError` naming ``source`` and the line.
    """

    def __init__(self, text: str, source: str) -> None:
        super().__init__(text)
        self.source = source
        self.depth = 0
        self.aliases = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_YAML_ALIASES:
                line = self.peek_event().start_mark.line + 1
                raise RecipeError(f"{self.source}, line {line}: more than {MAX_YAML_ALIASES} YAML aliases (*name); a recipe needs few")
            return super().compose_node(parent, index)
        self.depth += 1
        try:
            if self.depth > MAX_YAML_DEPTH:
                line = self.peek_event().start_mark.line + 1
                raise RecipeError(f"{self.source}, line {line}: nested more than {MAX_YAML_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` keys may be overridden: that is what merging is for
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                seen = key in first_line
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if seen:
                raise RecipeError(
                    f"{self.source}, line {line}: duplicate key {_short(key)} (first at line {first_line[key]}); "
                    "YAML would silently keep only the last value"
                )
            first_line[key] = line
        return super().construct_mapping(node, deep=deep)


# YAML 1.2 floats without a dot (``1e-4``, ``3E+2``): PyYAML (YAML 1.1) reads them as strings
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def _check_expansion(root: yaml.Node, source: str) -> None:
    """Refuse aliases that expand to more than ``MAX_YAML_NODES`` nodes or contain themselves.

    Sizes are counted once per node (aliases share nodes), so a "billion laughs" document is
    refused in microseconds instead of being expanded.
    """
    size: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        children = _children(node)
        if finished:
            on_path.discard(id(node))
            size[id(node)] = 1 + sum(size[id(child)] for child in children)
            if size[id(node)] > MAX_YAML_NODES:
                raise RecipeError(
                    f"{source}, line {node.start_mark.line + 1}: its aliases expand to more than "
                    f"{MAX_YAML_NODES} values; a recipe has a few hundred"
                )
            continue
        if id(node) in size:
            continue
        if id(node) in on_path:
            raise RecipeError(f"{source}, line {node.start_mark.line + 1}: an alias refers to the value that contains it")
        on_path.add(id(node))
        stack.append((node, True))
        stack.extend((child, False) for child in children if id(child) not in size)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def parse_yaml(text: str, source: str) -> Any:
    """Parse one YAML document with the recipe loader (duplicate keys, aliases and depth checked).

    Args:
        text: The document.
        source: Where it comes from, for messages.

    Returns:
        The parsed value (``None`` for an empty document).

    Raises:
        RecipeError: Invalid YAML, a duplicate key, or a document nested or aliased beyond the limits.
    """
    try:
        loader = _RecipeLoader(text, source)  # refuses control characters at once
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            _check_expansion(node, source)
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise RecipeError(f"{source} is not valid YAML: {_cut(str(exc), 1000)}") from None


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], yaml-parsed value).

    Raises:
        RecipeError: No ``=``, an empty key, or a value that is not valid YAML.
    """
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"command-line override {_short(text)} must look like key.path=value")
    if not raw.strip():  # e.g. an unset shell variable: never silently null
        raise RecipeError(f"command-line override {_short(text)} has no value; write {_cut(key.strip(), 100)}=null for null")
    return key.strip().split("."), parse_yaml(raw, f"command-line override {_short(text)}")


def apply_override(tree: dict, path: list[str], value: Any, text: str) -> None:
    """Set ``value`` at ``path`` in ``tree``, creating missing sections.

    Raises:
        RecipeError: A part of the path is a value, not a section.
    """
    node = tree
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise RecipeError(f"command-line override {_short(text)}: '{_key_path(tuple(path[: i + 1]))}' is not a section")
        node = child
    node[path[-1]] = value


def _read_text(path: Path, what: str) -> str:
    """The UTF-8 text of a regular file of at most ``MAX_RECIPE_BYTES``.

    Raises:
        RecipeError: Missing, a directory or other non-file, too large, unreadable or not UTF-8.
    """
    try:
        info = path.stat()
    except FileNotFoundError:
        raise RecipeError(f"{what} not found: {path}") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
        raise RecipeError(f"cannot read {what} {_short(str(path))}: {exc}") from None
    if stat.S_ISDIR(info.st_mode):
        raise RecipeError(f"{what} {path} is a directory, not a YAML file")
    if not stat.S_ISREG(info.st_mode):
        raise RecipeError(f"{what} {path} is not a regular file")
    if info.st_size > MAX_RECIPE_BYTES:
        raise RecipeError(f"{what} {path} has {info.st_size} bytes; a recipe is at most {MAX_RECIPE_BYTES} bytes")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RecipeError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise RecipeError(f"{what} {path} is not UTF-8 text: byte 0x{data[exc.start]:02x} on line {line}") from None


def read_yaml(path: Path, what: str = "recipe file") -> dict:
    """Read a YAML mapping (a recipe, or a gates file) with every check of :func:`parse_yaml`.

    Args:
        path: The file.
        what: What the file is, for messages.

    Returns:
        The mapping (``{}`` for an empty file).

    Raises:
        RecipeError: Naming the file: unreadable, not UTF-8, not YAML, a duplicate key, not a mapping.
    """
    path = Path(path)
    data = parse_yaml(_read_text(path, what), str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a {what} must hold a mapping of keys, got {type(data).__name__}")
    return data


def load_recipe(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe.

    Args:
        path: the YAML file (None: all defaults).
        overrides: ``key.path=value`` strings from the command line.

    Returns:
        The validated :class:`Recipe`.

    Raises:
        RecipeError: naming the key path, the file and the allowed keys (or the line, for YAML errors).
    """
    source = str(path) if path is not None else "(defaults)"
    tree = read_yaml(Path(path)) if path is not None else {}
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(tree, keys, value, text)
    if overrides:
        source += " (with command-line overrides: " + _cut(" ".join(overrides), 200) + ")"
    try:
        recipe = Recipe.model_validate(tree)
    except ValidationError as exc:
        raise RecipeError(format_errors(exc, source)) from None
    if recipe.quantize is not None:
        _check_method_sections(recipe.quantize, source)
    _check_finetune(recipe, source)
    _check_export(recipe, source)
    check_eval_section(recipe.eval, source)
    return recipe


def check_eval_section(section: EvalSection, source: str, prefix: str = "eval.") -> None:
    """Checks across the fields of an ``eval`` section, run before any model is loaded.

    Args:
        section: The validated section.
        source: The file it came from.
        prefix: Key path of the section in that file (``"eval."`` in a recipe, ``""`` in a gates file).

    Raises:
        RecipeError: A perplexity stride longer than its context, or a gate whose metric the
            section does not measure (e.g. a speed gate without ``speed``), naming the gate.
    """
    ppl = section.perplexity
    if ppl is not None and ppl.stride > ppl.context:
        raise RecipeError(
            f"invalid value for '{prefix}perplexity.stride' in {source}: stride {ppl.stride} exceeds context {ppl.context}"
        )
    for gate in GatesSection.model_fields:
        needs = GatesSection.needs(gate)
        if needs is not None and getattr(section.gates, gate) is not None and getattr(section, needs) is None:
            raise RecipeError(
                f"gate '{prefix}gates.{gate}' in {source} needs '{prefix}{needs}' to be measured, but that section "
                f"is {'null' if needs in section.model_fields_set else 'not set'}; set it or remove the gate"
            )


def _check_method_sections(section: QuantizeSection, source: str) -> None:
    """A section written for another method is a mistake worth an error (e.g. ``gptq:`` with ``method: awq``)."""
    allowed = METHOD_SECTIONS[section.method]
    stray = sorted((section.model_fields_set & OPTIONAL_SECTIONS) - allowed)
    if stray:
        raise RecipeError(
            f"'quantize.{stray[0]}' in {source} is not used by quantize.method '{section.method}' "
            f"(that method reads: {', '.join(sorted(allowed)) or 'no extra section'})"
        )


QAT_METHODS = ("rtn", "gptq", "awq")  # dsq's weight-only formats: QAT starts from FP (rtn) or the PTQ result
LORA_BASES = ("rtn", "gptq", "awq", "bnb-nf4", "bnb-fp4")


def _check_finetune(recipe: Recipe, source: str) -> None:
    ft = recipe.finetune
    if ft is None:
        if recipe.quantize is None:
            raise RecipeError(f"{source}: 'quantize' is null and there is no 'finetune' section: nothing to do")
        return
    if (ft.qat is None) == (ft.lora is None):
        raise RecipeError(f"'finetune' in {source} needs exactly one of 'finetune.qat' and 'finetune.lora'")
    method = recipe.quantize.method if recipe.quantize is not None else None
    if ft.qat is not None and method not in QAT_METHODS:
        raise RecipeError(
            f"'finetune.qat' in {source} trains towards the 'quantize' section's format: quantize.method must be one of "
            f"{', '.join(QAT_METHODS)} (rtn: from the FP base; gptq/awq: from that PTQ result), got {method!r}"
        )
    if ft.lora is not None and method is not None and method not in LORA_BASES:
        raise RecipeError(
            f"'finetune.lora' in {source}: LoRA runs on the FP base (quantize: null) or a quantized base made by one of "
            f"{', '.join(LORA_BASES)}, not quantize.method {method!r}"
        )
    if ft.lora is not None and ft.lora.routed_experts and method is not None:
        raise RecipeError(f"'finetune.lora.routed_experts' in {source} needs the FP base (quantize: null)")
    d = ft.data
    if (d.prompt_field is None) != (d.response_field is None):
        raise RecipeError(f"'finetune.data' in {source}: prompt_field and response_field go together")
    if d.messages_field is not None and d.prompt_field is not None:
        raise RecipeError(f"'finetune.data' in {source}: use messages_field or prompt_field/response_field, not both")


EXPORT_METHODS = ("rtn", "gptq", "awq", "w8a8")  # formats with an ONNX form (bitsandbytes layers have none)


def _check_export(recipe: Recipe, source: str) -> None:
    if recipe.export is None:
        return
    method = recipe.quantize.method if recipe.quantize is not None else None
    if method is not None and method not in EXPORT_METHODS:
        raise RecipeError(
            f"'export' in {source}: quantize.method {method!r} has no ONNX form; export works for "
            f"{', '.join(EXPORT_METHODS)}"
        )
    if recipe.finetune is not None and recipe.finetune.lora is not None:
        raise RecipeError(
            f"'export' in {source}: a LoRA run's artifact is an adapter; merge it and export the merged model "
            "with `dsq export`, or drop the 'export' section"
        )


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML (every default filled in; only the sections its method reads)."""
    tree = recipe.model_dump(mode="json")
    if recipe.quantize is not None:
        for key in OPTIONAL_SECTIONS - METHOD_SECTIONS[recipe.quantize.method]:
            tree["quantize"].pop(key, None)
    if recipe.finetune is None:
        tree.pop("finetune")
    if recipe.export is None:
        tree.pop("export")
    return yaml.safe_dump(tree, sort_keys=False)
