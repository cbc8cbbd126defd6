"""Recipes: one YAML file is one run.

The schema is strict: every key maps to a typed field and an unknown or mistyped key fails
with the key's dotted path, the file and the allowed keys. Command-line overrides
(``quantize.weights.bits=4``) are dotted paths into the same tree, applied before validation
so they get exactly the same checks.

Example:
    >>> recipe = load_recipe("recipes/demo.yaml", overrides=["quantize.weights.bits=4"])
    >>> recipe.quantize.weights.bits
    4
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import RecipeError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class WeightsSection(Strict):
    """Integer weight format."""

    bits: Literal[4, 8] = 8
    granularity: Literal["channel", "group"] = "group"
    group_size: int = Field(128, ge=2)
    symmetric: bool = True


class TargetsSection(Strict):
    """Which modules are quantized (regular expressions searched in module names)."""

    include: list[str] = Field(default_factory=lambda: [".*"])
    exclude: list[str] = Field(default_factory=list)
    lm_head: bool = False

    @field_validator("include", "exclude")
    @classmethod
    def _patterns_compile(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"invalid module pattern {pattern!r}: {exc}") from exc
        return patterns


class CalibrationSection(Strict):
    """Calibration data for gptq / awq / w8a8 (read through ``datasets``)."""

    data: str | None = None  # .txt / .jsonl / .json / .parquet file or a save_to_disk dir; None: bundled sample
    dataset: str | None = None  # hub dataset name, only when data is None and the machine is online
    split: str = "train"
    text_field: str = "text"
    messages_field: str | None = None  # chat messages rendered with the tokenizer's chat template
    samples: int = Field(128, ge=1)
    seq_len: int = Field(256, ge=2)
    seed: int = 0
    batch_size: int = Field(8, ge=1)


class GPTQSection(Strict):
    damp: float = Field(0.01, gt=0, lt=1)  # lambda = damp * mean(diag H)
    block_size: int = Field(128, ge=1)
    act_order: bool = True  # columns by decreasing diag(H); groups stay in place (static groups)
    mse_scales: bool = True  # each group's range from a shrink search instead of min/max
    unrouted_weight: float = Field(0.1, ge=0, le=1)  # weight of tokens not routed to an expert in its Hessian


class AWQSection(Strict):
    grid: int = Field(20, ge=1)  # scale exponents tried
    clip: bool = False  # output-aware clipping search per group (raised perplexity on the bundled model)
    mse_scales: bool = True  # each group's range from a shrink search instead of min/max
    duo_scaling: bool = False  # candidates mean|x|^r / mean|w|^(1-r)
    search_tokens: int = Field(4096, ge=1)
    unrouted_weight: float = Field(1.0, ge=0, le=1)


class W8A8Section(Strict):
    activations: Literal["dynamic", "static"] = "dynamic"  # per-token at run time, or per-tensor from calibration
    smoothquant_alpha: float | None = Field(0.5, ge=0, le=1)  # None: no smoothing


class BnbSection(Strict):
    blocksize: int = 64
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
        if v is not None:
            import torch

            try:
                torch.device(v)
            except RuntimeError as exc:
                raise ValueError(f"not a torch device: {v!r} ({exc})") from exc
        return v


class TrainDataSection(Strict):
    """Fine-tuning data (read through ``datasets``); ``bundled:NAME`` names a file shipped with dsq."""

    train: str = "bundled:calibration.txt"  # .txt / .jsonl / .json / .parquet file or a save_to_disk dir
    validation: str | None = None  # None: hold out val_fraction of the train documents
    split: str = "train"
    text_field: str = "text"
    prompt_field: str | None = None  # with response_field: instruction data, prompts not scored
    response_field: str | None = None
    messages_field: str | None = None  # chat messages rendered with the tokenizer's chat template
    seq_len: int = Field(256, ge=2)
    val_fraction: float = Field(0.1, ge=0, lt=1)
    pack: bool = True
    seed: int = 0


class TrainingSection(Strict):
    """The training loop (accelerate): one optimizer step = batch_size x grad_accum x processes blocks."""

    max_steps: int = Field(200, ge=1)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-4, gt=0)
    warmup_steps: int = Field(20, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    mixed_precision: Literal["no", "bf16"] = "no"
    eval_every: int = Field(50, ge=0)
    save_every: int = Field(50, ge=0)
    keep_checkpoints: int = Field(2, ge=1)
    checkpoint_dir: str | None = None  # None: <output>.checkpoints
    resume: bool = True  # continue from the last complete checkpoint there
    seed: int = 0
    fsdp: bool = False  # several processes: shard parameters, gradients and AdamW state (FSDP2) instead of DDP


class QATSection(Strict):
    """Quantization-aware training to the ``quantize:`` section's format (method rtn, gptq or awq)."""

    learnable_scales: bool = False  # LSQ-style trained per-group scales
    mse_init: bool = False  # learnable scales start from the |w - Q(w)|^2.4 range search instead of min/max
    distill_weight: float = Field(1.0, ge=0, le=1)  # share of KL(original || student) in the loss


class LoraSection(Strict):
    """LoRA through peft on the FP base (no ``quantize:``) or the quantized base (QLoRA)."""

    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: list[str] | None = None  # module-name regexes; None: MLA projections, dense and shared-expert MLPs
    routed_experts: bool = False  # also adapt the fused routed experts (FP base only)
    merge: bool = True  # merge into the base (re-quantized with the same scheme on a quantized base)


class FinetuneSection(Strict):
    """QAT or LoRA (exactly one of ``qat:`` / ``lora:``)."""

    data: TrainDataSection = TrainDataSection()
    training: TrainingSection = TrainingSection()
    qat: QATSection | None = None
    lora: LoraSection | None = None


class PerplexitySection(Strict):
    data: str | None = None  # text / JSONL / parquet file; None: bundled held-out split
    context: int = Field(256, ge=2)
    stride: int = Field(128, ge=1)
    max_tokens: int | None = Field(None, ge=2)


class MultipleChoiceSection(Strict):
    data: str | None = None  # JSONL {context, choices, gold}; None: bundled set
    limit: int | None = Field(None, ge=1)
    num_fewshot: int = Field(0, ge=0)  # solved exemplars (context + gold choice) before each item's context
    fewshot_seed: int = 1234  # item i draws its exemplars with random.Random(f"{fewshot_seed}-{i}")
    fewshot_data: str | None = None  # JSONL of the same form to draw from; None: the data file, the item itself left out
    fewshot_delimiter: str = "\n\n"  # after every exemplar (lm-evaluation-harness's fewshot_delimiter)


class FidelitySection(Strict):
    seq_len: int = Field(128, ge=2)
    max_tokens: int = Field(4096, ge=2)


class GatesSection(Strict):
    """Thresholds; a run whose artifact misses one exits 1 naming the metric."""

    max_ppl_increase_pct: float | None = None
    max_ppl: float | None = None
    min_mc_acc: float | None = None
    max_mc_acc_drop_pts: float | None = None
    min_top1_agreement: float | None = None
    max_mean_kl: float | None = None
    max_size_ratio: float | None = None


class SpeedSection(Strict):
    """Prefill and decode tokens/s with a KV cache (torch and ONNX Runtime rows alike)."""

    batch: int = Field(1, ge=1)
    prompt_len: int = Field(128, ge=1)
    new_tokens: int = Field(32, ge=1)
    repeats: int = Field(3, ge=1)


class EvalSection(Strict):
    perplexity: PerplexitySection | None = PerplexitySection()
    multiple_choice: MultipleChoiceSection | None = MultipleChoiceSection()
    fidelity: FidelitySection = FidelitySection()
    speed: SpeedSection | None = None
    gates: GatesSection = GatesSection()
    reload_check: bool = True  # reload the artifact with transformers and compare logits


class ExportValidationSection(Strict):
    """Shapes of the ONNX Runtime vs PyTorch check run inside every export."""

    batch_sizes: list[int] = Field(default_factory=lambda: [1, 3], min_length=1)
    seq_lens: list[int] = Field(default_factory=lambda: [1, 17, 64], min_length=1)
    decode_steps: int = Field(8, ge=1)
    greedy_tokens: int = Field(32, ge=1)
    tolerance: float | None = Field(None, gt=0)  # None: 1e-4 fp, 1e-3 weight-only, 0.25 int8 activations


class ExportSection(Strict):
    """ONNX export of the artifact to ``<output>/onnx``, validated against PyTorch; a mismatch fails the run."""

    accuracy_level: Literal[0, 1, 2, 3, 4] = 0  # MatMulNBits compute: 0/1 fp32, 4 int8 activations
    weight_op: Literal["matmul_nbits", "dequantize_linear"] = "matmul_nbits"  # ORT contrib op | standard opset 21
    quantize_embeddings: bool = False  # input embedding stored int8, one scale per row
    evaluate: bool = True  # run the benchmark suite on the ONNX model too (an "-onnx" report row)
    threads: int | None = Field(None, ge=1)  # ONNX Runtime intra-op threads (None: its default)
    validation: ExportValidationSection = ExportValidationSection()


class Recipe(Strict):
    """A whole run: model in, quantized artifact and report out."""

    model: str | None = None  # local HF directory; None: the bundled tiny DeepSeek-V3
    trust_remote_code: bool = False
    dtype: Literal["float32", "bfloat16"] = "float32"
    output: str = "runs/out"
    overwrite: bool = False
    seed: int = 0
    progress: bool = True
    streaming: bool | None = None  # one decoder layer in memory at a time; None: when the model exceeds half the free memory
    max_shard_mb: int = Field(4096, ge=1)  # artifact weight shards of at most this size
    quantize: QuantizeSection | None = QuantizeSection()  # null: no quantization (LoRA on the FP base)
    finetune: FinetuneSection | None = None
    export: ExportSection | None = None  # ONNX decoder with KV cache (dsq formats only)
    eval: EvalSection = EvalSection()

    @field_validator("output")
    @classmethod
    def _output_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("output must be a directory path")
        return v


def _allowed_keys(loc: tuple) -> list[str]:
    """Field names of the section at ``loc`` (the parent of the offending key)."""
    model: type[BaseModel] = Recipe
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


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        path = ".".join(str(p) for p in loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            allowed = ", ".join(_allowed_keys(loc[:-1]))
            lines.append(f"unknown key '{path}' in {source}; allowed keys here: {allowed}")
        else:
            lines.append(f"invalid value for '{path}' in {source}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], yaml-parsed value)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"command-line override {text!r} must look like key.path=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise RecipeError(f"command-line override {text!r}: value is not valid YAML ({exc})") from exc
    return key.strip().split("."), value


def apply_override(tree: dict, path: list[str], value: Any, text: str) -> None:
    node = tree
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise RecipeError(f"command-line override {text!r}: '{'.'.join(path[: i + 1])}' is not a section")
        node = child
    node[path[-1]] = value


def read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of keys, got {type(data).__name__}")
    return data


def load_recipe(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe.

    Args:
        path: the YAML file (None: all defaults).
        overrides: ``key.path=value`` strings from the command line.

    Returns:
        The validated :class:`Recipe`.

    Raises:
        RecipeError: naming the key path, the file and the allowed keys.
    """
    source = str(path) if path is not None else "(defaults)"
    tree = read_yaml(Path(path)) if path is not None else {}
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(tree, keys, value, text)
    if overrides:
        source += " (with command-line overrides: " + " ".join(overrides) + ")"
    try:
        recipe = Recipe.model_validate(tree)
    except ValidationError as exc:
        raise RecipeError(_format_errors(exc, source)) from None
    if recipe.quantize is not None:
        _check_method_sections(recipe.quantize, source)
    _check_finetune(recipe, source)
    _check_export(recipe, source)
    ppl = recipe.eval.perplexity
    if ppl is not None and ppl.stride > ppl.context:
        raise RecipeError(f"invalid value for 'eval.perplexity.stride' in {source}: stride {ppl.stride} exceeds context {ppl.context}")
    return recipe


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
