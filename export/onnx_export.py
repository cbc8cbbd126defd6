"""Export a causal LM (fp or dsq-quantized) to an ONNX decoder with KV cache, and prove it matches.

``export_onnx(model, tokenizer, output, ExportConfig())``:

1. copies the model and swaps its quantized modules and fused experts for export forms
   (:func:`dsq.export.modules.prepare_for_export`: ``MatMulNBits`` from dsq's own integers, int8
   matmuls, every routed expert in the graph, each token running only its top-k experts: one ONNX Runtime
   ``MoE`` / ``QMoE`` node per MoE layer where that op carries the layer exactly (``ExportConfig(moe_op=True)``,
   the default), the sparse subgraph elsewhere, every expert on every token with
   ``ExportConfig(dense_experts=True)``), and folds MLA's ``kv_b_proj`` into the attention
   (:mod:`dsq.export.mla`) unless ``ExportConfig(absorb_mla=False)``;
2. traces :class:`~dsq.export.decoder.FlatDecoder` with ``torch.onnx.export(dynamo=True)`` (dynamic
   batch, sequence and past lengths), writing the weights as external data (no 2 GB protobuf limit);
3. opens the graph in ONNX Runtime and validates it against the original torch model
   (:mod:`dsq.export.validate`); a mismatch raises :class:`~dsq.core.errors.ExportError`;
4. writes ``export_manifest.json`` (layout, ops, validation figures), ``genai_config.json`` and the
   tokenizer, all in a temporary directory renamed into place at the end.

A model with a quantized KV cache (:mod:`dsq.quantize.kv_cache`) is exported with an fp32 cache: the graph
is traced, and validated against the model, with its KV-cache quantization switched off, and the manifest's
``kv_cache`` entry says that the artifact's ``kv_cache_scheme`` is not carried.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dsq import __version__
from dsq.core.atomic import atomic_directory
from dsq.core.manifest import sha256_file, versions
from dsq.core.errors import ExportError

from dsq.quantize.kv_cache import KVCacheScheme, kv_cache_quantization_off, kv_cache_scheme_of
from dsq.quantize.w8a8 import DynamicPerTensor, DynamicPerToken

from .cpu_target import PORTABLE, CpuTarget, missing_features
from .decoder import CacheLayout, FlatDecoder, cache_layout, empty_past, input_names, output_names
from .genai import write_genai_config
from .int8_prefill import Int8Prefill, PromptActivations, add_int8_prefill
from .mla import absorb_latent_projections_, absorbed_forward
from .modules import ExportPlan, prepare_for_export, quantize_embedding_, translation_table
from .patches import traceable
from .portable import rewrite_matmul_nbits
from .runtime import EXPORT_MANIFEST, ONNX_FILE, OPSET_RUNTIME, OrtCausalLM, ort_module, runtime_refusal
from .support import onnx_unsupported
from .validate import ACTIVATION_QUANTIZED_TOLERANCE, FP_TOLERANCE, QUANTIZED_TOLERANCE, ValidationConfig, ValidationReport, validate_export

log = logging.getLogger(__name__)

OPSETS = tuple(OPSET_RUNTIME)  # 21, 23
DEFAULT_OPSET = 23
DATA_FILE = ONNX_FILE + ".data"
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
INT8_COMPUTE_LEVEL = 4


@dataclass(frozen=True)
class MatMulNBitsWeights:
    """Weight-only layers as ``com.microsoft::MatMulNBits`` (ONNX Runtime; fast kernels)."""

    op: str = "com.microsoft::MatMulNBits"


@dataclass(frozen=True)
class DequantizeLinearWeights:
    """Weight-only layers as blocked ``DequantizeLinear`` (uint4/uint8, opset 21 on) + ``MatMul``: standard ONNX."""

    op: str = "DequantizeLinear"


WeightFormat = MatMulNBitsWeights | DequantizeLinearWeights


@dataclass(frozen=True)
class ExportConfig:
    """How to export.

    Attributes:
        accuracy_level: ``MatMulNBits`` compute type (ONNX Runtime: 0 unset = fp32 inputs, 1 fp32,
            2 fp16, 3 bf16, 4 int8 activations). Parity figures are stated at this level. Independent of
            ``cpu_target``: level 4 is faster on VNNI CPUs but moves logits by up to ~1.7 on the bundled
            model, past the W8A8 tolerance, so it stays the caller's choice.
        cpu_target: the CPU class the graph's int8 kernels are chosen for (:mod:`dsq.export.cpu_target`):
            ``PORTABLE`` (u8 x u8, exact on any CPU) or ``VNNI`` (u8 x s8, exact and fast with AVX512-VNNI,
            AVX-VNNI or AMX). Recorded in the manifest; the export warns when this CPU lacks what it needs.
        validation: shapes and tolerance of the ORT-vs-torch check.
        threads: ORT intra-op threads for validation (None: ORT's default).
        weights: :class:`MatMulNBitsWeights` (default) or :class:`DequantizeLinearWeights` (portable).
        quantize_embeddings: store the input embedding int8 (one scale per row); the validation
            reference gets the same rounded table, and the evaluation measures the change.
        dense_experts: run every routed expert on every token, mixed with a dense routing weight
            (E / k times the routed FLOPs), instead of the default sparse form where each token runs
            only its top-k experts. Both give the same logits within float rounding.
        absorb_mla: MLA models attend in the cached latent space, ``kv_b_proj`` folded into the query
            and the attention output (:mod:`dsq.export.mla`), instead of re-expanding every cached latent
            into keys and values of every head at every step. Same logits within float rounding.
        moe_op: each routed-experts layer becomes one ONNX Runtime ``com.microsoft::MoE`` (fp32) or
            ``QMoE`` (int4 per channel or groups of 16..128 and int8 per channel, symmetric or not) node
            (:mod:`dsq.export.moe_op`) wherever that op carries it exactly on the installed onnxruntime's CPU
            EP (checked once per layout); the other layers keep the sparse form and the manifest's
            ``routed_experts`` entry says why (``moe_op_refused``). ``dense_experts=True`` wins; the portable
            ``DequantizeLinearWeights`` format never uses it. Same logits within float rounding.
        opset: the ONNX opset of the graph. 23 (default): Llama / Qwen2 attention is one standard ``Attention``
            node per layer (grouped key/value heads read as cached; absorbed MLA keeps its matmuls, which fold
            every head onto the one latent head), RMS norms are ``RMSNormalization`` and rotary embeddings
            ``RotaryEmbedding`` (fused by the exporter where the model's code has their pattern); needs a runtime
            with opset 23 (ONNX Runtime >= 1.23). 21: the same function from elementary ops (MatMul, Softmax,
            ...), for older runtimes. Recorded in the manifest.
        int8_prefill: None (default), or how prompt activations are rounded (``DynamicPerToken()`` or
            ``DynamicPerTensor()`` of :mod:`dsq.quantize.w8a8`): weight-only (``MatMulNBits``) layers then also get an
            int8 form that prompts run on, through the u8 x s8 int8 GEMM (:mod:`dsq.export.int8_prefill`: the graph
            switches on the number of new tokens); single-token steps keep ``MatMulNBits``. Faster prompts where the
            int8 GEMM outruns the n-bit kernel (AMX), for about 1 byte per weight more in the file and the session.
            Needs ``cpu_target`` ``VNNI`` and ``MatMulNBitsWeights``; held to the int8-activation tolerance. Recorded
            in the manifest.
    """

    accuracy_level: int = 0
    cpu_target: CpuTarget = PORTABLE
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    threads: int | None = None
    weights: WeightFormat = MatMulNBitsWeights()
    quantize_embeddings: bool = False
    dense_experts: bool = False
    absorb_mla: bool = True
    moe_op: bool = True
    opset: int = DEFAULT_OPSET
    int8_prefill: PromptActivations | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.cpu_target, CpuTarget):
            raise TypeError(f"cpu_target must be a dsq.export.cpu_target.CpuTarget (PORTABLE, VNNI), got {self.cpu_target!r}")
        if self.accuracy_level not in ACCURACY_LEVELS:
            raise ValueError(f"accuracy_level must be one of {ACCURACY_LEVELS}, got {self.accuracy_level!r}")
        if self.opset not in OPSETS:
            raise ValueError(f"opset must be one of {OPSETS}, got {self.opset!r}")
        if not isinstance(self.weights, (MatMulNBitsWeights, DequantizeLinearWeights)):
            raise ValueError(f"weights must be MatMulNBitsWeights() or DequantizeLinearWeights(), got {self.weights!r}")
        for flag in ("dense_experts", "absorb_mla", "moe_op"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        if self.int8_prefill is not None and not isinstance(self.int8_prefill, (DynamicPerToken, DynamicPerTensor)):
            raise TypeError(f"int8_prefill must be None, DynamicPerToken() or DynamicPerTensor(), got {self.int8_prefill!r}")
        if self.int8_prefill is not None and not self.cpu_target.signed_int8_weights:
            raise ValueError(f"int8_prefill runs prompts on the u8 x s8 int8 kernel, which is exact only with VNNI or AMX: "
                             f"it needs cpu_target vnni, got {self.cpu_target.name!r}")
        if self.int8_prefill is not None and isinstance(self.weights, DequantizeLinearWeights):
            raise ValueError("int8_prefill switches MatMulNBits layers; the portable DequantizeLinear weight format has none")


@dataclass
class ExportResult:
    """What an export produced: where, which ops, the validation figures and how long it took."""

    path: Path
    layout: CacheLayout
    plan: ExportPlan
    validation: ValidationReport
    seconds: float
    onnx_bytes: int
    accuracy_level: int
    ops: dict[str, int]
    weight_op: str
    cpu_target: str = "portable"  # CpuTarget.name the graph's int8 kernels were chosen for
    int8_prefill: Int8Prefill | None = None  # the int8 prompt form of the weight-only layers, when asked for

    @property
    def onnx_path(self) -> Path:
        return self.path / ONNX_FILE


def _example_inputs(layout: CacheLayout, vocab: int) -> tuple:
    """A decode-like example (past 3, seq 5, batch 2): every axis is traced as dynamic."""
    batch, seq, past = 2, 5, 3
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    pos = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    return ids, mask, pos, *[torch.randn_like(t) for t in empty_past(layout, batch, past)]


def _dynamic_shapes(layout: CacheLayout) -> tuple:
    dim = torch.export.Dim
    batch, seq, past, total = dim("batch"), dim("sequence"), dim("past_sequence"), dim("total_sequence")
    cache = tuple({0: batch, 2: past} for _ in range(2 * layout.num_layers))
    return ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq}, cache)


@contextlib.contextmanager
def _quiet_exporter():
    """torch's exporter logs a warning per optional op library it lacks (torchvision); keep errors only."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _trace(model: nn.Module, layout: CacheLayout, vocab: int, path: Path, opset: int) -> None:
    decoder = FlatDecoder(model, layout).eval()
    with torch.no_grad(), _quiet_exporter(), traceable(model), absorbed_forward(model):
        try:
            program = torch.onnx.export(
                decoder, _example_inputs(layout, vocab), None, dynamo=True, opset_version=opset,
                input_names=input_names(layout), output_names=output_names(layout),
                dynamic_shapes=_dynamic_shapes(layout), custom_translation_table=translation_table(), verbose=False,
            )
        except Exception as exc:  # torch's exporter raises many types; name the stage
            raise ExportError(f"torch.onnx.export failed: {type(exc).__name__}: {str(exc)[:2000]}") from exc
    program.save(str(path), external_data=True)


def _op_counts(path: Path) -> dict[str, int]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    counts: dict[str, int] = {}
    for node in graph.node:
        key = f"{node.domain}::{node.op_type}" if node.domain else node.op_type
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def _to_portable(path: Path) -> None:
    """Rewrite the saved graph's MatMulNBits nodes as DequantizeLinear + MatMul, in place."""
    import onnx

    model = onnx.load(str(path), load_external_data=True)
    rewrite_matmul_nbits(model)
    _resave(model, path)


def _resave(model, path: Path) -> None:
    """Replace the graph at ``path`` (and its external data) with ``model``."""
    import onnx

    for p in path.parent.iterdir():
        if p.name.startswith(ONNX_FILE):
            p.unlink()
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=1024)


def _add_int8_prefill(path: Path, activations: PromptActivations) -> Int8Prefill:
    """Give the saved graph's MatMulNBits layers their int8 prompt form, in place."""
    import onnx

    model = onnx.load(str(path), load_external_data=True)
    try:
        added = add_int8_prefill(model, activations)
    except ValueError as exc:
        raise ExportError(f"int8_prefill: {exc}") from None
    _resave(model, path)
    return added


def _check_plan_in_graph(plan: ExportPlan, counts: dict[str, int], weights: WeightFormat) -> None:
    """Every module the plan swapped must have reached the graph as its op."""
    for op, modules in ((weights.op, plan.nbits), (plan.int8_op, plan.int8)):
        # an experts module becomes 2 matmuls (gate_up, down) per expert, or is inside one fused MoE / QMoE node
        needed = sum(0 if name in plan.fused else 2 * plan.experts[name] if name in plan.experts else 1 for name in modules)
        got = counts.get(op, 0)
        if got != needed:
            raise ExportError(f"the graph has {got} {op} nodes where {needed} quantized weights were exported")
    for form, op in (("ort_moe", "com.microsoft::MoE"), ("ort_qmoe", "com.microsoft::QMoE")):
        needed = sum(f == form for f in plan.fused.values())
        if counts.get(op, 0) != needed:
            raise ExportError(f"the graph has {counts.get(op, 0)} {op} nodes where {needed} routed-experts layers were fused")


def _int8_activations(plan: ExportPlan, config: ExportConfig) -> bool:
    """The graph rounds activations to int8 at run time: W8A8, MatMulNBits at accuracy level 4 (per block), or
    weight-only layers with an int8 prompt form."""
    int8_weight_only = config.accuracy_level == INT8_COMPUTE_LEVEL or config.int8_prefill is not None
    return bool(plan.int8 or (plan.nbits and int8_weight_only))


def default_tolerance(plan: ExportPlan, config: ExportConfig) -> float:
    """Max |delta logit| an export is held to: fp 1e-4, weight-only 1e-3, int8 activations 0.25."""
    if _int8_activations(plan, config):
        return ACTIVATION_QUANTIZED_TOLERANCE
    return QUANTIZED_TOLERANCE if plan.nbits else FP_TOLERANCE


def _rounding_hint(plan: ExportPlan, config: ExportConfig, validation: ValidationReport) -> str:
    """What to check when a graph with int8 activations misses only the logit tolerance (its greedy tokens agree)."""
    if not _int8_activations(plan, config) or not validation.greedy_equal:
        return ""
    raise_it = ("If the ONNX perplexity agrees with the torch model's (export.evaluate), raise the tolerance: "
                "export.validation.tolerance, or dsq export --tolerance")
    if not plan.int8:  # weight-only layers: the torch model computes them with fp32 activations
        how = "accuracy level 4" if config.accuracy_level == INT8_COMPUTE_LEVEL else "int8_prefill, for prompts"
        return (f". The greedy tokens are identical. This graph computes its weight-only layers with int8 activations "
                f"({how}) where the torch model keeps them in fp32, so its logits differ by more than rounding. " + raise_it)
    return (". The greedy tokens are identical. This graph rounds activations to int8 at run time: where a 1-ulp "
            "difference upstream crosses a rounding boundary, that activation moves by one int8 step, and a sharply "
            "trained model carries such a flip further into its logits. " + raise_it)


def _is_fp32(model: nn.Module) -> bool:
    return all(t.dtype == torch.float32 for t in (*model.parameters(), *model.buffers()) if t.is_floating_point())


def _files_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.iterdir() if p.is_file() and p.name.startswith(ONNX_FILE))


def _export_copies(model: nn.Module, config: ExportConfig) -> tuple[nn.Module, nn.Module, ExportPlan]:
    """``(reference, export_model, plan)``: the fp32 model validation compares against, and a copy of it
    with its quantized modules swapped for their ONNX forms (``model`` itself is not modified)."""
    # the graph computes in fp32 (activations, router, norms); quantized weights stay integers
    reference = model if _is_fp32(model) and not config.quantize_embeddings else copy.deepcopy(model).float()
    embedding = quantize_embedding_(reference) if config.quantize_embeddings else None
    export_model = copy.deepcopy(reference)
    mla = absorb_latent_projections_(export_model) if config.absorb_mla else {}
    plan = prepare_for_export(export_model, config.accuracy_level, embedding, dense_experts=config.dense_experts,
                              signed_int8=config.cpu_target.signed_int8_weights, moe_op=config.moe_op,
                              standard_onnx=isinstance(config.weights, DequantizeLinearWeights))
    plan.mla = mla
    return reference, export_model, plan


def _finish_graph(path: Path, config: ExportConfig, plan: ExportPlan) -> tuple[dict[str, int], Int8Prefill | None]:
    """Make the saved graph portable or give it int8 prompts if asked, and check the plan reached it.

    Returns:
        The op counts of the graph as traced (with int8 prompts: of its single-token branch), and what
        int8_prefill added.
    """
    if isinstance(config.weights, DequantizeLinearWeights):
        _to_portable(path)
    counts = _op_counts(path)
    _check_plan_in_graph(plan, counts, config.weights)
    return counts, _add_int8_prefill(path, config.int8_prefill) if config.int8_prefill is not None else None


def kv_cache_manifest(scheme: KVCacheScheme | None) -> dict:
    """The manifest's ``kv_cache`` entry: the graph's cache, and whether the model's KV-cache scheme is carried."""
    entry: dict = {"graph_cache_dtype": "float32", "artifact_kv_cache_scheme": scheme.describe() if scheme else None,
                   "carried": False if scheme else None}
    if scheme is not None:
        entry["note"] = ("the ONNX graph keeps an fp32 KV cache; the artifact's kv_cache_scheme is not carried, and the "
                         "export was validated against the model with its KV-cache quantization switched off")
    return entry


def _write_manifest(tmp: Path, layout: CacheLayout, config: ExportConfig, counts: dict[str, int], plan: ExportPlan,
                    validation: ValidationReport, source: dict | None, kv_scheme: KVCacheScheme | None = None,
                    cpu_warning: str | None = None, int8_prefill: Int8Prefill | None = None) -> None:
    """Write ``EXPORT_MANIFEST`` last, with the sha256 of every other file in ``tmp``."""
    manifest = {
        "format": "dsq-onnx-decoder",
        "version": 1,
        "dsq_version": __version__,
        "versions": versions(),
        "opset": config.opset,
        "files": {},  # filled below: sha256 of every file in the directory
        "inputs": input_names(layout),
        "outputs": output_names(layout),
        "cache": layout.to_dict(),
        "kv_cache": kv_cache_manifest(kv_scheme),
        "accuracy_level": config.accuracy_level,
        "cpu_target": {**config.cpu_target.to_dict(), "export_machine": cpu_warning or "has what the graph needs"},
        "weight_op": config.weights.op,
        "int8_prefill": int8_prefill.to_dict() if int8_prefill else None,
        "ops": counts,
        "quantized_modules": plan.to_dict(),
        "validation": validation.to_dict(),
        "source": source or {},
    }
    manifest["files"] = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
    (tmp / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def export_onnx(
    model: nn.Module,
    tokenizer,
    output: Path,
    config: ExportConfig = ExportConfig(),
    *,
    source: dict | None = None,
    overwrite: bool = False,
) -> ExportResult:
    """Export ``model`` to ``output`` (a directory) and validate it in ONNX Runtime.

    Args:
        model: causal LM as the spine loads it (fp32 or bf16, with or without dsq's quantized modules).
            Not modified. The graph computes in fp32 and is validated against an fp32 copy; a quantized KV
            cache is not carried (the graph's cache is fp32; validated with the KV-cache quantization off).
        tokenizer: saved beside the graph (needed by onnxruntime-genai).
        output: directory to create; written atomically.
        config: :class:`ExportConfig`.
        source: facts about the exported artifact, copied into the manifest.
        overwrite: replace an existing export directory.

    Returns:
        An :class:`ExportResult`.

    Raises:
        ExportError: a module has no ONNX form, the exporter failed, or ORT does not match torch
            (the message lists the failing cases); nothing is left at ``output``.
    """
    started = time.perf_counter()
    refusal = onnx_unsupported(getattr(model.config, "model_type", None))
    if refusal is not None:
        raise ExportError(f"cannot export {model.config.model_type} to ONNX: {refusal}")
    kv_scheme = kv_cache_scheme_of(model)
    if kv_scheme is not None:
        log.info("%s is not carried into ONNX: the graph keeps an fp32 KV cache", kv_scheme.describe())
    with kv_cache_quantization_off(model):  # copies made inside keep it off
        return _export(model, tokenizer, output, config, source, overwrite, started, kv_scheme)


def _export(model: nn.Module, tokenizer, output: Path, config: ExportConfig, source: dict | None, overwrite: bool,
            started: float, kv_scheme: KVCacheScheme | None) -> ExportResult:
    """:func:`export_onnx` after its checks, with the model's KV-cache quantization off."""
    refusal = runtime_refusal(config.opset, ort_module().__version__)
    if refusal is not None:
        raise ExportError(refusal)
    model.eval()
    layout = cache_layout(model.config)
    vocab = model.config.vocab_size
    cpu_warning = missing_features(config.cpu_target)
    if cpu_warning:
        log.warning("cpu_target %s: %s", config.cpu_target.name, cpu_warning)
    reference, export_model, plan = _export_copies(model, config)
    tolerance = config.validation.tolerance or default_tolerance(plan, config)
    with atomic_directory(output, overwrite, marker=EXPORT_MANIFEST) as tmp:
        _trace(export_model, layout, vocab, tmp / ONNX_FILE, config.opset)
        del export_model
        counts, prefill = _finish_graph(tmp / ONNX_FILE, config, plan)
        ort_lm = OrtCausalLM(tmp / ONNX_FILE, threads=config.threads, accuracy_level=config.accuracy_level)
        validation = validate_export(ort_lm, reference, layout, vocab, config.validation, tolerance)
        if not validation.passed:
            why = f" ({cpu_warning}; export on such a CPU, or with cpu_target portable)" if cpu_warning and plan.int8 else ""
            raise ExportError("the ONNX export does not match PyTorch: " + "; ".join(validation.failures()) + why
                              + _rounding_hint(plan, config, validation))
        tokenizer.save_pretrained(str(tmp))
        write_genai_config(tmp, model.config, tokenizer, layout)
        _write_manifest(tmp, layout, config, counts, plan, validation, source, kv_scheme, cpu_warning, prefill)
        onnx_bytes = _files_bytes(tmp)
    return ExportResult(output, layout, plan, validation, time.perf_counter() - started, onnx_bytes, config.accuracy_level, counts, config.weights.op,
                        config.cpu_target.name, prefill)
