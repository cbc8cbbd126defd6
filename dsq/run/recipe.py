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

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

import dsq.quantize  # noqa: F401  (registers the methods the quantize section is made of)
from dsq.core.errors import RecipeError
from dsq.core.schema import MAX_COUNT, MAX_SEQUENCE, MAX_TOKEN_BUDGET, MAX_WIDTH, Name, PathText, Pattern, Seed, Strict, _cut, format_errors
from dsq.core.yaml_file import apply_override, parse_override, read_yaml
from dsq.eval.gates import GatesSection
from dsq.quantize.artifact_save import save_quantized_model
from dsq.quantize.kv_cache import Fp8E4M3KV, Int8KV, KVCacheScheme, PerHeadKV, PerTensorKV
from dsq.quantize.method import METHODS, method_names
from dsq.run.search_section import SearchSection

DEFAULT_METHOD = "rtn"
"""``quantize.method`` when a recipe's ``quantize:`` section does not name one."""

QuantizeSection = Annotated[Union[tuple(m.section for m in METHODS.values())], Field(discriminator="method")]
"""A ``quantize:`` section: the registered method sections, told apart by ``method``."""

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

    cpu_target: Literal["portable", "vnni"] = "portable"  # int8 kernels: u8 x u8 exact anywhere | u8 x s8 for AVX512-VNNI / AVX-VNNI / AMX
    accuracy_level: Literal[0, 1, 2, 3, 4] = 0  # MatMulNBits compute: 0/1 fp32, 4 int8 activations
    weight_op: Literal["matmul_nbits", "dequantize_linear"] = "matmul_nbits"  # ORT contrib op | standard blocked DequantizeLinear
    opset: Literal[21, 23] = 23  # 23: one Attention / RMSNormalization / RotaryEmbedding node each (ORT >= 1.23) | 21: elementary ops
    quantize_embeddings: bool = False  # input embedding stored int8, one scale per row
    dense_experts: bool = False  # MoE: every routed expert on every token (E/k x the FLOPs) instead of each token's top-k
    absorb_mla: bool = True  # MLA: kv_b_proj folded into query and output, attention over the cached latent itself
    moe_op: bool = True  # MoE: one ORT MoE / QMoE node per layer where it carries the layer exactly (else sparse)
    # weight-only layers also as int8 for prompts (u8 x s8 GEMM; needs cpu_target vnni), prompt activations rounded
    # per token (dynamic) or per tensor (dynamic_tensor; faster, less exact); null: MatMulNBits for every run
    int8_prefill: Literal["dynamic", "dynamic_tensor"] | None = None
    evaluate: bool = True  # run the benchmark suite on the ONNX model too (an "-onnx" report row)
    threads: int | None = Field(None, ge=1, le=4096)  # ONNX Runtime intra-op threads (None: its default)
    validation: ExportValidationSection = ExportValidationSection()

    @model_validator(mode="after")
    def _int8_prefill_needs(self) -> "ExportSection":
        if self.int8_prefill is not None and self.cpu_target != "vnni":
            raise ValueError("int8_prefill runs prompts on the u8 x s8 int8 kernel (exact with VNNI or AMX): "
                             f"set cpu_target: vnni (got {self.cpu_target})")
        if self.int8_prefill is not None and self.weight_op != "matmul_nbits":
            raise ValueError("int8_prefill switches MatMulNBits layers: it needs weight_op: matmul_nbits")
        return self


class KVCacheSection(Strict):
    """A quantized KV cache: keys and values stored as int8 or FP8 e4m3 with static scales calibrated on the
    quantized model (:mod:`dsq.quantize.kv_cache`). Calibration reads the ``quantize:`` section's calibration
    data when it has one, otherwise the default calibration data."""

    dtype: Literal["int8", "fp8_e4m3"] = "int8"
    granularity: Literal["tensor", "head"] = "tensor"  # one scale per attention and slot, or per cached head
    samples: int | None = Field(None, ge=1, le=MAX_COUNT)  # calibration sequences; None: as many as the calibration data has

    def scheme(self) -> KVCacheScheme:
        dtype = Int8KV() if self.dtype == "int8" else Fp8E4M3KV()
        return KVCacheScheme(dtype, PerTensorKV() if self.granularity == "tensor" else PerHeadKV())


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
    quantize: QuantizeSection | None = METHODS[DEFAULT_METHOD].section()  # null: no quantization (LoRA on the FP base)
    finetune: FinetuneSection | None = None
    export: ExportSection | None = None  # ONNX decoder with KV cache (dsq formats only)
    kv_cache: KVCacheSection | None = None  # quantized KV cache, calibrated after the weights are quantized
    search: SearchSection | None = None  # dsq search: per-module schemes verified against eval.gates
    eval: EvalSection = EvalSection()

    @field_validator("quantize", mode="before")
    @classmethod
    def _default_method(cls, value: Any) -> Any:
        if isinstance(value, dict) and "method" not in value:
            return {"method": DEFAULT_METHOD, **value}
        return value


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
        raise RecipeError(format_errors(exc, source, Recipe)) from None
    _check_finetune(recipe, source)
    _check_export(recipe, source)
    _check_kv_cache(recipe, source)
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


def _check_finetune(recipe: Recipe, source: str) -> None:
    ft = recipe.finetune
    if ft is None:
        if recipe.quantize is None:
            raise RecipeError(f"{source}: 'quantize' is null and there is no 'finetune' section: nothing to do")
        return
    if (ft.qat is None) == (ft.lora is None):
        raise RecipeError(f"'finetune' in {source} needs exactly one of 'finetune.qat' and 'finetune.lora'")
    method = recipe.quantize.method if recipe.quantize is not None else None
    if ft.qat is not None and (method is None or not METHODS[method].qat_start):
        raise RecipeError(
            f"'finetune.qat' in {source} trains towards the 'quantize' section's format: quantize.method must be one of "
            f"{', '.join(method_names(lambda m: m.qat_start))} (rtn: from the FP base; others: from that PTQ result), got {method!r}"
        )
    if ft.lora is not None and method is not None and not METHODS[method].lora_base:
        raise RecipeError(
            f"'finetune.lora' in {source}: LoRA runs on the FP base (quantize: null) or a quantized base made by one of "
            f"{', '.join(method_names(lambda m: m.lora_base))}, not quantize.method {method!r}"
        )
    if ft.lora is not None and ft.lora.routed_experts and method is not None:
        raise RecipeError(f"'finetune.lora.routed_experts' in {source} needs the FP base (quantize: null)")
    d = ft.data
    if (d.prompt_field is None) != (d.response_field is None):
        raise RecipeError(f"'finetune.data' in {source}: prompt_field and response_field go together")
    if d.messages_field is not None and d.prompt_field is not None:
        raise RecipeError(f"'finetune.data' in {source}: use messages_field or prompt_field/response_field, not both")


def _check_export(recipe: Recipe, source: str) -> None:
    if recipe.export is None:
        return
    method = recipe.quantize.method if recipe.quantize is not None else None
    if method is not None and not METHODS[method].exports:
        raise RecipeError(
            f"'export' in {source}: quantize.method {method!r} has no ONNX form; export works for "
            f"{', '.join(method_names(lambda m: m.exports))}"
        )
    if recipe.finetune is not None and recipe.finetune.lora is not None:
        raise RecipeError(
            f"'export' in {source}: a LoRA run's artifact is an adapter; merge it and export the merged model "
            "with `dsq export`, or drop the 'export' section"
        )


def _check_kv_cache(recipe: Recipe, source: str) -> None:
    """``kv_cache`` is calibrated on the model the ``quantize:`` section quantizes in memory and saves as compressed-tensors."""
    if recipe.kv_cache is None:
        return
    if recipe.quantize is None or recipe.finetune is not None:
        raise RecipeError(
            f"'kv_cache' in {source}: the KV cache is calibrated after the 'quantize' step of a PTQ run; it needs a "
            "'quantize' section and no 'finetune' section"
        )
    method = METHODS[recipe.quantize.method]
    if method.save is not save_quantized_model:
        raise RecipeError(
            f"'kv_cache' in {source}: quantize.method {method.name!r} does not write a compressed-tensors artifact, where "
            f"the scales are stored; use one of {', '.join(method_names(lambda m: m.save is save_quantized_model))}"
        )
    if recipe.streaming is True:
        raise RecipeError(
            f"'kv_cache' in {source}: the KV cache is calibrated on the whole quantized model in memory; streaming: true "
            "quantizes one decoder layer at a time (set streaming: false, or remove 'kv_cache')"
        )


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML (every default filled in; only the sections its method reads)."""
    tree = recipe.model_dump(mode="json")
    if recipe.finetune is None:
        tree.pop("finetune")
    if recipe.export is None:
        tree.pop("export")
    if recipe.kv_cache is None:
        tree.pop("kv_cache")
    if recipe.search is None:
        tree.pop("search")
    return yaml.safe_dump(tree, sort_keys=False)
