"""bitsandbytes backends (bnb-nf4, bnb-fp4, bnb-int8): swap, report, closeness, transformers reload.

Bounds were set by measuring (bitsandbytes 0.50.2, transformers 5.23, CPU):
- random tiny checkpoints, relative logit error ||q - fp|| / ||fp||: 4-bit 0.16-0.23, int8 0.013-0.015;
- the bundled trained tiny DeepSeek-V3 on 256 held-out tokens: nf4 rel 0.038 / top-1 0.938, fp4 rel 0.053 /
  top-1 0.910, int8 rel 0.0091 / top-1 0.977;
- transformers reload vs the in-memory quantized model: max abs logit diff 0.0 (same kernels), on CPU
  and on CUDA (H100).
- 4-bit CPU paths (tests/cpu_paths.py says which one a host takes): bitsandbytes' dequantize path gives
  exactly the dequantized weight's logits on every CPU; its AVX512-BF16 kernel (AMD EPYC with
  avx512_bf16) stays within 0.85 u (u = 2^-8) of sum |x||w| per output, logits 4.8e-3 from the exact ones.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from dsq.core.checkpoint import PICKLE_SUFFIXES, bundled_model_path  # noqa: E402
from dsq.core.errors import QuantizationError  # noqa: E402
from dsq.quantize.bnb import (  # noqa: E402
    BnbFP4Config,
    BnbInt8Config,
    BnbNF4Config,
    BnbUnavailableError,
    bnb_modules,
    cpu_kernel_fits,
    dequantized_4bit_weight,
    quantize_bnb_,
    save_bnb_model,
    saved_bytes,
    set_cpu_bf16_kernel_,
)
from dsq.quantize.targets import TargetSpec, select_targets  # noqa: E402
from dsq.eval.reload import logits_of, probe_ids, transformers_reload_check  # noqa: E402

from cpu_paths import BF16_UNIT_ROUNDOFF, bf16_kernel_detected, describe, repack_like_the_bf16_kernel_  # noqa: E402

CONFIGS = {"nf4": BnbNF4Config(), "fp4": BnbFP4Config(), "int8": BnbInt8Config()}
LAYER = {"nf4": bnb.nn.Linear4bit, "fp4": bnb.nn.Linear4bit, "int8": bnb.nn.Linear8bitLt}
# largest relative logit error on the random tiny checkpoints (measured: see the module docstring)
RANDOM_REL = {"nf4": 0.35, "fp4": 0.35, "int8": 0.03}
RELOAD_TOL = 1e-5


@pytest.fixture(autouse=True)
def _quiet_bnb():
    """LLM.int8 warns on every float32 forward that it casts to float16."""
    loggers = [logging.getLogger(n) for n in ("bitsandbytes", "bitsandbytes.autograd._functions")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    yield
    for lg, level in zip(loggers, levels):
        lg.setLevel(level)


def _load(path: Path, device: str = "cpu") -> nn.Module:
    """``from_pretrained`` as a user calls it; the device is named because transformers puts a
    bitsandbytes checkpoint on the GPU by default where there is one."""
    with contextlib.redirect_stderr(io.StringIO()):
        return AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, device_map=device).eval()


def _assert_reload_matches(root: Path, model: nn.Module) -> nn.Module:
    """Reload ``root`` with transformers and compare logits with the in-memory ``model`` (on CPU)."""
    reloaded = _load(root)
    ids = probe_ids(model.config.vocab_size)
    diff = float((logits_of(reloaded, ids) - logits_of(model, ids)).abs().max())
    assert diff <= RELOAD_TOL, diff
    if not torch.cuda.is_available():  # dsq's harness check loads with transformers' default device
        check = transformers_reload_check(root, model, tolerance=RELOAD_TOL)
        assert check.loaded and check.passed, check
    return reloaded


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).norm() / ref.norm())


_CACHE: dict[tuple[str, str], tuple] = {}


@pytest.fixture
def quantized(tiny_checkpoint):
    """(model_type, method) -> (fp logits, quantized model, report, fp model), made once per session."""

    def get(model_type: str, method: str):
        key = (model_type, method)
        if key not in _CACHE:
            path = tiny_checkpoint(model_type)
            fp = _load(path)
            ref = logits_of(fp, probe_ids(fp.config.vocab_size))
            model = _load(path)
            report = quantize_bnb_(model, CONFIGS[method], progress=False)
            _CACHE[key] = (ref, model, report, fp)
        return _CACHE[key]

    return get


# --- configs and errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: BnbNF4Config(compute_dtype=torch.float16),
        lambda: BnbFP4Config(blocksize=48),
        lambda: BnbNF4Config(blocksize=True),
        lambda: BnbNF4Config(double_quant=1),
        lambda: BnbInt8Config(threshold=-1.0),
        lambda: BnbInt8Config(threshold=float("nan")),
    ],
)
def test_invalid_configs_are_refused(make):
    with pytest.raises(ValueError, match="must be"):
        make()


def test_configs_are_frozen_and_describe_the_scheme():
    config = BnbNF4Config(double_quant=True, blocksize=128, compute_dtype=torch.bfloat16)
    with pytest.raises(AttributeError):
        config.blocksize = 64  # type: ignore[misc]
    assert config.describe() == "nf4 block 128, double quant, compute bfloat16"
    assert BnbFP4Config().describe() == "fp4 block 64"
    assert BnbInt8Config().describe() == "llm.int8 per-row int8, outlier threshold 6"


def test_missing_bitsandbytes_gives_a_clear_error(monkeypatch, tiny_checkpoint):
    model = _load(tiny_checkpoint("llama"))
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    with pytest.raises(BnbUnavailableError, match=r"bitsandbytes.*pip install") as info:
        quantize_bnb_(model, BnbNF4Config(), progress=False)
    assert isinstance(info.value, ImportError)
    assert all(type(m) is not bnb.nn.Linear4bit for m in model.modules())  # nothing was swapped
    with pytest.raises(BnbUnavailableError):
        save_bnb_model(model, None, Path("unused"))


def test_wrong_config_type_and_double_quantization_are_refused(tiny_checkpoint):
    model = _load(tiny_checkpoint("llama"))
    with pytest.raises(TypeError, match="BnbNF4Config"):
        quantize_bnb_(model, object(), progress=False)  # type: ignore[arg-type]
    quantize_bnb_(model, BnbInt8Config(), progress=False)
    with pytest.raises(QuantizationError, match="already quantized"):
        quantize_bnb_(model, BnbNF4Config(), progress=False)


def test_save_needs_a_bnb_model(tmp_path, tiny_checkpoint):
    with pytest.raises(QuantizationError, match="quantize_bnb_"):
        save_bnb_model(_load(tiny_checkpoint("llama")), None, tmp_path / "out")


# --- swap, report, closeness ----------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(CONFIGS))
@pytest.mark.parametrize("model_type", ["deepseek_v3", "llama", "qwen2"])
def test_swap_report_and_closeness(model_type, method, quantized):
    ref, model, report, fp = quantized(model_type, method)
    assert report.method == f"bnb-{method}"
    assert report.scheme == CONFIGS[method].describe()

    # the report accounts for every quantizable module of the original model, and for every parameter
    expected = {d.name: d.kind for d in select_targets(fp, TargetSpec())}
    assert {m.name: m.kind for m in report.modules} == expected
    assert report.quantized_params + report.kept_params == sum(p.numel() for p in fp.parameters())

    layers = bnb_modules(model)
    assert set(layers) == {m.name for m in report.quantized}
    for record in report.quantized:
        layer = layers[record.name]
        assert type(layer) is LAYER[method]
        assert record.bytes_after == saved_bytes(layer) < record.bytes_before
    # nothing quantizable is left unaccounted for: every remaining plain Linear is a kept module
    kept = {m.name: m.reason for m in report.kept}
    plain = {n for n, m in model.named_modules() if type(m) is nn.Linear}
    assert plain <= set(kept)
    assert "lm_head" in kept and "lm_head" in kept["lm_head"]
    bits = 4 if method != "int8" else 8
    ratio = report.to_dict()["quantized_bytes_ratio_vs_fp16"]
    assert bits / 16 < ratio < bits / 16 + 0.05  # packed weights plus absmax / SCB

    if model_type == "deepseek_v3":
        experts = [m for m in report.kept if m.kind == "experts"]
        assert experts and all("fused MoE experts" in m.reason and "float32" in m.reason for m in experts)
        assert report.other_breakdown.get("router", 0) > 0  # DeepSeek-V3's router is not a Linear
        kv_b = [m for m in report.modules if m.name.endswith("kv_b_proj")]
        if method == "int8":  # Linear8bitLt cannot take kv_b_proj's 4-D input
            assert kv_b and all(not m.quantized and "more than 3 dims" in m.reason for m in kv_b)
        else:
            assert kv_b and all(m.quantized for m in kv_b)

    got = logits_of(model, probe_ids(model.config.vocab_size))
    assert torch.isfinite(got).all()
    assert 0 < _rel(got, ref) < RANDOM_REL[method]


def _fresh_nf4(tiny_checkpoint, **options) -> tuple[nn.Module, nn.Module]:
    """(fp model, NF4 model) of the tiny DeepSeek-V3, never run (the cached ones may be repacked)."""
    path = tiny_checkpoint("deepseek_v3")
    model = _load(path)
    quantize_bnb_(model, BnbNF4Config(**options), progress=False)
    return _load(path), model


def test_4bit_forward_is_exactly_the_dequantized_weight_on_the_dequantize_path(tiny_checkpoint):
    """bitsandbytes' dequantize path (the only one of AVX2-only CPUs; forced off the AVX512-BF16 kernel
    here, on any CPU): the swapped model computes with the 4-bit weights bitsandbytes stores, nothing else."""
    fp, model = _fresh_nf4(tiny_checkpoint)
    layers = bnb_modules(model)
    assert set_cpu_bf16_kernel_(model, False) == len(layers) > 0
    dequantized = _load_like(fp)
    for name, layer in layers.items():
        dequantized.get_submodule(name).weight.data.copy_(dequantized_4bit_weight(layer))
    ids = probe_ids(model.config.vocab_size)
    got = logits_of(model, ids)
    assert not any(_repacked(layer) for layer in layers.values())
    torch.testing.assert_close(got, logits_of(dequantized, ids), rtol=0, atol=1e-5, msg=lambda m: f"{m}\n{describe()}")


def _repacked(layer: nn.Module) -> bool:
    return bool(getattr(layer.weight.quant_state, "packing_format_for_cpu", False))


def test_4bit_forward_on_the_avx512_bf16_kernel_is_within_its_bf16_rounding(tiny_checkpoint):
    """bitsandbytes' default on CPUs where it detects AVX512-BF16: the first eval forward repacks the
    weight and multiplies in bfloat16 (activations, absmax and 4-bit values rounded to bf16, float32
    sums, output rounded to bf16), so each output differs from the float32 matmul with the
    dequantized weight by at most (5 u + K 2^-24) sum_k |x_k w_k|, u = 2^-8 (four roundings of each
    product's factors, one of the output, K float32 additions). Measured: at most 0.85 u; model
    logits max 4.8e-3 from the dequantize path's."""
    if not bf16_kernel_detected():
        pytest.skip(f"no AVX512-BF16 kernel on this host ({describe()})")
    fp, model = _fresh_nf4(tiny_checkpoint)
    gen = torch.Generator().manual_seed(0)
    for name, layer in bnb_modules(model).items():
        weight = dequantized_4bit_weight(layer).double()  # (out, in), before the repack
        x = torch.randn(2, 5, layer.in_features, generator=gen)
        with torch.inference_mode():
            got = layer(x).double()
        assert _repacked(layer), f"{name}: the AVX512-BF16 kernel did not run ({describe()})"
        reference = x.double() @ weight.T
        scale = x.double().abs() @ weight.abs().T  # sum_k |x_k w_k| per output
        bound = (5 * BF16_UNIT_ROUNDOFF + layer.in_features * 2.0**-24) * scale
        excess = float(((got - reference).abs() - bound).max())
        assert excess <= 0, f"{name}: beyond the bf16 bound by {excess:.3g} ({describe()})"
        assert not torch.equal(got, reference.float().double()), f"{name}: no bf16 rounding seen ({describe()})"


def _load_like(fp: nn.Module) -> nn.Module:
    copy = type(fp)(fp.config).eval()
    copy.load_state_dict(fp.state_dict())
    return copy


def test_router_linear_and_exclusions_are_kept_with_reasons():
    """A router that is an nn.Linear (``mlp.gate``) and excluded modules are listed as kept."""
    torch.manual_seed(0)
    model = nn.Module()
    model.mlp = nn.Module()
    model.mlp.gate = nn.Linear(128, 8, bias=False)
    model.mlp.up_proj = nn.Linear(128, 256)
    model.mlp.down_proj = nn.Linear(256, 128)
    x = torch.randn(3, 128)
    with torch.no_grad():
        expected = model.mlp.down_proj(model.mlp.up_proj(x))
    report = quantize_bnb_(model, BnbNF4Config(targets=TargetSpec(exclude=("down_proj",))), progress=False)
    kept = {m.name: m.reason for m in report.kept}
    assert set(kept) == {"mlp.gate", "mlp.down_proj"}
    assert "router" in kept["mlp.gate"] and "excluded" in kept["mlp.down_proj"]
    assert type(model.mlp.up_proj) is bnb.nn.Linear4bit and model.mlp.up_proj.bias is not None
    with torch.no_grad():
        got = model.mlp.down_proj(model.mlp.up_proj(x))
    assert _rel(got, expected) < 0.15


def test_trained_model_stays_close(tmp_path):
    """On the bundled trained model, next-token predictions barely move (held-out text)."""
    path = bundled_model_path()
    if not (path / "config.json").exists():
        pytest.skip("bundled model not present")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    text = (path.parent / "data" / "heldout.txt").read_text(encoding="utf-8")[:6000]
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :256].reshape(2, 128)
    ref = logits_of(_load(path), ids)
    # (max relative logit error, min top-1 agreement); measured 0.038/0.938, 0.053/0.910, 0.0091/0.977
    bounds = {"nf4": (0.07, 0.85), "fp4": (0.09, 0.82), "int8": (0.025, 0.95)}
    for method, (max_rel, min_top1) in bounds.items():
        model = _load(path)
        quantize_bnb_(model, CONFIGS[method], progress=False)
        got = logits_of(model, ids)
        top1 = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
        assert _rel(got, ref) < max_rel, method
        assert top1 >= min_top1, method


# --- save and transformers reload -----------------------------------------------------------------


def _assert_safetensors_only(root: Path) -> None:
    names = [p.name for p in root.iterdir()]
    assert any(n.endswith(".safetensors") for n in names)
    assert not [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    assert {"config.json", "tokenizer.json"} <= set(names)


@pytest.mark.parametrize(
    ("model_type", "method"),
    [("deepseek_v3", "nf4"), ("deepseek_v3", "int8"), ("llama", "nf4"), ("llama", "int8"), ("qwen2", "fp4")],
)
def test_transformers_reload_matches_in_memory(model_type, method, quantized, tiny_checkpoint, tmp_path):
    ref, model, report, fp = quantized(model_type, method)
    out = tmp_path / "bnb"
    save_bnb_model(model, AutoTokenizer.from_pretrained(str(tiny_checkpoint(model_type))), out)
    _assert_safetensors_only(out)
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qconfig["quant_method"] == "bitsandbytes"
    assert qconfig["load_in_8bit" if method == "int8" else "load_in_4bit"] is True
    assert sorted(qconfig["llm_int8_skip_modules"]) == sorted(m.name for m in report.kept)

    reloaded = _assert_reload_matches(out, model)
    types = {n: type(m) for n, m in model.named_modules()}
    assert {n: type(m) for n, m in reloaded.named_modules()} == types  # same bnb layers, same kept ones
    assert getattr(reloaded, "is_loaded_in_8bit" if method == "int8" else "is_loaded_in_4bit") is True
    if model_type == "deepseek_v3":  # the kept experts come back unquantized and unchanged
        for name, module in fp.named_modules():
            if name.endswith("mlp.experts"):
                back = reloaded.get_submodule(name)
                assert back.gate_up_proj.dtype == torch.float32
                torch.testing.assert_close(back.gate_up_proj, module.gate_up_proj, rtol=0, atol=0)
                torch.testing.assert_close(back.down_proj, module.down_proj, rtol=0, atol=0)


def test_4bit_options_survive_reload(tmp_path):
    """Double quant, a larger block and bf16 compute are read back from the checkpoint."""
    from safetensors import safe_open

    from dsq.tools.testing import make_tiny_checkpoint

    path = make_tiny_checkpoint("llama", tmp_path / "src", num_hidden_layers=1)
    model = _load(path)
    config = BnbNF4Config(double_quant=True, blocksize=128, compute_dtype=torch.bfloat16)
    quantize_bnb_(model, config, progress=False)
    layer = next(iter(bnb_modules(model).values()))
    assert layer.weight.quant_state.nested and layer.weight.quant_state.blocksize == 128
    save_bnb_model(model, None, tmp_path / "out")
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        nested = [k for k in f.keys() if k.endswith(".weight.nested_absmax")]
    assert len(nested) == len(bnb_modules(model))
    # read before any forward: on AVX512-BF16 CPUs bitsandbytes' first eval forward repacks the weight
    # and drops double quantization from the in-memory state (a save re-quantizes it)
    back = next(iter(bnb_modules(_load(tmp_path / "out")).values()))
    assert back.weight.quant_state.nested and back.weight.quant_state.blocksize == 128, describe()
    assert back.compute_dtype == torch.bfloat16
    _assert_reload_matches(tmp_path / "out", model)


@pytest.mark.parametrize(
    ("double_quant", "state_dict_first"), [(False, False), (False, True), (True, False)],
    ids=["plain", "plain-after-bnb-state_dict", "double-quant"],
)
def test_a_save_after_a_repacking_forward_writes_the_standard_layout(tmp_path, tiny_checkpoint, double_quant, state_dict_first):
    """On AVX512-BF16 CPUs an eval forward repacks every Linear4bit; bitsandbytes' own state_dict() then
    writes a plain absmax transposed to (in / block, out) bfloat16 and leaves the layer computing with
    scrambled scales. save_bnb_model writes the standard layout with the scales the model computed with.
    The repack is forced here as the kernel does it, so this runs the same on every CPU."""
    from safetensors.torch import load_file

    _, clean = _fresh_nf4(tiny_checkpoint, double_quant=double_quant)
    _, model = _fresh_nf4(tiny_checkpoint, double_quant=double_quant)
    weights = {n: dequantized_4bit_weight(layer) for n, layer in bnb_modules(model).items()}
    assert repack_like_the_bf16_kernel_(model) == len(weights)
    if state_dict_first:  # bitsandbytes' inverse: the data is back, the plain absmax stays transposed
        model.state_dict()
    save_bnb_model(clean, None, tmp_path / "clean")
    save_bnb_model(model, None, tmp_path / "out")

    expected, written = load_file(str(tmp_path / "clean" / "model.safetensors")), load_file(str(tmp_path / "out" / "model.safetensors"))
    assert written.keys() == expected.keys()
    for key, value in expected.items():
        if ".quant_state." not in key:  # bitsandbytes' JSON of the state holds the re-quantized offset
            assert (written[key].shape, written[key].dtype) == (value.shape, value.dtype), key
        if key.endswith(".weight") and value.dtype == torch.uint8:
            assert torch.equal(written[key], value), key  # the same 4-bit values
        if key.endswith(".weight.absmax") and not double_quant:
            assert torch.equal(written[key], value.bfloat16().float()), key  # the scales the kernel used
    reloaded = _assert_reload_matches(tmp_path / "out", model)  # same bitsandbytes default on both sides
    # the files hold what the model computes with: plain, absmax rounded to bf16 once (relative u, plus
    # float32 rounding of the products; measured 3.9e-3); double quant, its 8-bit absmax quantized
    # again (measured 7.9e-3 relative)
    bound = BF16_UNIT_ROUNDOFF * (1 + 2.0**-16) if not double_quant else 0.03
    set_cpu_bf16_kernel_(model, False)
    assert set_cpu_bf16_kernel_(reloaded, False) == len(weights)
    for name, layer in bnb_modules(reloaded).items():
        got = dequantized_4bit_weight(layer)
        torch.testing.assert_close(got, dequantized_4bit_weight(bnb_modules(model)[name]), rtol=0, atol=0)
        rel = float(((got - weights[name]).abs() / weights[name].abs().clamp_min(1e-30)).max())
        assert rel <= bound, (name, rel)


def test_shapes_off_the_cpu_kernel_are_kept_and_reload(tmp_path):
    """kv_a_proj_with_mqa 80 wide (kv_lora 64 + rope 16) misses bnb's CPU AVX512-BF16 kernel (out % 32)."""
    from dsq.tools.testing import make_tiny_checkpoint

    assert cpu_kernel_fits(96, 128, 64) and not cpu_kernel_fits(80, 128, 64)
    assert not cpu_kernel_fits(96, 96, 64) and not cpu_kernel_fits(128, 64, 128)
    path = make_tiny_checkpoint("deepseek_v3", tmp_path / "src", qk_rope_head_dim=16)
    model = _load(path)
    report = quantize_bnb_(model, BnbNF4Config(), progress=False)
    kept = {m.name: m.reason for m in report.kept}
    odd = [n for n in kept if n.endswith("kv_a_proj_with_mqa")]
    assert len(odd) == 2 and all("AVX512-BF16" in kept[n] for n in odd)
    for layer in bnb_modules(model).values():
        assert cpu_kernel_fits(layer.out_features, layer.in_features, 64)
    save_bnb_model(model, None, tmp_path / "out")
    _assert_reload_matches(tmp_path / "out", model)


def test_int8_layer_still_rejects_4d_inputs():
    """Canary for the trap behind keeping kv_b_proj in bnb-int8: if bitsandbytes fixes it, revisit."""
    layer = bnb.nn.Linear8bitLt(64, 32, bias=False, has_fp16_weights=False, threshold=6.0)
    layer.weight = bnb.nn.Int8Params(torch.randn(32, 64), requires_grad=False, has_fp16_weights=False).to("cpu")
    layer.eval()
    with torch.no_grad():
        assert layer(torch.randn(2, 5, 64)).shape == (2, 5, 32)
        with pytest.raises((RuntimeError, ValueError)):
            layer(torch.randn(2, 1, 5, 64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_cuda_quantize_and_reload(method, tiny_checkpoint, tmp_path):
    path = tiny_checkpoint("deepseek_v3")
    fp = _load(path)
    ids = probe_ids(fp.config.vocab_size)
    ref = logits_of(fp, ids)
    model = _load(path).to("cuda")
    quantize_bnb_(model, CONFIGS[method], progress=False)
    assert all(p.device.type == "cuda" for p in model.parameters())
    got = logits_of(model, ids.to("cuda")).cpu()
    assert _rel(got, ref) < RANDOM_REL[method]
    save_bnb_model(model, None, tmp_path / "out")
    back = _load(tmp_path / "out", "cuda")
    diff = float((logits_of(back, ids.to("cuda")).cpu() - got).abs().max())
    assert diff <= RELOAD_TOL


def test_int8_refuses_weights_beyond_float16():
    model = nn.Module()
    model.proj = nn.Linear(64, 64)
    with torch.no_grad():
        model.proj.weight[3, 5] = 1e5
    with pytest.raises(QuantizationError, match=r"proj\.weight.*float16"):
        quantize_bnb_(model, BnbInt8Config(), progress=False)
