"""Sharded training (FSDP2): two processes on CPU against DDP, for LoRA and QAT.

The module is also the worker that ``torchrun`` starts:

    torchrun --nproc_per_node 2 test_fsdp.py LORA_MODEL QAT_MODEL CHECKPOINTS OUT --modes ddp,fsdp

For each mode it trains a LoRA run (tiny Llama) and a QAT run with distillation (tiny
DeepSeek-V3); the main process merges / converts and writes the final tensors, logits on fixed
tokens and the TrainResult of each run as OUT/MODE-KIND.{safetensors,json}.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from dsq.finetune.data import TokenBlocks
from dsq.finetune.trainer import TrainConfig, validation_shares
from dsq.tools.testing import free_port

ROOT = Path(__file__).resolve().parents[2]
STEPS = 4
CLIP = 0.3
REL = 1e-4  # losses, gradient norms, validation: DDP and FSDP differ only in float summation order


class _Data:
    def __init__(self, train: TokenBlocks, validation: TokenBlocks) -> None:
        self.train, self.validation = train, validation


def _blocks(n: int, length: int, seed: int) -> TokenBlocks:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 400, (n, length), generator=g)
    return TokenBlocks(input_ids=ids, labels=ids.clone(), attention_mask=torch.ones_like(ids))


def _config(fsdp: bool, lr: float, distill_weight: float = 0.0) -> TrainConfig:
    # grad_accum 2: sharded accumulation; max_grad_norm: clipping engaged; 5 validation blocks
    # on 2 ranks: one padding block
    return TrainConfig(max_steps=STEPS, batch_size=2, grad_accum=2, lr=lr, warmup_steps=1, max_grad_norm=CLIP,
                       distill_weight=distill_weight, eval_every=2, save_every=2, keep_checkpoints=2,
                       eval_batch_size=2, fsdp=fsdp)


# ----------------------------------------------------------------------------- the worker


def _plain(model: torch.nn.Module) -> bool:
    """No DTensor, no FSDP class, and deepcopy (which FSDP refuses) works."""
    from torch.distributed.tensor import DTensor

    from dsq.finetune.fsdp import is_sharded

    copy.deepcopy(model)
    return not is_sharded(model) and not any(isinstance(p, DTensor) for p in model.parameters())


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(3, 400, (2, 24), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def _qat_config():
    from dsq.finetune.qat import QATConfig
    from dsq.quantize import PerGroup, WeightScheme

    return QATConfig(WeightScheme(4, PerGroup(32)), learnable_scales=True)


def _tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def _worker() -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from dsq.finetune.lora import LoraSpec, apply_lora
    from dsq.finetune.merge import merge_into_fp
    from dsq.finetune.qat import convert_qat, prepare_qat
    from dsq.finetune.trainer import make_accelerator, train

    p = argparse.ArgumentParser()
    p.add_argument("lora_model")
    p.add_argument("qat_model")
    p.add_argument("checkpoints", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--modes", default="fsdp")
    args = p.parse_args()
    torch.set_num_threads(1)
    accelerator = make_accelerator()
    data = _Data(_blocks(32, 32, 0), _blocks(5, 32, 1))
    finals = {}
    rank = accelerator.process_index
    for mode in args.modes.split(","):
        fsdp = mode == "fsdp"
        torch.manual_seed(rank)  # LoRA initialised differently per rank: training starts from rank 0's
        peft_model = apply_lora(AutoModelForCausalLM.from_pretrained(args.lora_model), LoraSpec(r=8, alpha=16))
        result = train(peft_model, data, _config(fsdp, 3e-3), checkpoint_dir=args.checkpoints / f"{mode}-lora",
                       accelerator=accelerator, progress=False)
        finals[f"{mode}-lora"] = (result, _gather(_plain(peft_model)), peft_model)

        torch.manual_seed(rank)
        model = AutoModelForCausalLM.from_pretrained(args.qat_model)
        teacher = copy.deepcopy(model)
        prepare_qat(model, _qat_config())
        result = train(model, data, _config(fsdp, 1e-3, distill_weight=0.5), checkpoint_dir=args.checkpoints / f"{mode}-qat",
                       teacher=teacher, accelerator=accelerator, progress=False)
        finals[f"{mode}-qat"] = (result, _gather(_plain(model) and _plain(teacher)), model)

    accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()  # as the pipeline does: the main process alone goes on
    if not accelerator.is_main_process:
        return
    for name, (result, plain, trained) in finals.items():
        final = merge_into_fp(trained) if name.endswith("lora") else trained
        if name.endswith("qat"):
            convert_qat(final)
        save_file({**_tensors(final), "__logits__": _logits(final)}, str(args.out / f"{name}.safetensors"))
        (args.out / f"{name}.json").write_text(json.dumps({**result.to_dict(), "plain_on_ranks": plain}))


def _gather(value: object) -> list:
    out: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, value)
    return out


# ----------------------------------------------------------------------------- the tests


def _launch(models: tuple[Path, Path], checkpoints: Path, out: Path, modes: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    cmd = ["torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()), __file__,
           str(models[0]), str(models[1]), str(checkpoints), str(out), "--modes", modes]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]


def _load(out: Path, name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    return json.loads((out / f"{name}.json").read_text()), load_file(str(out / f"{name}.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """DDP and FSDP runs of LoRA and QAT in one launch; then, in fresh processes, the FSDP runs
    resumed from their step-2 checkpoints (``resume-KIND``)."""
    from dsq.tools.testing import make_tiny_checkpoint

    if shutil.which("torchrun") is None:
        pytest.skip("torchrun is not on PATH")
    tmp = tmp_path_factory.mktemp("fsdp")
    models = (make_tiny_checkpoint("llama", tmp / "llama"), make_tiny_checkpoint("deepseek_v3", tmp / "v3"))
    _launch(models, tmp / "ck", tmp / "out", "ddp,fsdp")
    resume = tmp / "ck-resume"
    for kind in ("lora", "qat"):
        shutil.copytree(tmp / "ck" / f"fsdp-{kind}", resume / f"fsdp-{kind}")
        shutil.rmtree(resume / f"fsdp-{kind}" / f"step-{STEPS:07d}")
    _launch(models, resume, tmp / "resumed", "fsdp")
    for kind in ("lora", "qat"):
        for suffix in ("json", "safetensors"):
            (tmp / "resumed" / f"fsdp-{kind}.{suffix}").rename(tmp / "out" / f"resume-{kind}.{suffix}")
    return tmp / "out"


KINDS = ["lora", "qat"]


@pytest.mark.parametrize("kind", KINDS)
def test_parameters_were_sharded_across_the_two_ranks(runs, kind):
    result, _ = _load(runs, f"fsdp-{kind}")
    s = result["sharding"]
    assert result["world_size"] == 2 and s["layers"] == 2
    # one trainable matrix: each rank holds half of it
    assert len(s["local_numel"]) == 2 and all(n == s["full_numel"] // 2 for n in s["local_numel"])
    if kind == "lora":
        assert "lora_" in s["param"]
    # all parameters: each rank about half (dim-0 sizes that do not split evenly round up)
    assert all(0.45 < n / s["total_params"] < 0.55 for n in s["local_params"])
    assert sum(s["local_params"]) >= s["total_params"]
    ddp, _ = _load(runs, f"ddp-{kind}")
    assert ddp["sharding"] is None


@pytest.mark.parametrize("kind", KINDS)
def test_both_ranks_end_with_identical_plain_full_weights(runs, kind):
    result, _ = _load(runs, f"fsdp-{kind}")
    digests = result["rank_weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert result["plain_on_ranks"] == [True, True]  # no DTensor or FSDP class left after training


@pytest.mark.parametrize("kind", KINDS)
def test_losses_gradient_norms_and_validation_match_ddp(runs, kind):
    fsdp, _ = _load(runs, f"fsdp-{kind}")
    ddp, _ = _load(runs, f"ddp-{kind}")
    assert [s for s, *_ in fsdp["step_log"]] == list(range(1, STEPS + 1))
    for (_, loss_f, norm_f), (_, loss_d, norm_d) in zip(fsdp["step_log"], ddp["step_log"], strict=True):
        assert loss_f == pytest.approx(loss_d, rel=REL)
        assert norm_f == pytest.approx(norm_d, rel=REL)
    assert any(norm > CLIP for _, _, norm in ddp["step_log"])  # the clip was engaged
    assert [s for s, _ in fsdp["validation"]] == [2, 4]
    for (_, v_f), (_, v_d) in zip(fsdp["validation"], ddp["validation"], strict=True):
        assert v_f == pytest.approx(v_d, rel=REL)
    assert fsdp["validation"][-1][1] < fsdp["validation"][0][1] + 0.5 and math.isfinite(fsdp["validation"][-1][1])


LOGITS = "__logits__"


def _converted_logits(runs: Path, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits (the worker's tokens) of the converted QAT model holding ``tensors``."""
    from transformers import AutoModelForCausalLM

    from dsq.finetune.qat import convert_qat, prepare_qat

    model = AutoModelForCausalLM.from_pretrained(runs.parent / "v3")
    prepare_qat(model, _qat_config())
    convert_qat(model)
    model.load_state_dict({k: v for k, v in tensors.items() if k != LOGITS}, strict=True)
    return _logits(model)


@pytest.mark.parametrize("kind", KINDS)
def test_merged_or_converted_artifact_matches_ddp(runs, kind):
    _, fsdp = _load(runs, f"fsdp-{kind}")
    _, ddp = _load(runs, f"ddp-{kind}")
    assert fsdp.keys() == ddp.keys()
    for name in fsdp.keys() - {LOGITS}:
        a, b = fsdp[name], ddp[name]
        assert a.shape == b.shape and a.dtype == b.dtype, name
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)
        else:  # packed integer weights: a value on a rounding boundary may land one step apart
            assert (a != b).float().mean() <= 1e-3, name
    if kind == "lora":
        torch.testing.assert_close(fsdp[LOGITS], ddp[LOGITS], rtol=1e-4, atol=1e-4)
        return
    assert any(not t.is_floating_point() for t in fsdp.values())  # converted: packed weights
    # FSDP reduces gradients in another order than DDP (and each CPU's float kernels block sums their own
    # way), so a latent weight on a rounding boundary may convert one 4-bit step apart: measured, 1 of
    # 65536 expert values on an AVX512-BF16 EPYC, moving the logits by 4.1e-4; none on AVX2 hosts. The
    # logits must be those of the weights: DDP's floats with FSDP's integers give FSDP's logits (1.3e-5).
    torch.testing.assert_close(_converted_logits(runs, ddp), ddp[LOGITS], rtol=1e-5, atol=1e-5)
    mixed = {**ddp, **{k: v for k, v in fsdp.items() if not v.is_floating_point()}}
    torch.testing.assert_close(_converted_logits(runs, mixed), fsdp[LOGITS], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_a_resumed_fsdp_run_ends_at_the_same_weights(runs, kind):
    full, full_tensors = _load(runs, f"fsdp-{kind}")
    resumed, resumed_tensors = _load(runs, f"resume-{kind}")
    assert resumed["resumed_from_step"] == 2 and full["resumed_from_step"] is None
    assert resumed["rank_weight_digests"] == full["rank_weight_digests"]
    assert resumed["validation"][-1] == full["validation"][-1]
    assert all(torch.equal(resumed_tensors[k], full_tensors[k]) for k in full_tensors)
    # the checkpoint holds full tensors, as an unsharded run writes them
    from safetensors.torch import load_file

    saved = load_file(str(runs.parent / "ck" / f"fsdp-{kind}" / f"step-{STEPS:07d}" / "trainable.safetensors"))
    name = full["sharding"]["param"]
    assert saved[name].numel() == full["sharding"]["full_numel"]


def test_validation_shares_pad_to_equal_counts_and_cover_every_block_once():
    shares = [validation_shares(5, r, 2) for r in range(2)]
    assert [len(i) for i, _ in shares] == [3, 3]
    real = sorted(i for idx, keep in shares for i in idx[keep].tolist())
    assert real == [0, 1, 2, 3, 4]
    assert [int(keep.sum()) for _, keep in shares] == [3, 2]


def test_the_training_box_recipe_sets_fsdp():
    from dsq.run.recipe import load_recipe
    from dsq.run.train import train_config

    recipe = load_recipe(ROOT / "recipes" / "training_box_fsdp_lora.yaml")
    assert recipe.finetune.lora is not None
    assert train_config(recipe.finetune.training).fsdp is True
    assert train_config(load_recipe(ROOT / "recipes" / "lora_domain.yaml").finetune.training).fsdp is False
    # the layout is not part of a checkpoint's settings: FSDP and DDP checkpoints hold the same full tensors
    assert "fsdp" not in TrainConfig(fsdp=True).fingerprint()


if __name__ == "__main__":
    _worker()
