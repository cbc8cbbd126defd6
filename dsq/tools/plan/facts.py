"""The facts a plan needs from the model, taken once from the model built on the ``meta`` device."""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dsq.core.checkpoint import CONFIG_NAME
from dsq.core.errors import CheckpointError
from dsq.quantize.scheme import WeightScheme

from .categories import CATEGORIES, ROUTER, ParameterCounts, category, is_router


@dataclass(frozen=True)
class Matrix:
    """``count`` weight matrices of ``out x inp`` as the artifact stores them (one per expert)."""

    count: int
    out: int
    inp: int


@dataclass(frozen=True)
class Target:
    """A quantizable module (a Linear or fused experts) and the recipe's decision for it.

    Attributes:
        hessian_dims: ``(how many, K)`` of the inputs GPTQ keeps a K x K Hessian for.
        source_unscaled: a published FP8 checkpoint stores this Linear in the model dtype, without
            block scales: transformers lists it in ``_keep_in_fp32_modules`` so that its FP8 loader
            leaves it alone (DeepSeek-V3.2's ``indexer.weights_proj``; DeepSeek-V4's compressor and
            indexer projections).
    """

    name: str
    layer: int | None
    quantize: bool
    experts: bool
    attention: bool
    matrices: tuple[Matrix, ...]
    hessian_dims: tuple[tuple[int, int], ...]
    params: int
    bias: int
    source_unscaled: bool = False
    scheme: WeightScheme | None = None  # a per-module scheme rule's scheme (None: the method's)

    @property
    def weight_params(self) -> int:
        return sum(m.count * m.out * m.inp for m in self.matrices)

    @property
    def shapes(self) -> tuple[tuple[int, int, int], ...]:
        """``(count, out, in)`` of every matrix (:data:`dsq.quantize.cost.Matrices`)."""
        return tuple((m.count, m.out, m.inp) for m in self.matrices)


@dataclass(frozen=True)
class SavedTensor:
    """One saved tensor of the model (parameter or persistent buffer).

    Attributes:
        fp32: loaded in float32 when the model dtype is bfloat16 (transformers' ``_keep_in_fp32_modules_strict``).
        integer_bytes: bytes per element of an integer table, whatever the model dtype (DeepSeek-V4's
            hash-routing ``tid2eid``: int64); None for floating-point tensors.
    """

    name: str
    numel: int
    category: str
    layer: int | None
    parameter: bool
    fp32: bool
    integer_bytes: int | None = None

    def bytes(self, dtype_bytes: int) -> int:
        """Bytes of this tensor when floating-point tensors take ``dtype_bytes`` bytes per element."""
        if self.integer_bytes is not None:
            return self.numel * self.integer_bytes
        return self.numel * (4 if self.fp32 else dtype_bytes)


def tensor_bytes(tensors: Iterable[SavedTensor], dtype_bytes: int) -> int:
    """Bytes of ``tensors`` in floating point of ``dtype_bytes`` bytes per element."""
    return sum(t.bytes(dtype_bytes) for t in tensors)


@dataclass(frozen=True)
class Balance:
    """An AWQ balance mapping resolved on a layer: the block it searches on, and whether per expert."""

    attention: bool
    per_expert: bool
    quantized: bool


@dataclass(frozen=True)
class Indexer:
    """A sparse-attention indexer: ``heads`` query heads of ``head_dim`` scored against one key per
    ``rate`` source tokens (DeepSeek-V3.2's DSA lightning indexer: every token, rate 1; DeepSeek-V4's
    CSA indexer: its compressed entries, rate 4). Its projections are Linears of the layer."""

    heads: int
    head_dim: int
    rate: int


@dataclass(frozen=True)
class LayerShape:
    """Shapes of one decoder layer that memory and FLOPs depend on.

    Attributes:
        attention_linear: weight elements of the attention Linears (compressors and indexers included).
        mlp_linear: weight elements of the dense / shared-expert Linears.
        experts: routed experts.
        expert_size: elements of one expert (gate + up + down).
        intermediate: widest MLP intermediate (dense or one expert).
        compress_rate: source tokens per compressed KV entry the attention adds to its keys
            (DeepSeek-V4: 4 for CSA, 128 for HCA layers; 0: none).
        indexer: the layer's sparse-attention indexer, if any.
        mixer_params: elements of the matrices that mix hyper-connection streams (DeepSeek-V4's
            ``attn_hc.fn`` and ``ffn_hc.fn``, ``[(2 + n) n, n H]`` each), applied to every token.
        attention_type: transformers' name of the layer's attention (``config.layer_types``, e.g. DeepSeek-V4's
            ``compressed_sparse_attention``); empty when the config has none.
    """

    index: int
    moe: bool
    attention_linear: int
    mlp_linear: int
    router: int
    experts: int
    expert_size: int
    intermediate: int
    balances: tuple[Balance, ...]
    compress_rate: int = 0
    indexer: Indexer | None = None
    mixer_params: int = 0
    attention_type: str = ""

    def keys(self, seq_len: int) -> int:
        """Keys each query scores at calibration length ``seq_len``: every token (eager attention computes
        the full ``T x T`` scores, a sliding window only masks them), plus the compressed entries."""
        return seq_len + (seq_len // self.compress_rate if self.compress_rate else 0)


@dataclass(frozen=True)
class CheckpointKeys:
    """transformers' loader renaming: the model state-dict key a checkpoint tensor loads into.

    ``from_pretrained`` renames every checkpoint key with the model's ``conversion_mapping`` (renamings, then at
    most one converter) and adds or strips the base-model prefix (``core_model_loading.rename_source_key``).
    DeepSeek-V4's official names (``layers.0.attn.wq_a.weight``, ``embed.weight``, per-expert
    ``layers.0.ffn.experts.7.w1.weight`` -> fused ``model.layers.0.mlp.experts.gate_up_proj``) and DeepSeek-V3's
    per-expert tensors both resolve this way.

    Attributes:
        renamings: the model's ``WeightRenaming`` transforms.
        converters: its ``WeightConverter`` transforms.
        prefix: ``base_model_prefix``.
        keys: the model's state-dict keys.
    """

    renamings: tuple[Any, ...] = field(repr=False)
    converters: tuple[Any, ...] = field(repr=False)
    prefix: str | None
    keys: Mapping[str, bool] = field(repr=False)

    def model_key(self, name: str) -> str:
        """The model key checkpoint tensor ``name`` loads into (itself when nothing renames it)."""
        from transformers.core_model_loading import rename_source_key

        renamed, _ = rename_source_key(name, list(self.renamings), list(self.converters), self.prefix, self.keys)
        if renamed not in self.keys and name in self.keys:  # as the loader: a model key is not renamed
            return name
        return renamed


def _checkpoint_keys(model: torch.nn.Module) -> CheckpointKeys:
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    transforms = get_model_conversion_mapping(model)
    keys = dict.fromkeys(model.state_dict(keep_vars=True), True)
    return CheckpointKeys(tuple(t for t in transforms if isinstance(t, WeightRenaming)),
                          tuple(t for t in transforms if isinstance(t, WeightConverter)),
                          getattr(model, "base_model_prefix", None) or None, keys)


@dataclass(frozen=True)
class ModelFacts:
    """Everything the plan needs from the model.

    Attributes:
        residual_streams: hyper-connection streams the residual carries (DeepSeek-V4's ``hc_mult``; 1 otherwise).
        checkpoint_keys: how checkpoint tensor names map to the model's (None: by identity).
    """

    config: Mapping[str, Any]
    architecture: str
    hidden: int
    vocab: int
    heads: int
    qk_dim: int
    v_dim: int
    top_k: int
    layer_prefix: str
    tensors: tuple[SavedTensor, ...]
    targets: tuple[Target, ...]
    layers: tuple[LayerShape, ...]
    tied: bool
    residual_streams: int = 1
    checkpoint_keys: CheckpointKeys | None = field(default=None, compare=False)

    @property
    def residual_width(self) -> int:
        """Elements per token of the hidden states between decoder layers: ``hidden``, times the
        hyper-connection streams of DeepSeek-V4 (``hc_mult``: its layers read and write ``[B, S, n, H]``)."""
        return self.residual_streams * self.hidden

    @property
    def has_quantized_experts(self) -> bool:
        return any(t.experts and t.quantize for t in self.targets)

    def layer_targets(self, index: int | None) -> list[Target]:
        """The targets of decoder layer ``index`` (None: those outside the layers, e.g. lm_head)."""
        return [t for t in self.targets if t.layer == index]


def _layer_index(name: str, prefix: str) -> int | None:
    if not name.startswith(prefix + "."):
        return None
    head = name[len(prefix) + 1:].split(".", 1)[0]
    return int(head) if head.isdigit() else None


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


def _unscaled_source_modules(model: torch.nn.Module) -> tuple[str, ...]:
    """Module name suffixes that FP8 checkpoints keep in high precision (transformers' ``_keep_in_fp32_modules``:
    its FP8 loader leaves a module alone when its name ends with one, ``should_convert_module``)."""
    return tuple(sorted(getattr(model, "_keep_in_fp32_modules", None) or ()))


def _targets(model: torch.nn.Module, spec: Any, layer_prefix: str) -> tuple[Target, ...]:
    """Every quantizable module with the recipe's decision (dsq's own target selection)."""
    from dsq.quantize.targets import select_targets

    unscaled = _unscaled_source_modules(model)
    found = []
    for d in select_targets(model, spec):
        layer = _layer_index(d.name, layer_prefix)
        params = sum(p.numel() for p in d.module.parameters())
        if d.kind == "experts":
            count, double_inter, hidden = d.module.gate_up_proj.shape  # [E, 2I, H]
            inter = double_inter // 2
            matrices = (Matrix(count, inter, hidden), Matrix(count, inter, hidden), Matrix(count, hidden, inter))
            found.append(Target(d.name, layer, d.quantize, True, False, matrices, ((count, hidden), (count, inter)), params, 0,
                                scheme=d.scheme))
        else:
            out, inp = d.module.weight.shape
            bias = d.module.bias.numel() if d.module.bias is not None else 0
            attention = ".self_attn." in d.name
            found.append(Target(d.name, layer, d.quantize, False, attention, (Matrix(1, out, inp),), ((1, inp),), params, bias,
                                source_unscaled=d.name.endswith(unscaled) if unscaled else False, scheme=d.scheme))
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


def _saved_tensors(model: torch.nn.Module, expert_modules: set[str], layer_prefix: str) -> tuple[SavedTensor, ...]:
    """Parameters (tied ones once) and persistent buffers: what the weight files hold."""
    params = dict(model.named_parameters())
    all_param_names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    state = dict(model.state_dict(keep_vars=True))
    keep_fp32 = _kept_fp32_pattern(model)
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}

    def saved(name: str, tensor: torch.Tensor, parameter: bool) -> SavedTensor:
        fp32 = keep_fp32 is not None and keep_fp32.search(name) is not None
        integer = None if tensor.dtype.is_floating_point else tensor.element_size()
        return SavedTensor(name, tensor.numel(), category(name, expert_modules, linears), _layer_index(name, layer_prefix),
                           parameter, fp32, integer)

    tensors = [saved(n, p, True) for n, p in params.items()]
    tensors += [saved(n, t, False) for n, t in state.items() if n not in all_param_names]
    return tuple(tensors)


def _balances(layer: torch.nn.Module, prefix: str, quantized: set[str]) -> tuple[Balance, ...]:
    """AWQ/SmoothQuant balance mappings of a layer (dsq's own mapping table)."""
    from dsq.quantize.mappings import resolve

    found = []
    for m in resolve(layer):
        attention = m.smooth == "input_layernorm" or m.smooth.startswith("self_attn.")
        names = [m.smooth] if m.per_expert else list(m.balance)
        found.append(Balance(attention, m.per_expert, any(f"{prefix}.{n}" in quantized for n in names)))
    return tuple(found)


def _compress_rate(layer: torch.nn.Module) -> int:
    """Source tokens per compressed KV entry of the layer's attention (DeepSeek-V4's ``self_attn.compressor``; 0: none)."""
    compressor = getattr(getattr(layer, "self_attn", None), "compressor", None)
    return int(getattr(compressor, "compress_rate", 0) or 0) if compressor is not None else 0


def _indexer(layer: torch.nn.Module) -> Indexer | None:
    """The layer's sparse-attention indexer (a module whose class name ends in ``Indexer``: DeepSeek-V3.2's
    ``self_attn.indexer``, DeepSeek-V4's ``self_attn.compressor.indexer``), or None."""
    for module in layer.modules():
        if type(module).__name__.endswith("Indexer"):
            heads = getattr(module, "num_heads", None) or module.n_heads
            return Indexer(int(heads), int(module.head_dim), int(getattr(module, "compress_rate", 1) or 1))
    return None


def _mixer_params(layer: torch.nn.Module) -> int:
    """Elements of the layer's hyper-connection mixing matrices (modules whose class name ends in ``HyperConnection``)."""
    return sum(m.fn.numel() for m in layer.modules() if type(m).__name__.endswith("HyperConnection"))


def _attention_type(config: Any, index: int) -> str:
    types = getattr(config, "layer_types", None) or ()
    return str(types[index]) if index < len(types) else ""


def _layer_shape(index: int, layer: torch.nn.Module, prefix: str, targets: tuple[Target, ...],
                 tensors: tuple[SavedTensor, ...], attention_type: str) -> LayerShape:
    mine = [t for t in targets if t.layer == index]
    experts = [t for t in mine if t.experts]
    linears = [t for t in mine if not t.experts]
    router = sum(t.numel for t in tensors if t.layer == index and t.category == ROUTER and t.parameter)
    quantized = {t.name for t in mine if t.quantize}
    count = experts[0].matrices[0].count if experts else 0
    expert_size = sum(m.out * m.inp for m in experts[0].matrices) if experts else 0
    widths = [m.out for t in linears if ".mlp." in t.name for m in t.matrices] + [m.out for t in experts for m in t.matrices[:1]]
    return LayerShape(
        index=index,
        moe=bool(experts),
        attention_linear=sum(t.weight_params for t in linears if t.attention),
        mlp_linear=sum(t.weight_params for t in linears if not t.attention and not is_router(t.name)),
        router=router,
        experts=count,
        expert_size=expert_size,
        intermediate=max(widths, default=0),
        balances=_balances(layer, f"{prefix}.{index}", quantized),
        compress_rate=_compress_rate(layer),
        indexer=_indexer(layer),
        mixer_params=_mixer_params(layer),
        attention_type=attention_type,
    )


def _head_dims(config: Mapping[str, Any], hidden: int, heads: int) -> tuple[int, int]:
    """(query/key head dim, value head dim): MLA's from its config, otherwise ``head_dim``."""
    head_dim = config.get("head_dim") or hidden // max(1, heads)
    if config.get("qk_nope_head_dim") is not None and config.get("qk_rope_head_dim") is not None:
        qk = config["qk_nope_head_dim"] + config["qk_rope_head_dim"]
        return qk, config.get("v_head_dim") or qk
    return head_dim, head_dim


def model_facts(root: Path, config: Mapping[str, Any], spec: Any) -> ModelFacts:
    """Build the meta-device model of ``root``'s config.json and take the plan's facts from it.

    Args:
        root: the checkpoint directory.
        config: its parsed config.json.
        spec: the recipe's :class:`~dsq.quantize.TargetSpec`.

    Returns:
        The facts.

    Raises:
        CheckpointError: transformers cannot build a model from the config.
    """
    from dsq.core.layout import decoder_layers

    model = _build_meta_model(root)
    layer_prefix, layers = decoder_layers(model)
    targets = _targets(model, spec, layer_prefix)
    expert_modules = {t.name for t in targets if t.experts}
    tensors = _saved_tensors(model, expert_modules, layer_prefix)
    shapes = tuple(_layer_shape(i, layer, layer_prefix, targets, tensors, _attention_type(model.config, i))
                   for i, layer in enumerate(layers))
    hidden = int(model.config.hidden_size)
    heads = int(model.config.num_attention_heads)
    qk_dim, v_dim = _head_dims(config, hidden, heads)
    lm_head = model.get_output_embeddings()
    tied = lm_head is not None and lm_head.weight is model.get_input_embeddings().weight
    return ModelFacts(
        config=config, architecture=type(model).__name__, hidden=hidden, vocab=int(model.config.vocab_size), heads=heads,
        qk_dim=qk_dim, v_dim=v_dim, top_k=int(getattr(model.config, "num_experts_per_tok", 0) or 0),
        layer_prefix=layer_prefix, tensors=tensors, targets=targets, layers=shapes, tied=bool(tied),
        residual_streams=int(getattr(model.config, "hc_mult", 1) or 1), checkpoint_keys=_checkpoint_keys(model),
    )


def parameter_counts(facts: ModelFacts) -> ParameterCounts:
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
        integer_buffers=sum(t.numel for t in facts.tensors if not t.parameter and t.integer_bytes is not None),
    )
