"""Memory and time plans: what a recipe will need, from config.json and safetensors headers alone.

:func:`plan_checkpoint` builds the model on the ``meta`` device (no memory, even for DeepSeek-V3's
671B parameters), reads the safetensors headers when the checkpoint has weight files (never the
tensor data) and estimates, for a recipe:

* parameters, exactly, by category (attention, dense MLP, shared experts, routed experts, router,
  norms, embeddings, lm_head) and per decoder layer (dense and MoE layers differ);
* bytes of the source weights (from the headers, or from the config: BF16/FP32, or FP8 e4m3 with
  fp32 128 x 128 block scales in ``weight_scale_inv``) and of the artifact for BF16, INT8 per-channel,
  INT4 g128, INT4 g32 and the recipe's own scheme, with the layout dsq writes (packed integers,
  scales and zero points for the quantized Linears and fused experts; embeddings, norms and router
  kept; lm_head only with ``quantize.targets.lm_head``; the recipe's include/exclude patterns);
* peak host memory of the in-memory path and of the streaming path (one decoder layer at a time),
  and peak accelerator memory when calibration places one layer at a time on the accelerator;
* calibration FLOPs and the time they take at a given throughput.

Every figure but the parameter and byte counts is an estimate: a model of what dsq holds and
computes, not a measurement.

Example:
    >>> plan = plan_checkpoint("dsq/assets/public_configs/deepseek-v3", load_recipe(None))
    >>> plan.parameters.total
    671026404352
    >>> print(plan.to_markdown())
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from dsq.core.checkpoint import CONFIG_NAME, PICKLE_SUFFIXES, SAFE_WEIGHTS_INDEX_NAME, SAFETENSORS_DTYPE_BITS, _checkpoint_dir, _read_config, inspect_checkpoint, read_safetensors_header
from dsq.core.layout import SUPPORTED_MODEL_TYPES
from dsq.core.errors import CheckpointError
from dsq.core.checkpoint_checks import model_facts
from dsq.run.preflight import check_recipe_against_model
from dsq.run.recipe import Recipe, load_recipe

GiB = 1 << 30

PROCESS_BASELINE_BYTES = int(0.6 * GiB)
"""Resident memory of a Python process with torch and transformers imported, before any model."""

ACCELERATOR_BASELINE_BYTES = int(0.5 * GiB)
"""Accelerator memory taken by the runtime itself (CUDA context, allocator reserve)."""

DEFAULT_GPU_TFLOPS = 50.0
"""Default GPU throughput: about 75% of an H100's 67 TFLOPS fp32 peak (dsq's statistics are fp32)."""

DEFAULT_CPU_TFLOPS = 1.0
"""Default CPU throughput: sustained fp32 matmul rate of a multi-core server (a laptop: ~0.2)."""

STATISTICS_BYTES = 4
"""Calibration statistics (Hessians, channel vectors, sampled rows) are fp32 whatever the model dtype."""

CHOLESKY_FLOPS = 2.0
"""GPTQ's Cholesky, inverse and second Cholesky of one K x K Hessian cost about this many K^3 FLOPs."""

ROUNDING_FLOPS = 10
"""FLOPs to round one weight element (scale, divide, round, clamp, error)."""

MSE_CANDIDATES = 21
"""Ranges tried per group by the ``mse_scales`` search (shrink 1.00, 0.99, ..., 0.80)."""

RTN_TEMPORARY_BYTES: Mapping[int, float] = {4: 13.2, 2: 9.2}
"""Peak bytes per element while round-to-nearest quantizes one 2-D tensor in one piece (fp32 copies of
the weight, its expanded scales and the rounded values, then int8), by the model dtype's width. Measured
on CPU with torch 2.13. Fused experts are rounded one expert at a time, so this applies to one expert."""

EXPERT_INTEGER_BYTES: Mapping[int, float] = {4: 1.5, 8: 2.0}
"""Bytes per element of a whole fused experts tensor held while its integers are gathered and packed,
by bits: the int8 values of every expert (1) plus the packed copy (0.5 for 4-bit, 1 for 8-bit; packing
runs expert by expert)."""

STACK_PACK_BYTES: Mapping[int, float] = {4: 2.5, 8: 3.0}
"""The same for GPTQ/AWQ, whose per-expert results (int8) are stacked before packing: one more int8 copy."""

MAX_EXAMPLES = 5
"""Tensor names an unused or missing list shows."""

DTYPE_BYTES: Mapping[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}

# parameter categories, in display order
ATTENTION = "attention Linears"
DENSE_MLP = "dense MLP Linears"
SHARED_EXPERTS = "shared-expert Linears"
ROUTED_EXPERTS = "routed experts (fused)"
ROUTER = "router"
NORMS = "norms"
EMBEDDINGS = "embeddings"
LM_HEAD = "lm_head"
OTHER = "other"
CATEGORIES: tuple[str, ...] = (ATTENTION, DENSE_MLP, SHARED_EXPERTS, ROUTED_EXPERTS, ROUTER, NORMS, EMBEDDINGS, LM_HEAD, OTHER)

_EXPERT_WEIGHT = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<index>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")
_FP8_SCALE_SUFFIX = "_scale_inv"


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class ParameterCounts:
    """Exact parameter counts of the model transformers builds from the config.

    Attributes:
        total: every parameter (tied tensors once), as ``sum(p.numel() for p in model.parameters())``.
        by_category: ``(category, parameters)`` in :data:`CATEGORIES` order, empty categories left out.
        buffers: elements of persistent buffers saved with the weights (e.g. the router's
            ``e_score_correction_bias``); not parameters.
        tied_embeddings: lm_head shares the input embedding (stored once).
    """

    total: int
    by_category: tuple[tuple[str, int], ...]
    buffers: int
    tied_embeddings: bool


@dataclass(frozen=True)
class LayerPlan:
    """One decoder layer.

    Attributes:
        index: layer number.
        moe: the layer has routed experts (otherwise a dense MLP).
        parameters: parameters of the layer.
        working_bytes: the layer's tensors in the recipe dtype (what calibration holds).
        quantized_bytes: the layer in the recipe's artifact format.
        statistics_bytes: calibration statistics the recipe's method holds for this layer at its peak.
        temporary_bytes: transient memory of quantizing the layer's largest tensor.
        forward_flops_per_token: one routed forward of the layer, per token (calibration seq_len).
    """

    index: int
    moe: bool
    parameters: int
    working_bytes: int
    quantized_bytes: int
    statistics_bytes: int
    temporary_bytes: int
    forward_flops_per_token: float

    @property
    def peak_bytes(self) -> int:
        """What holding and quantizing this layer adds at its peak."""
        return self.working_bytes + self.quantized_bytes + self.statistics_bytes + self.temporary_bytes


@dataclass(frozen=True)
class TensorSet:
    """A set of checkpoint tensors (e.g. those the model does not use).

    Attributes:
        tensors: how many tensors.
        parameters: their elements (FP8 block scales excluded).
        bytes: their bytes on disk (scales included).
        examples: a few names (or name patterns).
    """

    tensors: int
    parameters: int
    bytes: int
    examples: tuple[str, ...]


@dataclass(frozen=True)
class SourceBytes:
    """The source checkpoint's weights.

    Attributes:
        tensor_bytes: bytes of every tensor's data (headers excluded; unused tensors included).
        from_headers: read from safetensors headers (otherwise computed from the config).
        weight_files: number of safetensors files (0 without weights).
        storage: how the weights are stored (e.g. ``bfloat16``, ``FP8 e4m3 + fp32 128x128 block scales``).
        header_parameters: elements of the tensors the model uses, as the headers count them
            (experts summed over their per-expert tensors, scales excluded); None without headers.
        unused: tensors in the checkpoint the model does not use (e.g. the multi-token-prediction
            layer); estimated from the config when there are no headers. Not loaded, not quantized,
            not written to the artifact.
        missing: model tensors the headers lack, and tensors whose element count differs.
    """

    tensor_bytes: int
    from_headers: bool
    weight_files: int
    storage: str
    header_parameters: int | None
    unused: TensorSet | None
    missing: tuple[str, ...]


@dataclass(frozen=True)
class SchemeBytes:
    """Bytes of the artifact's weights in one format.

    Attributes:
        label: row name (``BF16``, ``INT4 g128 sym``, ``recipe: ...``).
        description: what is stored (scheme, kept dtype).
        tensor_bytes: bytes of every tensor's data in the artifact (file headers excluded).
        quantized_parameters: parameters stored as integers.
        kept_parameters: parameters stored in floating point.
        exact: the count follows the writer's layout exactly (False: an approximation).
    """

    label: str
    description: str
    tensor_bytes: int
    quantized_parameters: int
    kept_parameters: int
    exact: bool


@dataclass(frozen=True)
class MemoryEstimate:
    """A peak memory estimate as a sum of named parts.

    Attributes:
        label: which path and which memory.
        parts: ``(what, bytes)``.
    """

    label: str
    parts: tuple[tuple[str, int], ...]

    @property
    def total(self) -> int:
        return sum(b for _, b in self.parts)


@dataclass(frozen=True)
class TimeEstimate:
    """Calibration compute and its duration at some throughputs.

    Attributes:
        flops: ``(what, FLOPs)``.
        throughputs: ``(label, TFLOPS)`` the duration is given for.
    """

    flops: tuple[tuple[str, float], ...]
    throughputs: tuple[tuple[str, float], ...]

    @property
    def total_flops(self) -> float:
        return sum(f for _, f in self.flops)

    def seconds(self, tflops: float) -> float:
        """Seconds for :attr:`total_flops` at ``tflops`` (10^12 FLOP/s)."""
        return self.total_flops / (tflops * 1e12)


@dataclass(frozen=True)
class Plan:
    """What a recipe needs for a checkpoint: parameters, bytes, memory and time.

    Attributes:
        checkpoint: the checkpoint directory.
        model_type: ``model_type`` of the config.
        architecture: the transformers class.
        config_only: no weight files: every byte count comes from the config.
        recipe: the recipe planned for (source and its settings, one line).
        method: the recipe's quantization method (None: no quantization).
        parameters: exact parameter counts.
        layers: every decoder layer.
        source: the source weights.
        schemes: artifact bytes per format (the recipe's own last).
        in_memory: peak host memory, whole model in memory.
        streaming: peak host memory, one decoder layer at a time.
        accelerator: peak accelerator memory, one layer at a time on the accelerator.
        time: calibration FLOPs and durations.
        notes: what the numbers leave out, and what the reader must know.
    """

    checkpoint: str
    model_type: str
    architecture: str
    config_only: bool
    recipe: str
    method: str | None
    parameters: ParameterCounts
    layers: tuple[LayerPlan, ...]
    source: SourceBytes
    schemes: tuple[SchemeBytes, ...]
    in_memory: MemoryEstimate
    streaming: MemoryEstimate
    accelerator: MemoryEstimate
    time: TimeEstimate
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict: every field, plus totals and durations.

        Returns:
            The plan as plain data.
        """
        data = asdict(self)
        data["parameters"]["by_category"] = dict(self.parameters.by_category)
        for key in ("in_memory", "streaming", "accelerator"):
            estimate: MemoryEstimate = getattr(self, key)
            data[key] = {"label": estimate.label, "parts": dict(estimate.parts), "total_bytes": estimate.total}
        data["time"] = {
            "flops": dict(self.time.flops),
            "total_flops": self.time.total_flops,
            "seconds": {label: self.time.seconds(tflops) for label, tflops in self.time.throughputs},
            "tflops": dict(self.time.throughputs),
            "estimate": True,
        }
        return data

    def to_markdown(self) -> str:
        """The plan as Markdown tables (readable in a terminal too).

        Returns:
            The text, ending with a newline.
        """
        return render_markdown(self)


# ----------------------------------------------------------------------------- model facts


@dataclass(frozen=True)
class _Matrix:
    """``count`` weight matrices of ``out x inp`` as the artifact stores them (one per expert)."""

    count: int
    out: int
    inp: int


@dataclass(frozen=True)
class _Target:
    """A quantizable module (a Linear or fused experts) and the recipe's decision for it."""

    name: str
    layer: int | None
    quantize: bool
    experts: bool
    attention: bool
    matrices: tuple[_Matrix, ...]
    hessian_dims: tuple[tuple[int, int], ...]  # (how many, K): GPTQ Hessians K x K of this module
    params: int
    bias: int

    @property
    def weight_params(self) -> int:
        return sum(m.count * m.out * m.inp for m in self.matrices)


@dataclass(frozen=True)
class _Tensor:
    """One saved tensor of the model (parameter or persistent buffer)."""

    name: str
    numel: int
    category: str
    layer: int | None
    parameter: bool
    fp32: bool  # loaded in float32 when the model dtype is bfloat16 (transformers' ``_keep_in_fp32_modules_strict``)

    def bytes(self, dtype_bytes: int) -> int:
        """Bytes of this tensor stored in floating point of ``dtype_bytes`` bytes per element."""
        return self.numel * (4 if self.fp32 else dtype_bytes)


def _tensor_bytes(tensors, dtype_bytes: int) -> int:
    return sum(t.bytes(dtype_bytes) for t in tensors)


@dataclass(frozen=True)
class _Balance:
    """An AWQ balance mapping resolved on a layer: which block it searches on, and whether per expert."""

    attention: bool
    per_expert: bool
    quantized: bool


@dataclass(frozen=True)
class _Layer:
    """Shapes of one decoder layer that memory and FLOPs depend on."""

    index: int
    moe: bool
    attention_linear: int  # weight elements of the attention Linears
    mlp_linear: int  # weight elements of dense / shared-expert Linears
    router: int
    experts: int  # routed experts
    expert_size: int  # elements of one expert (gate + up + down)
    intermediate: int  # widest MLP intermediate (dense or one expert)
    balances: tuple[_Balance, ...]


@dataclass(frozen=True)
class _Facts:
    """Everything the plan needs from the model, taken from the meta-device model once."""

    config: Mapping[str, Any]
    architecture: str
    hidden: int
    vocab: int
    heads: int
    qk_dim: int
    v_dim: int
    top_k: int
    layer_prefix: str
    tensors: tuple[_Tensor, ...]
    targets: tuple[_Target, ...]
    layers: tuple[_Layer, ...]
    tied: bool

    @property
    def has_quantized_experts(self) -> bool:
        return any(t.experts and t.quantize for t in self.targets)


def _layer_index(name: str, prefix: str) -> int | None:
    if not name.startswith(prefix + "."):
        return None
    head = name[len(prefix) + 1:].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def _is_router(module_name: str) -> bool:
    """The MoE router (``mlp.gate``), which dsq never quantizes."""
    from dsq.quantize.targets import ROUTER as ROUTER_PATTERN

    return re.search(ROUTER_PATTERN, module_name) is not None


def _category(name: str, expert_modules: set[str]) -> str:
    """The category of a saved tensor, from its name."""
    owner = name.rpartition(".")[0]
    if "embed_tokens" in name:
        return EMBEDDINGS
    if name.startswith("lm_head"):
        return LM_HEAD
    if owner.rpartition(".")[2].endswith("norm"):
        return NORMS
    if _is_router(owner):
        return ROUTER
    if owner in expert_modules:
        return ROUTED_EXPERTS
    if ".shared_experts." in name:
        return SHARED_EXPERTS
    if ".self_attn." in name:
        return ATTENTION
    if ".mlp." in name:
        return DENSE_MLP
    return OTHER


def _build_meta_model(root: Path) -> torch.nn.Module:
    """The causal LM of ``root``'s config.json with every tensor on ``meta`` (no memory, no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config_path = root / CONFIG_NAME
    try:
        config = AutoConfig.from_pretrained(str(root), local_files_only=True)
        if getattr(config, "quantization_config", None) is not None:
            del config.quantization_config  # the source format does not change the model's shapes
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"transformers cannot build a model from {config_path}: {exc}") from exc


def _targets(model: torch.nn.Module, spec, layer_prefix: str) -> tuple[_Target, ...]:
    """Every quantizable module with the recipe's decision (dsq's own target selection)."""
    from dsq.quantize.targets import select_targets

    found = []
    for d in select_targets(model, spec):
        layer = _layer_index(d.name, layer_prefix)
        params = sum(p.numel() for p in d.module.parameters())
        if d.kind == "experts":
            count, double_inter, hidden = d.module.gate_up_proj.shape
            inter = double_inter // 2
            matrices = (_Matrix(count, inter, hidden), _Matrix(count, inter, hidden), _Matrix(count, hidden, inter))
            found.append(_Target(d.name, layer, d.quantize, True, False, matrices, ((count, hidden), (count, inter)), params, 0))
        else:
            out, inp = d.module.weight.shape
            bias = d.module.bias.numel() if d.module.bias is not None else 0
            attention = ".self_attn." in d.name
            found.append(_Target(d.name, layer, d.quantize, False, attention, (_Matrix(1, out, inp),), ((1, inp),), params, bias))
    return tuple(found)


def _kept_fp32_pattern(model: torch.nn.Module) -> re.Pattern[str] | None:
    """transformers' rule for the tensors it loads in float32 when asked for bfloat16.

    ``from_pretrained`` searches each tensor name for the patterns of ``_keep_in_fp32_modules_strict``
    (plain regular expressions, ``*`` as ``.*``, matched anywhere: transformers 5.25 lists DeepSeek-V3's
    ``gate.weight``, the router); ``_keep_in_fp32_modules`` applies to float16 only, which dsq does not
    load (see ``PreTrainedModel._get_dtype_plan``).
    """
    patterns = sorted(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{p.replace('*', '.*')})" for p in patterns))


def _saved_tensors(model: torch.nn.Module, expert_modules: set[str], layer_prefix: str) -> tuple[_Tensor, ...]:
    """Parameters (tied ones once) and persistent buffers: what the weight files hold."""
    params = dict(model.named_parameters())
    all_param_names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    state = dict(model.state_dict(keep_vars=True))
    keep_fp32 = _kept_fp32_pattern(model)

    def saved(name: str, numel: int, parameter: bool) -> _Tensor:
        fp32 = keep_fp32 is not None and keep_fp32.search(name) is not None
        return _Tensor(name, numel, _category(name, expert_modules), _layer_index(name, layer_prefix), parameter, fp32)

    tensors = [saved(n, p.numel(), True) for n, p in params.items()]
    tensors += [saved(n, t.numel(), False) for n, t in state.items() if n not in all_param_names]
    return tuple(tensors)


def _balances(layer: torch.nn.Module, prefix: str, quantized: set[str]) -> tuple[_Balance, ...]:
    """AWQ/SmoothQuant balance mappings of a layer (dsq's own mapping table)."""
    from dsq.quantize.mappings import resolve

    found = []
    for m in resolve(layer):
        attention = m.smooth == "input_layernorm" or m.smooth.startswith("self_attn.")
        names = [m.smooth] if m.per_expert else list(m.balance)
        found.append(_Balance(attention, m.per_expert, any(f"{prefix}.{n}" in quantized for n in names)))
    return tuple(found)


def _layer_facts(index: int, layer: torch.nn.Module, prefix: str, targets: tuple[_Target, ...], tensors) -> _Layer:
    mine = [t for t in targets if t.layer == index]
    experts = [t for t in mine if t.experts]
    linears = [t for t in mine if not t.experts]
    router = sum(t.numel for t in tensors if t.layer == index and t.category == ROUTER and t.parameter)
    quantized = {t.name for t in mine if t.quantize}
    count = experts[0].matrices[0].count if experts else 0
    expert_size = sum(m.out * m.inp for m in experts[0].matrices) if experts else 0
    widths = [m.out for t in linears if ".mlp." in t.name for m in t.matrices] + [m.out for t in experts for m in t.matrices[:1]]
    return _Layer(
        index=index,
        moe=bool(experts),
        attention_linear=sum(t.weight_params for t in linears if t.attention),
        mlp_linear=sum(t.weight_params for t in linears if not t.attention and not _is_router(t.name)),
        router=router,
        experts=count,
        expert_size=expert_size,
        intermediate=max(widths, default=0),
        balances=_balances(layer, f"{prefix}.{index}", quantized),
    )


def _head_dims(config: Mapping[str, Any], hidden: int, heads: int) -> tuple[int, int]:
    """(query/key head dim, value head dim): MLA's from its config, otherwise ``head_dim``."""
    head_dim = config.get("head_dim") or hidden // max(1, heads)
    if config.get("qk_nope_head_dim") is not None and config.get("qk_rope_head_dim") is not None:
        qk = config["qk_nope_head_dim"] + config["qk_rope_head_dim"]
        return qk, config.get("v_head_dim") or qk
    return head_dim, head_dim


def _facts(root: Path, config: Mapping[str, Any], spec) -> _Facts:
    """Build the meta-device model and take the plan's facts from it."""
    from dsq.quantize.sequential import decoder_layers

    model = _build_meta_model(root)
    layer_prefix, layers = decoder_layers(model)
    targets = _targets(model, spec, layer_prefix)
    expert_modules = {t.name for t in targets if t.experts}
    tensors = _saved_tensors(model, expert_modules, layer_prefix)
    layer_facts = tuple(_layer_facts(i, layer, layer_prefix, targets, tensors) for i, layer in enumerate(layers))
    hidden = int(model.config.hidden_size)
    heads = int(model.config.num_attention_heads)
    qk_dim, v_dim = _head_dims(config, hidden, heads)
    lm_head = model.get_output_embeddings()
    tied = lm_head is not None and lm_head.weight is model.get_input_embeddings().weight
    return _Facts(
        config=config, architecture=type(model).__name__, hidden=hidden, vocab=int(model.config.vocab_size), heads=heads,
        qk_dim=qk_dim, v_dim=v_dim, top_k=int(getattr(model.config, "num_experts_per_tok", 0) or 0),
        layer_prefix=layer_prefix, tensors=tensors, targets=targets, layers=layer_facts, tied=bool(tied),
    )


def _parameter_counts(facts: _Facts) -> ParameterCounts:
    """Parameters by category (exact).

    Args:
        facts: the model's facts.

    Returns:
        The counts.
    """
    by_category = {c: 0 for c in CATEGORIES}
    for t in facts.tensors:
        if t.parameter:
            by_category[t.category] += t.numel
    return ParameterCounts(
        total=sum(t.numel for t in facts.tensors if t.parameter),
        by_category=tuple((c, n) for c, n in by_category.items() if n),
        buffers=sum(t.numel for t in facts.tensors if not t.parameter),
        tied_embeddings=facts.tied,
    )


# ----------------------------------------------------------------------------- artifact formats


@dataclass(frozen=True)
class Unquantized:
    """Every tensor in floating point of ``dtype_bytes`` bytes per element."""

    dtype_bytes: int
    exact = True

    def target_bytes(self, target: _Target, packed8: bool) -> int | None:
        """Bytes of ``target`` quantized in this format, or None when the format keeps it."""
        return None

    def describe(self, dtype_name: str) -> str:
        return f"{dtype_name}, no quantization"


@dataclass(frozen=True)
class IntWeights:
    """dsq's integer weight layout (rtn, gptq, awq): compressed-tensors pack-quantized / int-quantized.

    Per matrix ``[out, in]``: 4-bit ``weight_packed`` int32 ``[out, ceil(in/8)]`` and ``weight_shape``
    int64[2]; 8-bit ``weight`` int8 ``[out, in]``, or packed int32 ``[out, ceil(in/4)]`` + shape when the
    model has quantized experts; ``weight_scale`` ``[out, groups]`` in the model dtype; asymmetric
    schemes add zero points (:func:`dsq.quantize.compressed_tensors_format.zero_point_bytes`: int32
    words packed along ``out`` in the layout the installed compressed-tensors reads, int8 otherwise).
    """

    scheme: Any  # dsq.quantize.WeightScheme
    dtype_bytes: int
    exact = True

    def target_bytes(self, target: _Target, packed8: bool) -> int | None:
        return sum(m.count * self.matrix_bytes(m.out, m.inp, packed8 or target.experts) for m in target.matrices)

    def describe(self, dtype_name: str) -> str:
        return f"{self.scheme.describe()}, scales and kept tensors {dtype_name}"

    def matrix_bytes(self, out: int, inp: int, packed8: bool) -> int:
        from dsq.quantize.compressed_tensors_format import zero_point_bytes

        groups = self.scheme.granularity.num_groups(inp)
        packed = self.scheme.bits == 4 or packed8
        total = out * groups * self.dtype_bytes + zero_point_bytes(out, inp, self.scheme, packed)
        if self.scheme.bits == 4:
            return total + 4 * out * math.ceil(inp / 8) + 16
        if packed8:
            return total + 4 * out * math.ceil(inp / 4) + 16
        return total + out * inp


@dataclass(frozen=True)
class W8A8Weights:
    """SmoothQuant/W8A8: int8 ``weight`` ``[out, in]``, fp32 ``weight_scale`` ``[out, 1]``, and with
    static activations an fp32 ``input_scale`` per module (per expert and projection for experts)."""

    static_inputs: bool
    dtype_bytes: int
    exact = True

    def target_bytes(self, target: _Target, packed8: bool) -> int | None:
        return sum(m.count * (m.out * m.inp + 4 * m.out + (4 if self.static_inputs else 0)) for m in target.matrices)

    def describe(self, dtype_name: str) -> str:
        inputs = "static fp32 input scales" if self.static_inputs else "dynamic activations"
        return f"int8 per-channel sym weights, fp32 scales, {inputs}; kept tensors {dtype_name}"


@dataclass(frozen=True)
class BnbWeights:
    """bitsandbytes (approximate): 4-bit values two per byte + fp32 absmax per block, or int8 + fp32
    row scales. Only plain Linears are converted: fused experts stay in the model dtype."""

    bits: int
    blocksize: int
    double_quant: bool
    dtype_bytes: int
    exact = False

    def target_bytes(self, target: _Target, packed8: bool) -> int | None:
        if target.experts:
            return None
        m = target.matrices[0]
        numel = m.out * m.inp
        if self.bits == 8:
            return numel + 4 * m.out
        blocks = math.ceil(numel / self.blocksize)
        absmax = blocks + 4 * math.ceil(blocks / 256) + 4 * 256 if self.double_quant else 4 * blocks
        return math.ceil(numel / 2) + absmax + 4 * 16 + 256  # + quant map and quant state

    def describe(self, dtype_name: str) -> str:
        kind = "int8 (LLM.int8)" if self.bits == 8 else f"4-bit, block {self.blocksize}"
        return f"bitsandbytes {kind}; experts and kept tensors {dtype_name} (approximate)"


ArtifactFormat = Unquantized | IntWeights | W8A8Weights | BnbWeights


def _packed8(fmt: ArtifactFormat, facts: _Facts) -> bool:
    """8-bit Linears are written packed when the model has quantized (non-W8A8) fused experts."""
    return isinstance(fmt, IntWeights) and facts.has_quantized_experts


def _artifact_bytes(facts: _Facts, fmt: ArtifactFormat) -> tuple[int, dict[int | None, int], int]:
    """Tensor bytes of the artifact in ``fmt``.

    Args:
        facts: the model's facts.
        fmt: the artifact format.

    Returns:
        ``(total bytes, bytes per decoder layer (None: outside the layers), quantized parameters)``.
    """
    packed8 = _packed8(fmt, facts)
    per_layer: dict[int | None, int] = {}
    handled: set[str] = set()
    quantized_params = 0
    for t in facts.targets:
        size = fmt.target_bytes(t, packed8) if t.quantize else None
        if size is None:
            continue
        handled.add(t.name)
        quantized_params += t.weight_params
        per_layer[t.layer] = per_layer.get(t.layer, 0) + size + t.bias * fmt.dtype_bytes
    for tensor in facts.tensors:
        if tensor.name.rpartition(".")[0] in handled:
            continue
        per_layer[tensor.layer] = per_layer.get(tensor.layer, 0) + tensor.bytes(fmt.dtype_bytes)
    return sum(per_layer.values()), per_layer, quantized_params


def _scheme_bytes(facts: _Facts, label: str, fmt: ArtifactFormat, dtype_name: str) -> SchemeBytes:
    """One row of the artifact-bytes table.

    Args:
        facts: the model's facts.
        label: row name.
        fmt: the artifact format.
        dtype_name: name of the kept tensors' dtype.

    Returns:
        The row.
    """
    total, _, quantized = _artifact_bytes(facts, fmt)
    params = sum(t.numel for t in facts.tensors if t.parameter)
    return SchemeBytes(label, fmt.describe(dtype_name), total, quantized, params - quantized, fmt.exact)


def recipe_format(config: object, dtype_bytes: int) -> ArtifactFormat:
    """The artifact format of a method config (as :func:`dsq.run.pipeline.quant_config` builds it).

    Args:
        config: an RTN/GPTQ/AWQ/W8A8/bitsandbytes config, or None (no quantization).
        dtype_bytes: bytes per element of the recipe dtype.

    Returns:
        The format.
    """
    from dsq.quantize import BnbFP4Config, BnbInt8Config, BnbNF4Config, W8A8Config
    from dsq.quantize.w8a8 import StaticPerTensor

    if config is None:
        return Unquantized(dtype_bytes)
    if isinstance(config, W8A8Config):
        return W8A8Weights(isinstance(config.activations, StaticPerTensor), dtype_bytes)
    if isinstance(config, BnbInt8Config):
        return BnbWeights(8, 0, False, dtype_bytes)
    if isinstance(config, (BnbNF4Config, BnbFP4Config)):
        return BnbWeights(4, config.blocksize, config.double_quant, dtype_bytes)
    return IntWeights(config.scheme, dtype_bytes)


def comparison_formats(dtype_name: str) -> tuple[tuple[str, ArtifactFormat, str], ...]:
    """BF16, INT8 per-channel, INT4 g128 and INT4 g32 (symmetric), kept tensors in the recipe dtype.

    Args:
        dtype_name: the recipe dtype (kept tensors and scales of the integer formats).

    Returns:
        ``(label, format, dtype of its floating-point tensors)`` triples.
    """
    from dsq.quantize import PerChannel, PerGroup, WeightScheme

    dtype_bytes = DTYPE_BYTES[dtype_name]
    return (
        ("BF16", Unquantized(2), "bfloat16"),
        ("INT8 per-channel sym", IntWeights(WeightScheme(8, PerChannel(), True), dtype_bytes), dtype_name),
        ("INT4 g128 sym", IntWeights(WeightScheme(4, PerGroup(128), True), dtype_bytes), dtype_name),
        ("INT4 g32 sym", IntWeights(WeightScheme(4, PerGroup(32), True), dtype_bytes), dtype_name),
    )


# ----------------------------------------------------------------------------- source bytes


@dataclass(frozen=True)
class _Fp8:
    """FP8 e4m3 block-scaled source weights (``quantization_config.quant_method: fp8``)."""

    block: tuple[int, int]


def fp8_source_format(config: Mapping[str, Any]) -> _Fp8 | None:
    """The FP8 block format config.json declares, or None."""
    qc = config.get("quantization_config")
    if not isinstance(qc, Mapping) or qc.get("quant_method") != "fp8":
        return None
    block = qc.get("weight_block_size") or [128, 128]
    return _Fp8((int(block[0]), int(block[1])))


def _source_dtype(config: Mapping[str, Any]) -> tuple[str, int]:
    name = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    return name, DTYPE_BYTES.get(name, 4)


def _config_source_bytes(facts: _Facts) -> tuple[int, str]:
    """Bytes of the model's tensors as the config says they are stored."""
    dtype_name, dtype_bytes = _source_dtype(facts.config)
    fp8 = fp8_source_format(facts.config)
    fp8_owners = {}
    if fp8 is not None:
        fp8_owners = {t.name: t for t in facts.targets if t.layer is not None and not _is_router(t.name)}
    total = 0
    for tensor in facts.tensors:
        target = fp8_owners.get(tensor.name.rpartition(".")[0])
        if target is not None and tensor.name.rpartition(".")[2] != "bias":
            continue
        total += tensor.bytes(dtype_bytes)
    for target in fp8_owners.values():
        total += sum(m.count * _fp8_matrix_bytes(m.out, m.inp, fp8) for m in target.matrices)
    storage = dtype_name if fp8 is None else f"FP8 e4m3 + fp32 {fp8.block[0]}x{fp8.block[1]} block scales ({dtype_name} elsewhere)"
    return total, storage


def _fp8_matrix_bytes(out: int, inp: int, fp8: _Fp8) -> int:
    return out * inp + 4 * math.ceil(out / fp8.block[0]) * math.ceil(inp / fp8.block[1])


def _mtp_estimate(facts: _Facts) -> TensorSet | None:
    """DeepSeek-V3's multi-token-prediction layers, which the published checkpoint carries and the
    transformers model does not use: a MoE decoder layer plus ``eh_proj`` (H x 2H), three norms, and
    its own copies of the embedding and the output head."""
    n = int(facts.config.get("num_nextn_predict_layers") or 0)
    if n <= 0 or not facts.layers:
        return None
    last = facts.layers[-1].index
    layer_params = sum(t.numel for t in facts.tensors if t.layer == last and t.parameter)
    h, v = facts.hidden, facts.vocab
    extra = 2 * h * h + 3 * h + 2 * v * h
    _, dtype_bytes = _source_dtype(facts.config)
    fp8 = fp8_source_format(facts.config)
    layer_bytes = _tensor_bytes((t for t in facts.tensors if t.layer == last), dtype_bytes)
    if fp8 is not None:
        weights = [t for t in facts.targets if t.layer == last and not _is_router(t.name)]
        dense = sum(t.weight_params for t in weights)
        layer_bytes += sum(m.count * _fp8_matrix_bytes(m.out, m.inp, fp8) for t in weights for m in t.matrices)
        layer_bytes -= dense * dtype_bytes
    first = len(facts.layers)
    names = tuple(f"{facts.layer_prefix}.{first + i}.*" for i in range(n))
    return TensorSet(0, n * (layer_params + extra), n * (layer_bytes + extra * dtype_bytes), names)


def _model_key(name: str) -> str:
    """The model tensor a checkpoint tensor feeds (per-expert tensors feed the fused ones)."""
    match = _EXPERT_WEIGHT.match(name)
    if match is None:
        return name
    fused = "down_proj" if match["proj"] == "down_proj" else "gate_up_proj"
    return f"{match['prefix']}.{fused}"


def _header_source(facts: _Facts, weight_files: tuple[Path, ...]) -> SourceBytes:
    """Source bytes and the cross-check of the headers against the model."""
    expected = {t.name: t.numel for t in facts.tensors}
    found: dict[str, int] = {}
    unused: list[tuple[str, int, int]] = []
    total = 0
    dtypes: set[str] = set()
    for path in weight_files:
        header, _ = read_safetensors_header(path)
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            size = entry["data_offsets"][1] - entry["data_offsets"][0]
            numel = math.prod(entry["shape"])
            total += size
            is_scale = name.endswith(_FP8_SCALE_SUFFIX)
            key = _model_key(name[: -len(_FP8_SCALE_SUFFIX)] if is_scale else name)
            if key not in expected:
                unused.append((name, 0 if is_scale else numel, size))
                continue
            if not is_scale:
                found[key] = found.get(key, 0) + numel
                dtypes.add(entry["dtype"])
    missing = [k for k in expected if k not in found] + [k for k, n in found.items() if n != expected[k]]
    return SourceBytes(
        tensor_bytes=total, from_headers=True, weight_files=len(weight_files), storage=_header_storage(dtypes, weight_files),
        header_parameters=sum(found.values()), unused=_tensor_set(unused), missing=tuple(sorted(missing)),
    )


def _header_storage(dtypes: set[str], weight_files: tuple[Path, ...]) -> str:
    names = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F8_E4M3": "FP8 e4m3"}
    described = ", ".join(sorted(names.get(d, d) for d in dtypes))
    bits = sorted({SAFETENSORS_DTYPE_BITS.get(d, 0) for d in dtypes})
    files = f"{len(weight_files)} safetensors file{'s' if len(weight_files) != 1 else ''}"
    return f"{described} ({files}{', mixed widths' if len(bits) > 1 else ''})"


def _tensor_set(entries: list[tuple[str, int, int]]) -> TensorSet | None:
    if not entries:
        return None
    names = sorted(n for n, _, _ in entries)
    return TensorSet(len(entries), sum(p for _, p, _ in entries), sum(b for _, _, b in entries), _name_patterns(names))


def _name_patterns(names: list[str]) -> tuple[str, ...]:
    """A few names, each decoder layer's tensors folded into ``model.layers.N.*``."""
    folded: list[str] = []
    for name in names:
        match = re.match(r"^(.*\.layers\.\d+)\.", name)
        short = f"{match.group(1)}.*" if match else name
        if short not in folded:
            folded.append(short)
    return tuple(folded[:MAX_EXAMPLES])


def _source_bytes(facts: _Facts, weight_files: tuple[Path, ...]) -> SourceBytes:
    """The source weights: from the headers when there are weight files, from the config otherwise.

    Args:
        facts: the model's facts.
        weight_files: the checkpoint's safetensors files (empty: config only).

    Returns:
        The source's bytes, storage and unused/missing tensors.
    """
    if weight_files:
        return _header_source(facts, weight_files)
    model_bytes, storage = _config_source_bytes(facts)
    unused = _mtp_estimate(facts)
    total = model_bytes + (unused.bytes if unused is not None else 0)
    return SourceBytes(
        tensor_bytes=total, from_headers=False, weight_files=0, storage=storage, header_parameters=None, unused=unused,
        missing=(),
    )


# ----------------------------------------------------------------------------- calibration model


@dataclass(frozen=True)
class _Calibration:
    """The calibration run a method does (None for calibration-free methods)."""

    samples: int
    seq_len: int
    batch_size: int

    @property
    def tokens(self) -> int:
        return self.samples * self.seq_len

    @property
    def batches(self) -> int:
        return math.ceil(self.samples / self.batch_size)

    @property
    def batch_tokens(self) -> int:
        return min(self.batch_size, self.samples) * self.seq_len


def _score_flops(facts: _Facts, seq_len: int) -> float:
    """Attention scores and weighted values per token (full T x T, as eager/SDPA compute them)."""
    return 2.0 * facts.heads * seq_len * (facts.qk_dim + facts.v_dim)


def _attention_flops(facts: _Facts, layer: _Layer, seq_len: int) -> float:
    return 2.0 * layer.attention_linear + _score_flops(facts, seq_len)


def _mlp_flops(facts: _Facts, layer: _Layer) -> float:
    """Routed MLP/MoE forward per token: dense or shared Linears, router, top-k experts."""
    return 2.0 * (layer.mlp_linear + layer.router + min(facts.top_k, layer.experts) * layer.expert_size)


def _routed_flops(facts: _Facts, layer: _Layer, seq_len: int) -> float:
    """One routed forward of ``layer`` per token.

    Args:
        facts: the model's facts.
        layer: the layer.
        seq_len: calibration sequence length.

    Returns:
        FLOPs per token.
    """
    return _attention_flops(facts, layer, seq_len) + _mlp_flops(facts, layer)


def _all_experts_flops(facts: _Facts, layer: _Layer, seq_len: int) -> float:
    """A statistics forward per token: the routed forward plus every expert's gate/up on every token.

    Args:
        facts: the model's facts.
        layer: the layer.
        seq_len: calibration sequence length.

    Returns:
        FLOPs per token.
    """
    gate_up = 2.0 * layer.experts * (2 * layer.expert_size / 3)
    return _routed_flops(facts, layer, seq_len) + gate_up


def _layer_targets(facts: _Facts, index: int | None) -> list[_Target]:
    return [t for t in facts.targets if t.layer == index]


def _solve_shapes(target: _Target) -> tuple[tuple[int, int, int], ...]:
    """(how many, out, K) of the weights GPTQ solves: each expert's fused gate_up ``[2I, H]`` and down."""
    if not target.experts:
        m = target.matrices[0]
        return ((1, m.out, m.inp),)
    gate, _, down = target.matrices
    return ((gate.count, 2 * gate.out, gate.inp), (down.count, down.out, down.inp))


def _gptq_stats_bytes(facts: _Facts, targets: list[_Target]) -> int:
    """Hessians of GPTQ's larger stage (attention, then MLP/experts) plus one solve's working set."""
    stages = ([t for t in targets if t.attention], [t for t in targets if not t.attention])
    peak = 0
    for stage in stages:
        quantized = [t for t in stage if t.quantize]
        keys = [(n, k) for t in quantized for n, k in t.hessian_dims]
        if any(t.experts for t in quantized):
            keys.append((1, facts.hidden))  # the experts' shared input
        peak = max(peak, sum(n * STATISTICS_BYTES * (k * k + 2 * k) for n, k in keys))
    shapes = [s for t in targets if t.quantize for s in _solve_shapes(t)]
    solve = max((2 * STATISTICS_BYTES * (out * k + k * k) for _, out, k in shapes), default=0)
    return peak + solve


def _observed_keys(targets: list[_Target]) -> list[tuple[int, int]]:
    """(how many, width) of the inputs AWQ/SmoothQuant observe: every Linear, every expert's inputs."""
    keys = [(1, t.matrices[0].inp) for t in targets if not t.experts]
    for t in targets:
        if t.experts:
            count, inter, hidden = t.matrices[0].count, t.matrices[0].out, t.matrices[0].inp
            keys += [(1, hidden), (count, hidden), (count, inter)]
    return keys


def _awq_stats_bytes(facts: _Facts, targets: list[_Target], method, calibration: _Calibration, act_bytes: int) -> int:
    """Channel vectors and sampled rows per observed input, plus the block inputs the search replays."""
    rows_per_call = math.ceil(method.search_tokens / calibration.batches)
    rows = calibration.batches * min(rows_per_call, calibration.batch_tokens)
    keys = _observed_keys(targets)
    collector = sum(n * STATISTICS_BYTES * k * (2 + rows) for n, k in keys)
    calls = min(math.ceil(method.search_tokens / calibration.batch_tokens), calibration.batches)
    replay = calls * calibration.batch_tokens * facts.hidden * (2 * act_bytes + STATISTICS_BYTES)
    return collector * (2 if method.clip else 1) + replay


def _w8a8_stats_bytes(facts: _Facts, targets: list[_Target]) -> int:
    return sum(n * STATISTICS_BYTES * 2 * k for n, k in _observed_keys(targets))


def _statistics_bytes(facts: _Facts, index: int | None, method, calibration: _Calibration | None, act_bytes: int) -> int:
    """Peak calibration statistics a method holds for one layer (or the head stage for None).

    Args:
        facts: the model's facts.
        index: decoder layer (None: modules outside the layers, e.g. lm_head).
        method: the method config (GPTQConfig, AWQConfig, W8A8Config; others hold none).
        calibration: the calibration run (None: calibration-free).
        act_bytes: bytes per activation element (the recipe dtype).

    Returns:
        Bytes.
    """
    from dsq.quantize import AWQConfig, GPTQConfig, W8A8Config

    if calibration is None:
        return 0
    targets = _layer_targets(facts, index)
    if isinstance(method, GPTQConfig):
        return _gptq_stats_bytes(facts, targets)
    if isinstance(method, AWQConfig):
        return _awq_stats_bytes(facts, targets, method, calibration, act_bytes)
    if isinstance(method, W8A8Config):
        return _w8a8_stats_bytes(facts, targets)
    return 0


def _calibration_of(recipe: Recipe, method) -> _Calibration | None:
    from dsq.quantize.calibrated import needs_calibration

    if method is None or not needs_calibration(method):
        return None
    c = recipe.quantize.calibration
    return _Calibration(samples=c.samples, seq_len=c.seq_len, batch_size=c.batch_size)


# ----------------------------------------------------------------------------- FLOPs


def _gptq_flops(facts: _Facts, method, calibration: _Calibration) -> list[tuple[str, float]]:
    """Layer forwards (one per stage, the experts' stage with every expert, one to recompute outputs),
    Hessian accumulation (2 N K^2 each), Cholesky/inverse (~2 K^3) and the column updates."""
    n = calibration.tokens
    forward = hessian = solve = 0.0
    for layer in facts.layers:
        targets = _layer_targets(facts, layer.index)
        experts_quantized = any(t.experts and t.quantize for t in targets)
        stats_pass = _all_experts_flops if experts_quantized else _routed_flops
        forward += n * (2 * _routed_flops(facts, layer, calibration.seq_len) + stats_pass(facts, layer, calibration.seq_len))
    for t in facts.targets:
        if not t.quantize:
            continue
        hessian += sum(c * 2.0 * n * k * k for c, k in t.hessian_dims)
        solve += sum(c * CHOLESKY_FLOPS * k ** 3 for c, k in t.hessian_dims)
        for m in t.matrices:
            solve += m.count * (m.out * m.inp * m.inp + 2.0 * m.out * m.inp * method.block_size)
            solve += m.count * m.out * m.inp * ROUNDING_FLOPS * (MSE_CANDIDATES if method.mse_scales else 1)
        if t.experts:
            hessian += 2.0 * n * facts.hidden ** 2  # the experts' shared input
    return [("layer forwards", forward), ("Hessians (2 N K^2)", hessian), ("GPTQ solves (K^3, out K^2)", solve)]


def _awq_flops(facts: _Facts, method, calibration: _Calibration) -> list[tuple[str, float]]:
    """Statistics forward with every expert (+1 with clip), output forward, and the scale searches:
    (grid + 2) block forwards on the searched tokens per mapping, per-expert searches on sampled rows."""
    n = calibration.tokens
    searched = min(math.ceil(method.search_tokens / calibration.batch_tokens), calibration.batches) * calibration.batch_tokens
    rows = min(method.search_tokens, n)
    forward = search = 0.0
    for layer in facts.layers:
        stats_passes = 2 if method.clip else 1
        forward += n * (_routed_flops(facts, layer, calibration.seq_len) + stats_passes * _all_experts_flops(facts, layer, calibration.seq_len))
        for b in layer.balances:
            if not b.quantized:
                continue
            if b.per_expert:
                search += layer.experts * (method.grid + 1) * 2.0 * rows * layer.expert_size / 3
                continue
            block = _attention_flops(facts, layer, calibration.seq_len) if b.attention else _mlp_flops(facts, layer)
            search += (method.grid + 2) * searched * block
    rounding = sum(t.weight_params for t in facts.targets if t.quantize) * ROUNDING_FLOPS * (MSE_CANDIDATES if method.mse_scales else 1)
    return [("layer forwards", forward), ("AWQ scale searches", search), ("rounding", float(rounding))]


def _w8a8_flops(facts: _Facts, method, calibration: _Calibration) -> list[tuple[str, float]]:
    passes = int(method.smoothquant_alpha is not None) + int(method.needs_calibration and _static(method))
    forward = sum(
        calibration.tokens * (passes * _all_experts_flops(facts, layer, calibration.seq_len) + _routed_flops(facts, layer, calibration.seq_len))
        for layer in facts.layers
    )
    return [("layer forwards", forward)]


def _static(method) -> bool:
    from dsq.quantize.w8a8 import StaticPerTensor

    return isinstance(method.activations, StaticPerTensor)


def _calibration_flops(facts: _Facts, method, calibration: _Calibration | None) -> tuple[tuple[str, float], ...]:
    """FLOPs of quantizing the model with ``method``.

    Args:
        facts: the model's facts.
        method: the method config (None: no quantization).
        calibration: the calibration run (None: calibration-free; only the rounding is counted).

    Returns:
        ``(what, FLOPs)`` pairs.
    """
    from dsq.quantize import AWQConfig, GPTQConfig, W8A8Config

    if calibration is not None:
        handlers: dict[type, Callable] = {GPTQConfig: _gptq_flops, AWQConfig: _awq_flops, W8A8Config: _w8a8_flops}
        for kind, handler in handlers.items():
            if isinstance(method, kind):
                return tuple(handler(facts, method, calibration))
    quantized = sum(t.weight_params for t in facts.targets if t.quantize) if method is not None else 0
    return (("rounding", float(quantized * ROUNDING_FLOPS)),)


# ----------------------------------------------------------------------------- memory


def _activation_bytes(facts: _Facts, calibration: _Calibration | None, act_bytes: int) -> int:
    """A layer's calibration inputs and outputs: 2 x samples x seq_len x hidden."""
    if calibration is None:
        return 0
    return 2 * calibration.tokens * facts.hidden * act_bytes


def _workspace_bytes(facts: _Facts, calibration: _Calibration | None, act_bytes: int) -> int:
    """Transients of one calibration batch: fp32 attention probabilities and the widest MLP activation."""
    if calibration is None:
        return 0
    widest = max((layer.intermediate for layer in facts.layers), default=0)
    return calibration.batch_tokens * (facts.heads * calibration.seq_len * STATISTICS_BYTES + 2 * widest * act_bytes)


def _temporary_bytes(facts: _Facts, index: int | None, method, dtype_bytes: int) -> int:
    """Transient memory of quantizing the largest tensor of one layer (or of the head stage for None).

    Every method rounds a fused experts tensor ``[E, 2I, H]`` expert by expert into one int8 tensor and
    packs it expert by expert; GPTQ and AWQ stack their per-expert results first (see
    :data:`RTN_TEMPORARY_BYTES`, :data:`EXPERT_INTEGER_BYTES`, :data:`STACK_PACK_BYTES`).

    Args:
        facts: the model's facts.
        index: decoder layer (None: modules outside the layers, e.g. lm_head).
        method: the method config (None: no quantization).
        dtype_bytes: bytes per element of the recipe dtype.

    Returns:
        Bytes.
    """
    from dsq.quantize import AWQConfig, GPTQConfig

    if method is None:
        return 0
    per_expert = isinstance(method, (GPTQConfig, AWQConfig))
    bits = getattr(getattr(method, "scheme", None), "bits", 8)
    peak = 0.0
    for t in _layer_targets(facts, index):
        if not t.quantize:
            continue
        if t.experts and per_expert:
            gate = t.matrices[0]
            peak = max(peak, 2 * gate.count * gate.out * gate.inp * STACK_PACK_BYTES[bits])
        elif t.experts:  # one expert's fp32 rounding temporaries + every expert's integers
            gate = t.matrices[0]
            one = 2 * gate.out * gate.inp * RTN_TEMPORARY_BYTES[dtype_bytes]
            peak = max(peak, one + 2 * gate.count * gate.out * gate.inp * EXPERT_INTEGER_BYTES[bits])
        else:
            peak = max(peak, t.weight_params * RTN_TEMPORARY_BYTES[dtype_bytes])
    return int(peak)


def _layer_plans(
    facts: _Facts, fmt: ArtifactFormat, method, calibration: _Calibration | None, dtype_bytes: int
) -> tuple[LayerPlan, ...]:
    _, quantized, _ = _artifact_bytes(facts, fmt)
    plans = []
    for layer in facts.layers:
        params = sum(t.numel for t in facts.tensors if t.layer == layer.index and t.parameter)
        plans.append(LayerPlan(
            index=layer.index, moe=layer.moe, parameters=params, working_bytes=_tensor_bytes((t for t in facts.tensors if t.layer == layer.index), dtype_bytes),
            quantized_bytes=quantized.get(layer.index, 0),
            statistics_bytes=_statistics_bytes(facts, layer.index, method, calibration, dtype_bytes),
            temporary_bytes=_temporary_bytes(facts, layer.index, method, dtype_bytes),
            forward_flops_per_token=_routed_flops(facts, layer, calibration.seq_len if calibration else 1),
        ))
    return tuple(plans)


def _peak_layer(layers: tuple[LayerPlan, ...]) -> LayerPlan | None:
    return max(layers, key=lambda p: p.peak_bytes, default=None)


def _memory_parts(
    facts: _Facts, layers: tuple[LayerPlan, ...], calibration: _Calibration | None, dtype_name: str, dtype_bytes: int
) -> tuple[tuple[str, int], ...]:
    """The parts that one layer at a time adds, whichever memory holds it."""
    peak = _peak_layer(layers)
    if peak is None:
        return ()
    parts = [
        (f"largest decoder layer (layer {peak.index}, {dtype_name})", peak.working_bytes),
        ("its quantized output", peak.quantized_bytes),
        ("quantization temporaries (its largest tensor)", peak.temporary_bytes),
    ]
    if calibration is not None:
        parts += [
            (f"calibration activations (2 x {calibration.samples} x {calibration.seq_len} x {facts.hidden})",
             _activation_bytes(facts, calibration, dtype_bytes)),
            ("method statistics of that layer", peak.statistics_bytes),
            (f"forward workspace (batch of {min(calibration.batch_size, calibration.samples)})",
             _workspace_bytes(facts, calibration, dtype_bytes)),
        ]
    return tuple(parts)


def _memory_estimates(
    facts: _Facts, fmt: ArtifactFormat, layers: tuple[LayerPlan, ...], method, calibration: _Calibration | None,
    dtype_name: str, dtype_bytes: int,
) -> tuple[MemoryEstimate, MemoryEstimate, MemoryEstimate]:
    """Peak memory of the in-memory path, the streaming path and the accelerator.

    Args:
        facts: the model's facts.
        fmt: the recipe's artifact format.
        layers: the layer plans.
        method: the method config (None: no quantization).
        calibration: the calibration run (None: calibration-free).
        dtype_name: the recipe dtype's name.
        dtype_bytes: its bytes per element.

    Returns:
        ``(in_memory, streaming, accelerator)``.
    """
    total, _, _ = _artifact_bytes(facts, fmt)
    model_bytes = _tensor_bytes(facts.tensors, dtype_bytes)
    outside = _tensor_bytes((t for t in facts.tensors if t.layer is None), dtype_bytes)
    head_temporary = _temporary_bytes(facts, None, method, dtype_bytes)
    largest_temporary = max([head_temporary, *(p.temporary_bytes for p in layers)])
    in_memory = [("process baseline (torch + transformers)", PROCESS_BASELINE_BYTES), (f"model ({dtype_name})", model_bytes),
                 ("quantized copy being built", total - _kept_bytes(facts, fmt)),
                 ("quantization temporaries (largest tensor)", largest_temporary)]
    if calibration is not None:
        peak = _peak_layer(layers)
        in_memory += [
            ("calibration activations", _activation_bytes(facts, calibration, dtype_bytes)),
            ("method statistics of the largest layer", peak.statistics_bytes if peak else 0),
            ("forward workspace", _workspace_bytes(facts, calibration, dtype_bytes)),
        ]
    layer_parts = _memory_parts(facts, layers, calibration, dtype_name, dtype_bytes)
    if head_temporary > sum(b for _, b in layer_parts):  # the head stage, after the layers, is the peak
        layer_parts = (("lm_head quantization temporaries (after the layers)", head_temporary),)
    streaming = [("process baseline (torch + transformers)", PROCESS_BASELINE_BYTES),
                 ("embeddings, final norm, lm_head (resident)", outside), *layer_parts]
    accelerator = [("runtime (CUDA context)", ACCELERATOR_BASELINE_BYTES), *layer_parts]
    return (
        MemoryEstimate("host, in-memory path (whole model loaded)", tuple(in_memory)),
        MemoryEstimate("host, streaming path (one decoder layer at a time)", tuple(streaming)),
        MemoryEstimate("accelerator, one decoder layer at a time", tuple(accelerator)),
    )


def _kept_bytes(facts: _Facts, fmt: ArtifactFormat) -> int:
    """Bytes of the artifact's floating-point tensors that are not part of a quantized module."""
    packed8 = _packed8(fmt, facts)
    quantized = {t.name for t in facts.targets if t.quantize and fmt.target_bytes(t, packed8) is not None}
    return _tensor_bytes((t for t in facts.tensors if t.name.rpartition(".")[0] not in quantized), fmt.dtype_bytes)


# ----------------------------------------------------------------------------- the plan


def _weight_files(root: Path) -> tuple[Path, ...]:
    """The checkpoint's safetensors files, validated (empty when the directory has no weights at all)."""
    names = [p.name for p in root.iterdir() if p.is_file()]
    has_weights = any(n.endswith((".safetensors", *PICKLE_SUFFIXES)) or n == SAFE_WEIGHTS_INDEX_NAME for n in names)
    if not has_weights:
        return ()
    return inspect_checkpoint(root).weight_files


def _read_plan_config(root: Path) -> dict[str, Any]:
    config = _read_config(root)
    if config["model_type"] not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{root / CONFIG_NAME}: unsupported model_type {config['model_type']!r}; "
            f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return config


def _recipe_line(recipe: Recipe, source: str, fmt: ArtifactFormat, calibration: _Calibration | None) -> str:
    """One line: where the recipe came from and what it does."""
    q = recipe.quantize
    if q is None:
        return f"{source}: no quantization, dtype {recipe.dtype}"
    t = q.targets
    targets = f"include {t.include}, exclude {t.exclude}, lm_head {str(t.lm_head).lower()}"
    line = f"{source}: method {q.method}, dtype {recipe.dtype}, targets {targets}"
    if isinstance(fmt, IntWeights):
        line += f", {fmt.scheme.describe()}"
    if calibration is not None:
        line += f", calibration {calibration.samples} x {calibration.seq_len} tokens (batch {calibration.batch_size})"
    return line


def _throughputs(tflops: float | None) -> tuple[tuple[str, float], ...]:
    if tflops is not None:
        if not tflops > 0:
            raise ValueError(f"tflops must be positive, got {tflops}")
        return (("given", float(tflops)),)
    return (("GPU default", DEFAULT_GPU_TFLOPS), ("CPU default", DEFAULT_CPU_TFLOPS))


def _notes(
    config: Mapping[str, Any], source: SourceBytes, config_only: bool, calibration: _Calibration | None, method,
    finetune: bool,
) -> tuple[str, ...]:
    notes = []
    quant_method = (config.get("quantization_config") or {}).get("quant_method")
    if quant_method not in (None, "fp8"):
        notes.append(f"the checkpoint is already quantized ({quant_method}): the plan describes its unquantized model; "
                     "plan the original checkpoint instead")
    if config_only:
        notes.append("no weight files: planned from config.json alone; source bytes are computed from the config")
    if source.unused is not None:
        how = "in the checkpoint" if source.from_headers else "expected in the published checkpoint (estimated from num_nextn_predict_layers)"
        notes.append(
            f"tensors {how} that the model does not use ({', '.join(source.unused.examples)}): "
            f"{_params(source.unused.parameters)} parameters, {_bytes(source.unused.bytes)}; counted separately, "
            "not loaded, not quantized, not written to the artifact"
        )
    if source.missing:
        notes.append(f"model tensors missing from the headers or of another size: {', '.join(source.missing[:MAX_EXAMPLES])}")
    if calibration is not None:
        notes.append("calibration time is an estimate: FLOPs of the dominant matmuls divided by the throughput; "
                     "reading the checkpoint and Python overhead are not counted")
    if finetune:
        notes.append("the recipe's finetune: section is not planned (training memory and time)")
    if method is not None:
        notes.append("the in-memory path also reloads the artifact with transformers for the reload check "
                     "(eval.reload_check) after quantizing; that copy is not counted")
    return tuple(notes)


def plan_checkpoint(path: str | Path, recipe: Recipe | None = None, *, tflops: float | None = None) -> Plan:
    """Plan a recipe on a checkpoint without loading any tensor data.

    Args:
        path: the checkpoint directory (config.json, and safetensors weights when present).
        recipe: the recipe (None: every default).
        tflops: throughput for the calibration time (None: :data:`DEFAULT_GPU_TFLOPS` and
            :data:`DEFAULT_CPU_TFLOPS`).

    Returns:
        The :class:`Plan`.

    Raises:
        CheckpointError: the directory, its config.json or its weight files cannot be used,
            or they disagree (the message names the file, key or tensor).
        RecipeError: the recipe does not fit the model (a sequence length beyond its positions,
            an include pattern that matches no module).
    """
    from dsq.run.pipeline import DTYPES, quant_config, target_spec
    from dsq.quantize import TargetSpec

    source_name = "recipe" if recipe is not None else "defaults"
    recipe = recipe if recipe is not None else load_recipe(None)
    root = _checkpoint_dir(path)
    config = _read_plan_config(root)
    weight_files = _weight_files(root)
    dtype_name = recipe.dtype
    dtype_bytes = DTYPE_BYTES[dtype_name]
    method = quant_config(recipe.quantize, DTYPES[dtype_name]) if recipe.quantize is not None else None
    spec = target_spec(recipe.quantize) if recipe.quantize is not None else TargetSpec()  # comparison rows
    facts = _facts(root, config, spec)
    check_recipe_against_model(recipe, model_facts(config, root / CONFIG_NAME), root / CONFIG_NAME)
    fmt = recipe_format(method, dtype_bytes)
    calibration = _calibration_of(recipe, method)
    layers = _layer_plans(facts, fmt, method, calibration, dtype_bytes)
    source = _source_bytes(facts, weight_files)
    rows = [_scheme_bytes(facts, label, f, kept_dtype) for label, f, kept_dtype in comparison_formats(dtype_name)]
    rows.append(_scheme_bytes(facts, f"recipe: {recipe.quantize.method if recipe.quantize else 'no quantization'}", fmt, dtype_name))
    in_memory, streaming, accelerator = _memory_estimates(facts, fmt, layers, method, calibration, dtype_name, dtype_bytes)
    return Plan(
        checkpoint=str(root), model_type=config["model_type"], architecture=facts.architecture, config_only=not weight_files,
        recipe=_recipe_line(recipe, source_name, fmt, calibration), method=recipe.quantize.method if recipe.quantize else None,
        parameters=_parameter_counts(facts), layers=layers, source=source, schemes=tuple(rows), in_memory=in_memory,
        streaming=streaming, accelerator=accelerator,
        time=TimeEstimate(_calibration_flops(facts, method, calibration), _throughputs(tflops)),
        notes=_notes(config, source, not weight_files, calibration, method, recipe.finetune is not None),
    )


# ----------------------------------------------------------------------------- rendering


def _params(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return str(n)


def _bytes(n: int) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n} B"


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s"


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]], align: str) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _layer_groups(layers: tuple[LayerPlan, ...]) -> list[tuple[int, int, LayerPlan]]:
    """Runs of consecutive layers of the same kind and size: ``(first, last, plan of first)``."""
    groups: list[tuple[int, int, LayerPlan]] = []
    for p in layers:
        if groups:
            first, last, ref = groups[-1]
            same = (ref.moe, ref.parameters, ref.quantized_bytes, ref.peak_bytes) == (
                p.moe, p.parameters, p.quantized_bytes, p.peak_bytes)
            if same and last == p.index - 1:
                groups[-1] = (first, p.index, ref)
                continue
        groups.append((p.index, p.index, p))
    return groups


def _parameter_lines(plan: Plan) -> list[str]:
    total = plan.parameters.total
    rows = [(name, _params(n), f"{100 * n / total:.1f}%") for name, n in plan.parameters.by_category]
    rows.append(("**total**", f"**{_params(total)}**", "100%"))
    if plan.source.unused is not None:
        rows.append(("not used by the model (not quantized)", _params(plan.source.unused.parameters), "-"))
    lines = ["## Parameters", "", *_table(("category", "parameters", "share"), rows, "lrr")]
    extra = []
    if plan.parameters.buffers:
        extra.append(f"plus {plan.parameters.buffers:,} elements of saved buffers (router score bias)")
    if plan.parameters.tied_embeddings:
        extra.append("lm_head is tied to the input embedding (stored once)")
    if plan.source.header_parameters is not None:
        expected = total + plan.parameters.buffers
        verdict = "matches the model" if plan.source.header_parameters == expected and not plan.source.missing else "DIFFERS from the model"
        extra.append(f"safetensors headers: {plan.source.header_parameters:,} elements of the tensors the model uses ({verdict})")
    return lines + ([""] + [f"- {e}" for e in extra] if extra else [])


def _layer_lines(plan: Plan) -> list[str]:
    rows = []
    for first, last, p in _layer_groups(plan.layers):
        span = str(first) if first == last else f"{first}-{last}"
        rows.append((span, "MoE" if p.moe else "dense", _params(p.parameters), _bytes(p.working_bytes),
                     _bytes(p.quantized_bytes), _bytes(p.statistics_bytes), _bytes(p.temporary_bytes)))
    header = ("layers", "MLP", "parameters each", "working bytes each", "quantized each", "statistics each",
              "temporaries each")
    return ["## Decoder layers", "", *_table(header, rows, "llrrrrr")]


def _bytes_lines(plan: Plan) -> list[str]:
    src = plan.source
    origin = "safetensors headers" if src.from_headers else "computed from config.json"
    rows = [(f"source ({origin})", src.storage, _bytes(src.tensor_bytes), "1.00")]
    for s in plan.schemes:
        mark = "" if s.exact else " (approx.)"
        rows.append((s.label + mark, s.description, _bytes(s.tensor_bytes), f"{s.tensor_bytes / max(1, src.tensor_bytes):.2f}"))
    return ["## Weights on disk", "", *_table(("weights", "stored as", "bytes", "vs source"), rows, "llrr")]


def _memory_lines(plan: Plan) -> list[str]:
    lines = ["## Peak memory (estimate)", "",
             *_table(("where", "peak"), [(m.label, _bytes(m.total)) for m in (plan.in_memory, plan.streaming, plan.accelerator)], "lr")]
    for m in (plan.in_memory, plan.streaming, plan.accelerator):
        lines += ["", f"{m.label}:", ""]
        lines += [f"- {what}: {_bytes(b)}" for what, b in m.parts if b]
    return lines


def _time_lines(plan: Plan) -> list[str]:
    t = plan.time
    rows = [(what, f"{f:.3g}") for what, f in t.flops]
    rows.append(("**total**", f"**{t.total_flops:.3g}**"))
    lines = ["## Calibration compute (estimate)", "", *_table(("part", "FLOPs"), rows, "lr"), ""]
    lines += [f"- at {tflops:g} TFLOPS ({label}): {_duration(t.seconds(tflops))}" for label, tflops in t.throughputs]
    return lines


def render_markdown(plan: Plan) -> str:
    """The plan as Markdown: parameters, decoder layers, weights on disk, peak memory, calibration compute.

    Args:
        plan: a plan.

    Returns:
        The Markdown text.
    """
    head = [
        f"# Plan: {Path(plan.checkpoint).name} ({plan.model_type}, {plan.architecture})",
        "",
        f"- checkpoint: {plan.checkpoint}" + (" (config.json only)" if plan.config_only else ""),
        f"- {plan.recipe}",
        "- no tensor data was read; parameter and byte counts are exact, memory and time are estimates",
        "",
    ]
    sections = [_parameter_lines(plan), _layer_lines(plan), _bytes_lines(plan), _memory_lines(plan), _time_lines(plan)]
    body = [line for section in sections for line in (*section, "")]
    notes = ["## Notes", "", *[f"- {n}" for n in plan.notes], ""] if plan.notes else []
    return "\n".join(head + body + notes)
