"""Learned rounding (``autoround``): the rounding math, block training, experts, streaming, reload and ONNX."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import onnx
import pytest
import torch
from onnx import numpy_helper
from safetensors.torch import load_file

from dsq.core.loading import load_checkpoint
from dsq.eval.reload import transformers_reload_check
from dsq.export import export_onnx
from dsq.export.ops import unpack_nbits
from dsq.quantize.activation_store import BatchStore
from dsq.quantize import PerChannel, PerGroup, QuantExperts, QuantLinear, RTNConfig, TargetSpec, WeightScheme, quantize_
from dsq.quantize.artifact_save import save_quantized_model
from dsq.quantize.gptq import gptq_quantize, static_qparams
from dsq.quantize.methods.autoround import AutoRoundConfig
from dsq.quantize.primitives import dequantize_weight, quantize_rtn, quantize_with_qparams
from dsq.quantize.signround import CLIP_FLOOR, LearnedRounding, Schedule, attached, searched_clip, train_rounding
from dsq.quantize.streaming import quantize_streaming
from dsq.tools.testing import fast_export_config

SCHEMES = [
    WeightScheme(4, PerGroup(32), True),
    WeightScheme(4, PerGroup(32), False),
    WeightScheme(4, PerGroup(48), True),  # ragged last group: 200 = 4 x 48 + 8
    WeightScheme(4, PerGroup(48), False),
    WeightScheme(4, PerChannel(), True),
    WeightScheme(8, PerGroup(128), False),
]


def _ids(vocab: int, samples: int = 8, seq: int = 32, seed: int = 123) -> torch.Tensor:
    return torch.randint(3, vocab, (samples, seq), generator=torch.Generator().manual_seed(seed))


def _perturb(r: LearnedRounding, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        r.offset.copy_(torch.rand(r.offset.shape, generator=g) - 0.5)
        r.clip_max.copy_(CLIP_FLOOR + (1 - CLIP_FLOOR) * torch.rand(r.clip_max.shape, generator=g))
        if r.clip_min is not None:
            r.clip_min.copy_(CLIP_FLOOR + (1 - CLIP_FLOOR) * torch.rand(r.clip_min.shape, generator=g))


# ----------------------------------------------------------------------------- the rounding


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.describe())
@pytest.mark.parametrize("shape", [(24, 200), (3, 16, 200)], ids=["linear", "experts"])
def test_rounding_starts_at_rtn_and_freezes_to_what_it_computes(scheme, shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 0.05
    r = LearnedRounding(w, scheme, learn_clipping=True)
    with torch.no_grad():
        assert torch.equal(r(w), dequantize_weight(quantize_rtn(w, scheme)))  # V = 0, clip = 1: round to nearest
        _perturb(r)
        qw = r.freeze(w)
        assert qw.qweight.dtype == torch.int8 and qw.scale.shape == (*shape[:-1], scheme.granularity.num_groups(shape[-1]))
        assert int(qw.qweight.min()) >= scheme.qmin and int(qw.qweight.max()) <= scheme.qmax
        assert (qw.zero is None) == scheme.symmetric
        # the integers dsq writes dequantize to exactly what the block was trained with
        torch.testing.assert_close(dequantize_weight(qw), r(w), rtol=0, atol=1e-7)
        assert not torch.equal(qw.qweight, quantize_rtn(w, scheme).qweight)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.describe())
def test_searched_start_is_gptqs_range_search(scheme):
    w = torch.randn(3, 24, 200, generator=torch.Generator().manual_seed(2)) * 0.05
    clip = searched_clip(w, scheme)
    assert clip.min() >= CLIP_FLOOR and clip.max() <= 1
    assert (clip < 1).any() or scheme.bits == 8  # 8-bit: min/max is already the best range of these weights
    start = LearnedRounding(w, scheme, learn_clipping=True, clip=clip).freeze(w)
    for e in range(3):
        expected = quantize_with_qparams(w[e], *static_qparams(w[e], scheme, mse=True), scheme)
        assert torch.equal(start.qweight[e], expected.qweight)
        torch.testing.assert_close(start.scale[e], expected.scale, rtol=1e-6, atol=0)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.describe())
def test_start_at_gptq_gives_gptqs_integers_and_moves_by_at_most_one_step(scheme):
    w = torch.randn(24, 200, generator=torch.Generator().manual_seed(4)) * 0.05
    x = torch.randn(256, 200, generator=torch.Generator().manual_seed(5))
    x[:, :8] *= 6  # a few loud input channels, so GPTQ's integers differ from round-to-nearest
    start = gptq_quantize(w, x.T @ x, scheme, act_order=True, mse_scales=True).qweight
    r = LearnedRounding(w, scheme, learn_clipping=True, clip=searched_clip(w, scheme))
    rtn = r.freeze(w).qweight
    assert not torch.equal(start.qweight, rtn)
    r.start_at(w, start)
    assert torch.equal(r.freeze(w).qweight, start.qweight)
    with torch.no_grad():
        r.offset.copy_(torch.rand(r.offset.shape, generator=torch.Generator().manual_seed(6)) - 0.5)
    moved = r.freeze(w).qweight.int() - start.qweight.int()
    assert moved.abs().max() == 1 and (moved != 0).any()
    other = LearnedRounding(w, scheme, learn_clipping=True)  # min/max ranges: not GPTQ's
    if not torch.equal(other.qparams()[0], r.qparams()[0]):
        with pytest.raises(ValueError, match="other scales"):
            other.start_at(w, start)


def test_signed_steps_keep_offsets_and_clipping_in_range_and_skip_held_experts():
    scheme = WeightScheme(4, PerGroup(32), False)
    w = torch.randn(4, 16, 64)
    r = LearnedRounding(w, scheme, learn_clipping=True)
    r.trainable[2] = False
    for step in range(5):
        for p in r.trained_parameters():
            p.grad = torch.randn(p.shape) * (-1) ** step
        r.signed_step(lr=0.7)  # far larger than any real step: the clamps must hold
    assert r.offset.abs().max() <= 0.5 and r.offset.abs().max() == 0.5
    for clip in (r.clip_max, r.clip_min):
        assert clip.min() >= CLIP_FLOOR and clip.max() <= 1.0 and clip.min() == CLIP_FLOOR
    assert torch.equal(r.offset[2], torch.zeros(16, 64)) and torch.equal(r.clip_max[2], torch.ones(16, 2))


def test_clipping_is_fixed_when_not_learned():
    r = LearnedRounding(torch.randn(8, 64), WeightScheme(4, PerGroup(32)), learn_clipping=False)
    assert [p.shape for p in r.trained_parameters()] == [torch.Size([8, 64])]


def test_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="steps"):
        AutoRoundConfig(steps=0)
    with pytest.raises(ValueError, match="min_expert_tokens"):
        AutoRoundConfig(min_expert_tokens=0)


# ----------------------------------------------------------------------------- whole models


def _relative_error(model, ref, ids) -> float:
    with torch.no_grad():
        return float((model(input_ids=ids).logits - ref).norm() / ref.norm())


@pytest.mark.parametrize("arch,scheme", [
    ("llama", WeightScheme(4, PerGroup(32), True)),
    ("qwen2", WeightScheme(4, PerGroup(48), False)),  # ragged groups (hidden 128 = 2 x 48 + 32), asymmetric
    ("deepseek_v3", WeightScheme(4, PerGroup(32), True)),  # MLA, dense first layer, shared and routed experts
    ("deepseek_v2", WeightScheme(4, PerChannel(), True)),  # transformers cannot reload asymmetric fused experts
], ids=["llama", "qwen2-ragged-asym", "deepseek_v3", "deepseek_v2-channel"])
def test_trained_blocks_beat_round_to_nearest_and_reload_in_transformers(tiny_checkpoint, tmp_path, arch, scheme):
    loaded = load_checkpoint(tiny_checkpoint(arch))
    model = loaded.model
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    rtn = copy.deepcopy(model)
    quantize_(rtn, RTNConfig(scheme), progress=False)
    report = quantize_(model, AutoRoundConfig(scheme, steps=30, batch_size=2), calibration=ids, progress=False)

    blocks = report.calibration["modules"]
    assert len(blocks) == model.config.num_hidden_layers
    for name, block in blocks.items():
        assert block["steps"] == 30 and not block["kept_rtn"], name
        assert block["loss_after"] < 0.9 * block["loss_before"], (name, block)
    assert not any(isinstance(m, torch.nn.Linear) and not n.endswith("lm_head") for n, m in model.named_modules())
    assert all(r.quantized for r in report.modules if not r.name.endswith("lm_head"))
    if arch.startswith("deepseek"):
        assert any(isinstance(m, QuantExperts) for m in model.modules())
    assert _relative_error(model, ref, ids) < 0.9 * _relative_error(rtn, ref, ids)

    save_quantized_model(model, loaded.tokenizer, tmp_path)
    check = transformers_reload_check(tmp_path, model)
    assert check.loaded and check.passed, check


def _starve(model, expert: int) -> int:
    """The router never picks ``expert`` (DeepSeek-V3's selection bias); returns the MoE layer count."""
    layers = 0
    for module in model.modules():
        bias = getattr(module, "e_score_correction_bias", None)
        if isinstance(bias, torch.Tensor):
            with torch.no_grad():
                bias[expert] = -1e4
            layers += 1
    return layers


def test_expert_without_routed_tokens_is_rounded_to_nearest_and_reported(tiny_deepseek_v3):
    model = load_checkpoint(tiny_deepseek_v3).model
    assert _starve(model, 0) > 0
    experts = {n: m for n, m in model.named_modules() if hasattr(m, "gate_up_proj") and m.gate_up_proj.dim() == 3}
    weights = {n: m.gate_up_proj.detach().clone() for n, m in experts.items()}
    scheme = WeightScheme(4, PerGroup(32))
    report = quantize_(model, AutoRoundConfig(scheme, steps=10, batch_size=4), calibration=_ids(512), progress=False)

    held = report.calibration["experts_rounded_to_nearest"]
    assert set(held) == set(experts) and all(0 in e for e in held.values())
    assert all(counts[0] == 0 for counts in report.calibration["expert_routed_tokens"].values())
    assert all(0 in e for e in report.calibration["experts_without_routed_tokens"].values())
    for name in experts:
        assert any(note.startswith(f"{name}: expert(s) [0") and "rounded to nearest" in note for note in report.notes), report.notes
        quantized = dict(model.named_modules())[name]
        w0 = weights[name][0]
        expected = quantize_with_qparams(w0, *static_qparams(w0, scheme, mse=True), scheme)
        assert torch.equal(quantized.gate_up_proj.unpacked(0), expected.qweight)
        trained = [e for e, c in enumerate(report.calibration["expert_routed_tokens"][name]) if c >= 16]
        assert trained, "every expert was held: the test would not show training"
        rtn = quantize_rtn(weights[name][trained[0]], scheme).qweight
        assert not torch.equal(quantized.gate_up_proj.unpacked(trained[0]), rtn)


def test_gptq_start_lowers_every_blocks_starting_loss_and_keeps_gptq_for_starved_experts(tiny_deepseek_v3):
    losses = {}
    for gptq_init in (False, True):
        model = load_checkpoint(tiny_deepseek_v3).model
        assert _starve(model, 0) > 0
        config = AutoRoundConfig(WeightScheme(4, PerGroup(32)), steps=4, batch_size=4, gptq_init=gptq_init)
        report = quantize_(model, config, calibration=_ids(512), progress=False)
        losses[gptq_init] = {n: f["loss_before"] for n, f in report.calibration["modules"].items() if "loss_before" in f}
    assert losses[True].keys() == losses[False].keys() and losses[True]
    assert all(losses[True][n] < losses[False][n] for n in losses[True]), losses
    assert report.calibration["experts_rounded_to_nearest"] == {}
    held = report.calibration["experts_kept_at_gptq"]
    assert held and all(0 in e for e in held.values())
    assert any("kept at GPTQ's integers" in note for note in report.notes), report.notes


def test_lm_head_is_trained_alone_when_targeted(tiny_checkpoint):
    model = load_checkpoint(tiny_checkpoint("llama")).model
    report = quantize_(model, AutoRoundConfig(WeightScheme(4, PerGroup(32)), TargetSpec(lm_head=True), steps=10, lr=0.01,
                                                       batch_size=4),
                       calibration=_ids(512), progress=False)
    head = report.calibration["modules"]["lm_head"]
    assert head["steps"] == 10 and head["loss_after"] < head["loss_before"]
    assert isinstance(model.lm_head, QuantLinear)


def _tensors(root: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(root.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("arch", ["deepseek_v3", "llama"])
def test_streaming_gives_the_identical_artifact(tmp_path, tiny_checkpoint, arch):
    src = tiny_checkpoint(arch, shards=3)
    config = AutoRoundConfig(WeightScheme(4, PerGroup(32), False), steps=8, batch_size=2)
    loaded = load_checkpoint(src)
    in_memory = quantize_(loaded.model, config, calibration=_ids(512, samples=4), progress=False)
    (tmp_path / "mem").mkdir()
    save_quantized_model(loaded.model, loaded.tokenizer, tmp_path / "mem")
    (tmp_path / "stream").mkdir()
    result = quantize_streaming(src, tmp_path / "stream", config, calibration=_ids(512, samples=4), dtype=torch.float32,
                                progress=False, max_shard_bytes=64 << 10)
    a, b = _tensors(tmp_path / "mem"), _tensors(tmp_path / "stream")
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert json.loads((tmp_path / "mem" / "config.json").read_text()) == json.loads(json.dumps(result.config))
    assert result.report.calibration["modules"] == in_memory.calibration["modules"]


def test_same_seed_same_integers_other_seed_other_integers(tiny_checkpoint):
    def integers(seed: int) -> torch.Tensor:
        model = load_checkpoint(tiny_checkpoint("llama")).model
        report = quantize_(model, AutoRoundConfig(WeightScheme(4, PerGroup(32)), steps=8, lr=0.01, batch_size=2, seed=seed),
                           calibration=_ids(512, samples=6), progress=False)
        assert not report.calibration["modules"]["model.layers.1"]["kept_rtn"]
        return model.model.layers[1].mlp.down_proj.weight_q.unpacked()

    first = integers(0)
    assert torch.equal(first, integers(0))
    assert not torch.equal(first, integers(1))


def test_onnx_export_carries_the_exact_integers(tiny_checkpoint, tmp_path):
    loaded = load_checkpoint(tiny_checkpoint("llama"))
    quantize_(loaded.model, AutoRoundConfig(WeightScheme(4, PerGroup(32), False), steps=6, batch_size=4),
              calibration=_ids(512), progress=False)
    wanted = {n: m.weight_q.unpacked() for n, m in loaded.model.named_modules() if isinstance(m, QuantLinear)}
    result = export_onnx(copy.deepcopy(loaded.model), loaded.tokenizer, tmp_path / "onnx", fast_export_config())
    assert result.validation.passed
    graph = onnx.load(str(result.onnx_path)).graph
    inits = {t.name: t for t in graph.initializer}
    found = 0
    for node in graph.node:
        if node.op_type != "MatMulNBits":
            continue
        name = next(n for n in wanted if n.replace(".", "_") in node.name or n in node.input[1])
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        packed = torch.from_numpy(numpy_helper.to_array(inits[node.input[1]]).copy())
        values = unpack_nbits(packed, attrs["bits"], attrs["K"]).to(torch.int8) - 8
        assert torch.equal(values, wanted[name]), name
        found += 1
    assert found == len(wanted)


# ----------------------------------------------------------------------------- activations beyond a budget


def test_batch_store_spills_beyond_its_budget_and_removes_only_its_files(tmp_path):
    mine = tmp_path / "keep.txt"
    mine.write_text("not the store's")
    batches = [torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    store = BatchStore(budget_bytes=2 * batches[0].numel() * 4, directory=tmp_path)
    for b in batches:
        store.append(b)
    assert (len(store), store.spilled, store.held_bytes) == (5, 3, 2 * 2 * 3 * 8 * 4)
    assert all(torch.equal(a, b) for a, b in zip(store, batches))
    spilled = [p for p in tmp_path.rglob("*.safetensors")]
    assert len(spilled) == 3
    store.close()
    assert not any(tmp_path.rglob("*.safetensors")) and mine.read_text() == "not the store's"


def test_activations_on_disk_give_the_same_integers(tiny_checkpoint, monkeypatch, tmp_path):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    scheme = WeightScheme(4, PerGroup(32))
    ids = _ids(512, samples=6)
    integers = []
    for budget in (None, 0):
        model = load_checkpoint(tiny_checkpoint("deepseek_v3")).model
        report = quantize_(model, AutoRoundConfig(scheme, steps=4, batch_size=2, cache_budget_bytes=budget), calibration=ids,
                           progress=False)
        on_disk = [block["batches_on_disk"] for block in report.calibration["modules"].values()]
        assert on_disk == ([0] * 2 if budget is None else [6] * 2)  # 3 input and 3 target batches per block
        integers.append([m.gate_up_proj.unpacked() for m in model.modules() if isinstance(m, QuantExperts)])
    assert all(torch.equal(a, b) for a, b in zip(*integers))
    assert not list(tmp_path.rglob("dsq-activations-*"))


def test_a_block_ends_at_its_best_step():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32, bias=False)
    x = torch.randn(1, 128, 64) * torch.logspace(-1, 1, 64)  # one batch: its loss is the whole-set loss
    with torch.no_grad():
        target = linear(x)
    scheme = WeightScheme(4, PerGroup(32))
    rounding = LearnedRounding(linear.weight, scheme, learn_clipping=True)
    seen: list[float] = []

    def loss(i: int) -> torch.Tensor:
        value = torch.nn.functional.mse_loss(linear(x), target)
        if torch.is_grad_enabled():
            seen.append(float(value.detach()))
        return value

    with attached({"w": (linear, "weight", rounding)}):
        result = train_rounding(loss, 1, [rounding], Schedule(40, 0.02, keep_best=True), torch.Generator().manual_seed(0))
        last = seen[-1]
    assert not result.kept_initial and result.after < result.before
    assert result.after == pytest.approx(min(seen), rel=1e-6) and min(seen) < last  # the best step, not the last
