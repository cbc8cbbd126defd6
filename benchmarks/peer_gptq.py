"""GPTQ wall time of dsq beside llm-compressor 0.14 on one synthetic Llama- or Qwen2-shaped model, same run.

What both sides get:

- one model directory written here from seeded random weights (transformers' ``LlamaConfig`` or
  ``Qwen2Config``, fp32 safetensors) with a byte-level BPE tokenizer trained on dsq's bundled
  calibration text (:func:`dsq.tools.testing.byte_bpe_tokenizer`);
- one token file (``tokens.pt``): the calibration ids, ``--samples`` x ``--seq-len`` consecutive windows of
  the bundled calibration text (``dsq/assets/data/calibration.txt``) as that tokenizer encodes it, and the
  held-out ids, ``--eval-samples`` windows of ``dsq/assets/data/heldout.txt``;
- int4, symmetric, one scale per 128 input columns, min/max ranges where the row says so, damping 0.01 of the
  mean Hessian diagonal, lazy-update blocks of 128 columns, every decoder Linear quantized, lm_head kept;
- ``--threads`` torch threads (``OMP_NUM_THREADS`` too).

dsq runs in this process (``quantize_(model, GPTQConfig(...), calibration=ids)``), once per row of
:data:`DSQ_ROWS`. llm-compressor runs in its own virtual environment (``--venv``, created and installed by
this script: ``llmcompressor==0.14.*`` pins transformers <= 5.17 and compressed-tensors 0.19, which this
environment does not have), through a driver script written to a temporary file:
``oneshot(model, dataset, recipe=GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"]))``
with the same ids as a ``datasets.Dataset``. Wall time is the ``quantize_`` / ``oneshot`` call alone
(model loading, quality scoring and saving excluded). The peer's quantized model is saved with
``save_compressed=True`` and its ``quantization_config`` read back, and every module it quantized is
checked to lie on its int4 grid, so the rows compare the same work.

Quality: every row's logits on the held-out ids against the fp32 model's, scored by one function here:
mean per-token KL(fp || quantized), top-1 agreement and held-out perplexity.

If the peer cannot be installed or run, a ``peer skipped: <reason>`` line is printed and dsq's rows still are.

    python benchmarks/peer_gptq.py [--arch llama|qwen2] [--hidden 768] [--layers 6] [--intermediate N]
        [--vocab 4096] [--samples 64] [--seq-len 256] [--eval-samples 16] [--threads 2] [--skip-peer]
        [--out runs/peers/gptq] [--venv runs/peers/llmcompressor]
"""
from __future__ import annotations

import os

# Nothing is fetched at run time: set before transformers and huggingface_hub are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import argparse
import enum
import importlib.metadata
import json
import math
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dsq.eval.memory import avx512_flags, machine_info

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "dsq" / "assets" / "data"
PEER_REQUIREMENT = "llmcompressor==0.14.*"
# The CPU build of the torch this environment runs; a bare ``torch`` pulls a multi-GB CUDA build.
PEER_TORCH = f"torch=={torch.__version__}"
PEER_INSTALL_TIMEOUT_S = 1800
PEER_RUN_TIMEOUT_S = 3600


class Arch(enum.Enum):
    """Which transformers architecture the synthetic model has."""

    LLAMA = "llama"
    QWEN2 = "qwen2"


@dataclass(frozen=True)
class ModelShape:
    """Shape of the synthetic decoder (``intermediate`` a multiple of 128 so every Linear has whole groups)."""

    arch: Arch
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int

    def __post_init__(self) -> None:
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"hidden {self.hidden}, heads {self.heads}, kv_heads {self.kv_heads}: hidden must be "
                             "a multiple of heads and heads a multiple of kv_heads")
        for name in ("hidden", "intermediate"):
            if getattr(self, name) % 128:
                raise ValueError(f"{name} {getattr(self, name)} must be a multiple of the group size 128")
        if self.hidden // self.heads * self.kv_heads % 128:
            raise ValueError(f"k/v projection width {self.hidden // self.heads * self.kv_heads} must be a multiple of 128")


def default_intermediate(hidden: int) -> int:
    """About 2.75 x ``hidden`` (Llama's ratio), rounded up to a multiple of 128."""
    return math.ceil(2.75 * hidden / 128) * 128


@dataclass(frozen=True)
class DsqRow:
    """One dsq GPTQ setting."""

    act_order: bool
    mse_scales: bool

    @property
    def label(self) -> str:
        order = "act-order static" if self.act_order else "no act-order"
        scales = "mse scales" if self.mse_scales else "min/max scales"
        return f"dsq gptq, {order}, {scales}"


# First row: the like-for-like one (llm-compressor 0.14's GPTQModifier defaults: actorder "static", i.e. columns in
# decreasing diag(H) order with every group's scale fixed from the original weight first, and the
# "memoryless_minmax" observer); second: dsq's own defaults. One difference stays: for symmetric int4 the peer's
# min/max scale is max|w| / 7.5 (compressed-tensors: the range over (qmax - qmin) / 2, so -8 is used and +max|w|
# clips to 7), dsq's is max|w| / 7.
DSQ_ROWS = (
    DsqRow(act_order=True, mse_scales=False),
    DsqRow(act_order=True, mse_scales=True),
    DsqRow(act_order=False, mse_scales=False),
    DsqRow(act_order=False, mse_scales=True),
)


# ---------------------------------------------------------------------------------------------------------
# peer environment


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def peer_versions(venv: Path) -> dict[str, str] | None:
    """Versions of the peer's packages in ``venv``, or None if llmcompressor does not import there."""
    probe = (
        "import json, importlib.metadata as m, llmcompressor\n"
        "print(json.dumps({p: m.version(p) for p in "
        "('llmcompressor', 'compressed-tensors', 'torch', 'transformers', 'datasets', 'accelerate')}))"
    )
    python = _venv_python(venv)
    if not python.exists():
        return None
    done = subprocess.run([str(python), "-c", probe], check=False, capture_output=True, text=True, timeout=300, env=_child_env(1))
    if done.returncode != 0:
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def ensure_peer_venv(venv: Path, log: Path) -> tuple[dict[str, str] | None, str]:
    """Create ``venv`` and install llm-compressor 0.14 with this environment's CPU torch, unless it already works.

    Returns:
        (versions, "") when llmcompressor imports there, else (None, reason).
    """
    versions = peer_versions(venv)
    if versions is not None and versions["llmcompressor"].startswith("0.14."):
        return versions, ""
    log.parent.mkdir(parents=True, exist_ok=True)
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(_venv_python(venv)), "-m", "pip", "install", "--upgrade", "pip"],
        [str(_venv_python(venv)), "-m", "pip", "install", PEER_REQUIREMENT, PEER_TORCH],
    ]
    with log.open("w") as out:
        for cmd in steps:
            out.write(f"$ {' '.join(cmd)}\n")
            out.flush()
            try:
                done = subprocess.run(cmd, check=False, stdout=out, stderr=subprocess.STDOUT, timeout=PEER_INSTALL_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                return None, f"`{' '.join(cmd)}` ran past {PEER_INSTALL_TIMEOUT_S} s (log: {log})"
            if done.returncode != 0:
                return None, f"`{' '.join(cmd)}` exited {done.returncode}: {_tail(log)} (log: {log})"
    versions = peer_versions(venv)
    if versions is None:
        return None, f"llmcompressor does not import in {venv} after installing (log: {log})"
    return versions, ""


def _tail(path: Path, lines: int = 3) -> str:
    text = path.read_text(errors="replace").strip().splitlines()
    return " | ".join(text[-lines:])


def _child_env(threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return env


# ---------------------------------------------------------------------------------------------------------
# the shared model and token ids


def write_model_dir(directory: Path, shape: ModelShape, max_positions: int, seed: int) -> Path:
    """Write a seeded random model of ``shape`` (fp32 safetensors) and a BPE tokenizer to ``directory``."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from dsq.tools.testing import byte_bpe_tokenizer

    tokenizer = byte_bpe_tokenizer((DATA / "calibration.txt").read_text().splitlines(), shape.vocab)
    config_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if shape.arch is Arch.LLAMA else (Qwen2Config, Qwen2ForCausalLM)
    config = config_cls(
        hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, vocab_size=shape.vocab,
        max_position_embeddings=max_positions, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config).to(torch.float32).eval()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def token_windows(ids: torch.Tensor, samples: int, seq_len: int, source: str) -> torch.Tensor:
    """The first ``samples`` consecutive, non-overlapping windows of ``seq_len`` ids of the 1-D ``ids``.

    Returns:
        ``(samples, seq_len)`` int64.

    Raises:
        ValueError: ``ids`` (tokens of ``source``) is too short.
    """
    need = samples * seq_len
    if samples < 1 or seq_len < 2:
        raise ValueError(f"need samples >= 1 and seq_len >= 2, got {samples} x {seq_len}")
    if ids.numel() < need:
        raise ValueError(f"{source} has {ids.numel()} tokens, fewer than {samples} x {seq_len} = {need}")
    return ids[:need].reshape(samples, seq_len).to(torch.int64)


def write_tokens(path: Path, model_dir: Path, samples: int, eval_samples: int, seq_len: int) -> dict[str, torch.Tensor]:
    """Encode the bundled calibration and held-out texts with the model's tokenizer; save both id tensors."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokens = {}
    for key, name, n in (("calibration", "calibration.txt", samples), ("heldout", "heldout.txt", eval_samples)):
        ids = torch.tensor(tokenizer((DATA / name).read_text(), add_special_tokens=False)["input_ids"])
        tokens[key] = token_windows(ids, n, seq_len, f"dsq/assets/data/{name}")
    torch.save(tokens, path)
    return tokens


# ---------------------------------------------------------------------------------------------------------
# quality


@dataclass(frozen=True)
class Quality:
    """A quantized model's held-out logits against the fp model's."""

    mean_kl: float  # KL(fp || quantized) per next-token distribution, nats
    top1_agreement: float  # share of positions where both argmaxes agree
    ppl: float  # held-out perplexity of the quantized model


def logits_on(model: torch.nn.Module, ids: torch.Tensor, batch: int = 4) -> torch.Tensor:
    """``(samples, seq_len, vocab)`` fp32 logits of ``model`` on ``ids`` ``(samples, seq_len)``."""
    with torch.no_grad():
        return torch.cat([model(input_ids=ids[i:i + batch]).logits.float() for i in range(0, len(ids), batch)])


def perplexity_of(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Next-token perplexity of ``logits`` ``(S, T, V)`` on ``ids`` ``(S, T)`` (positions 1..T-1 scored)."""
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    return math.exp(nll.mean().item())


def score(reference: torch.Tensor, candidate: torch.Tensor, ids: torch.Tensor) -> Quality:
    """KL(reference || candidate) per position, top-1 agreement and the candidate's perplexity.

    Args:
        reference, candidate: ``(S, T, V)`` logits of the fp and the quantized model on ``ids`` ``(S, T)``.
    """
    if reference.shape != candidate.shape:
        raise ValueError(f"logits shapes differ: reference {tuple(reference.shape)}, candidate {tuple(candidate.shape)}")
    p = torch.log_softmax(reference.double(), dim=-1)
    q = torch.log_softmax(candidate.double(), dim=-1)
    kl = (p.exp() * (p - q)).sum(-1)  # (S, T)
    agree = (reference.argmax(-1) == candidate.argmax(-1)).double().mean()
    return Quality(kl.mean().item(), agree.item(), perplexity_of(candidate, ids))


# ---------------------------------------------------------------------------------------------------------
# the two sides


@dataclass(frozen=True)
class Result:
    """One row: what ran, its wall seconds, how many modules it quantized and the quality it kept."""

    label: str
    seconds: float
    cpu_seconds: float  # process CPU time of the same call (all threads): less sensitive to other load
    quantized_modules: int
    quality: Quality


def warm_up_linalg() -> None:
    """First calls of torch's LAPACK routines pay a one-off setup (seconds here): both sides pay it untimed."""
    a = torch.randn(256, 256, dtype=torch.float64)
    h = a @ a.T + 256 * torch.eye(256, dtype=torch.float64)
    for dtype in (torch.float32, torch.float64):
        torch.cholesky_inverse(torch.linalg.cholesky(h.to(dtype)))
        torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h.to(dtype))), upper=True)


def load_model(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def run_dsq(row: DsqRow, model_dir: Path, tokens: dict[str, torch.Tensor], reference: torch.Tensor) -> Result:
    """Quantize a fresh copy of the model with dsq's GPTQ at ``row``'s settings; time the ``quantize_`` call."""
    from dsq.quantize import GPTQConfig, PerGroup, WeightScheme, quantize_

    model = load_model(model_dir)
    config = GPTQConfig(scheme=WeightScheme(4, PerGroup(128), symmetric=True), damp=0.01, block_size=128,
                        act_order=row.act_order, mse_scales=row.mse_scales)
    start, cpu = time.perf_counter(), time.process_time()
    report = quantize_(model, config, calibration=tokens["calibration"], progress=False)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    quality = score(reference, logits_on(model, tokens["heldout"]), tokens["heldout"])
    return Result(row.label, seconds, cpu, len(report.quantized), quality)


PEER_DRIVER = r'''
"""llm-compressor GPTQ on the benchmark's model and token ids (written and run by benchmarks/peer_gptq.py)."""
import json, sys, time
from pathlib import Path

import torch

args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from llmcompressor import oneshot
from llmcompressor.modifiers.gptq import GPTQModifier

out = Path(args["out"])
tokens = torch.load(args["tokens"])
calibration, heldout = tokens["calibration"], tokens["heldout"]
model = AutoModelForCausalLM.from_pretrained(args["model"], dtype=torch.float32).eval()
tokenizer = AutoTokenizer.from_pretrained(args["model"])


def logits_on(m, ids, batch=4):
    with torch.no_grad():
        return torch.cat([m(input_ids=ids[i:i + batch]).logits.float() for i in range(0, len(ids), batch)])


torch.save(logits_on(model, heldout), out / "peer_fp_logits.pt")
def warm_up_linalg():
    """First calls of torch's LAPACK routines pay a one-off setup (seconds here): both sides pay it untimed."""
    a = torch.randn(256, 256, dtype=torch.float64)
    h = a @ a.T + 256 * torch.eye(256, dtype=torch.float64)
    for dtype in (torch.float32, torch.float64):
        torch.cholesky_inverse(torch.linalg.cholesky(h.to(dtype)))
        torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h.to(dtype))), upper=True)


warm_up_linalg()
dataset = Dataset.from_dict({"input_ids": calibration.tolist(), "attention_mask": torch.ones_like(calibration).tolist()})
recipe = GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"], block_size=128, dampening_frac=0.01)
start, cpu = time.perf_counter(), time.process_time()
oneshot(model=model, tokenizer=tokenizer, dataset=dataset, recipe=recipe, num_calibration_samples=len(calibration),
        max_seq_length=calibration.shape[1], batch_size=args["batch_size"])
seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
torch.save(logits_on(model, heldout), out / "peer_q_logits.pt")

def plain(value):
    """An enum's value (compressed-tensors stores some settings as enums, some as their strings)."""
    return getattr(value, "value", value)


# every module it quantized: its resolved weight settings, and its weight on the int4 grid of its scales
quantized, settings, worst_off_grid, qrange = [], set(), 0.0, [0, 0]
for name, module in model.named_modules():
    scheme = getattr(module, "quantization_scheme", None)
    if scheme is None or scheme.weights is None or not hasattr(module, "weight_scale"):
        continue
    w = scheme.weights
    settings.add(json.dumps({"num_bits": w.num_bits, "symmetric": w.symmetric, "strategy": plain(w.strategy),
                             "group_size": w.group_size, "actorder": plain(w.actorder), "observer": plain(w.observer)},
                            sort_keys=True))
    weight = module.weight.detach().float()
    g_idx = getattr(module, "weight_g_idx", None)
    cols = torch.arange(weight.shape[1]) // w.group_size if g_idx is None else g_idx.long()
    scale = module.weight_scale.detach().float()[:, cols]
    zero = module.weight_zero_point.detach().float()[:, cols] if hasattr(module, "weight_zero_point") else 0.0
    q = weight / scale + zero
    worst_off_grid = max(worst_off_grid, (q - q.round()).abs().max().item())
    qrange = [min(qrange[0], int(q.round().min())), max(qrange[1], int(q.round().max()))]
    quantized.append(name)

model.save_pretrained(out / "peer_model", save_compressed=True)
saved = json.loads((out / "peer_model" / "config.json").read_text()).get("quantization_config")
json.dump({"seconds": seconds, "cpu_seconds": cpu, "quantized_modules": quantized, "settings": sorted(settings),
           "worst_off_grid": worst_off_grid, "int_range": qrange, "saved_quantization_config": saved},
          open(out / "peer_result.json", "w"), indent=1)
'''


@dataclass(frozen=True)
class PeerRun:
    """What the peer driver reported."""

    result: Result
    settings: list[str]
    worst_off_grid: float
    int_range: list[int]
    saved_format: str | None
    saved_weights: dict | None
    fp_logits_max_diff: float
    solve_seconds: float  # the sum of its per-module "GPTQ | METRIC - time" log lines: the solves alone


def run_peer(venv: Path, model_dir: Path, tokens_path: Path, out: Path, tokens: dict[str, torch.Tensor],
             reference: torch.Tensor, threads: int, batch_size: int, log: Path) -> tuple[PeerRun | None, str]:
    """Run llm-compressor's GPTQ in ``venv`` on the same model and ids; returns (run, "") or (None, reason)."""
    with tempfile.NamedTemporaryFile("w", suffix="_llmc_driver.py", delete=False) as f:
        f.write(PEER_DRIVER)
        driver = Path(f.name)
    args = {"model": str(model_dir.resolve()), "tokens": str(tokens_path.resolve()), "out": str(out.resolve()),
            "threads": threads, "batch_size": batch_size}
    try:
        with log.open("w") as sink:
            done = subprocess.run([str(_venv_python(venv)), str(driver), json.dumps(args)], check=False, stdout=sink,
                                  stderr=subprocess.STDOUT, cwd=out, env=_child_env(threads), timeout=PEER_RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return None, f"the llm-compressor run went past {PEER_RUN_TIMEOUT_S} s (log: {log})"
    finally:
        driver.unlink(missing_ok=True)
    if done.returncode != 0:
        return None, f"the llm-compressor run exited {done.returncode}: {_tail(log)} (log: {log})"
    info = json.loads((out / "peer_result.json").read_text())
    peer_fp = torch.load(out / "peer_fp_logits.pt")
    quality = score(reference, torch.load(out / "peer_q_logits.pt"), tokens["heldout"])
    saved = info["saved_quantization_config"] or {}
    groups = saved.get("config_groups") or {}
    weights = next(iter(groups.values()), {}).get("weights") if groups else None
    label = f"llm-compressor gptq W4A16 (actorder {json.loads(info['settings'][0])['actorder'] if info['settings'] else '?'})"
    return PeerRun(
        result=Result(label, info["seconds"], info["cpu_seconds"], len(info["quantized_modules"]), quality),
        settings=info["settings"], worst_off_grid=info["worst_off_grid"], int_range=info["int_range"],
        saved_format=saved.get("format"), saved_weights=weights,
        fp_logits_max_diff=(peer_fp - reference).abs().max().item(),
        solve_seconds=sum(float(t) for t in re.findall(r"GPTQ \| METRIC - time ([0-9.]+)s", log.read_text())),
    ), ""


# ---------------------------------------------------------------------------------------------------------
# report


def cpu_flags() -> str:
    return f"{machine_info()['cpu']}; avx512 flags: {' '.join(avx512_flags()) or 'none'}"


def local_versions() -> dict[str, str]:
    names = ("dsq", "torch", "transformers", "compressed-tensors", "safetensors")
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def table(rows: list[Result], peer: Result | None) -> list[str]:
    lines = [
        "| tool, settings | wall s | x peer | cpu s | x peer | quantized modules | mean KL vs fp | top-1 agree | held-out ppl |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = f"{r.seconds / peer.seconds:.2f}" if peer else "-"
        cpu_ratio = f"{r.cpu_seconds / peer.cpu_seconds:.2f}" if peer else "-"
        q = r.quality
        lines.append(f"| {r.label} | {r.seconds:.1f} | {ratio} | {r.cpu_seconds:.1f} | {cpu_ratio} | {r.quantized_modules} | "
                     f"{q.mean_kl:.5f} | "
                     f"{q.top1_agreement:.4f} | {q.ppl:.2f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=[a.value for a in Arch], default=Arch.LLAMA.value)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--intermediate", type=int, default=None, help="default: 2.75 x hidden, up to a multiple of 128")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--samples", type=int, default=64, help="calibration sequences")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-samples", type=int, default=16, help="held-out sequences scored")
    parser.add_argument("--batch-size", type=int, default=8, help="calibration sequences per forward, both sides "
                        "(dsq's GPTQConfig default; llm-compressor's oneshot defaults to 1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-peer", action="store_true", help="dsq rows only")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "peers" / "gptq")
    parser.add_argument("--venv", type=Path, default=REPO / "runs" / "peers" / "llmcompressor")
    args = parser.parse_args(argv)
    try:
        shape = ModelShape(Arch(args.arch), args.hidden, args.layers, args.intermediate or default_intermediate(args.hidden),
                           args.vocab, args.heads, args.kv_heads)
    except ValueError as exc:
        parser.error(str(exc))

    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = write_model_dir(args.out / "model", shape, args.seq_len, args.seed)
    tokens_path = args.out / "tokens.pt"
    try:
        tokens = write_tokens(tokens_path, model_dir, args.samples, args.eval_samples, args.seq_len)
    except ValueError as exc:
        parser.error(str(exc))
    reference = logits_on(load_model(model_dir), tokens["heldout"])
    warm_up_linalg()
    n_params = sum(t.numel() for t in load_model(model_dir).parameters())
    print(f"model: {shape.arch.value}, hidden {shape.hidden}, {shape.layers} layers, intermediate {shape.intermediate}, "
          f"heads {shape.heads}/{shape.kv_heads} kv, vocab {shape.vocab}, {n_params / 1e6:.1f}M parameters (fp32), "
          f"seed {args.seed}: {model_dir}")
    print(f"calibration: {args.samples} x {args.seq_len} ids of dsq/assets/data/calibration.txt; held-out: "
          f"{args.eval_samples} x {args.seq_len} ids of dsq/assets/data/heldout.txt; batch {args.batch_size}; "
          f"{args.threads} threads")
    print(f"cpu: {cpu_flags()}")
    print(f"this environment: {json.dumps(local_versions())}", flush=True)

    peer_run, peer_reason = None, "--skip-peer"
    if not args.skip_peer:
        versions, peer_reason = ensure_peer_venv(args.venv, args.venv.parent / "llmcompressor-install.log")
        if versions is not None:
            print(f"peer environment ({args.venv}): {json.dumps(versions)}", flush=True)
            peer_run, peer_reason = run_peer(args.venv, model_dir, tokens_path, args.out, tokens, reference,
                                             args.threads, args.batch_size, args.out / "peer_run.log")
    if peer_run is None:
        print(f"peer skipped: {peer_reason}", flush=True)
    else:
        print(f"peer: {peer_run.result.label}: {peer_run.result.seconds:.1f} s ({peer_run.solve_seconds:.1f} s in its GPTQ "
              f"solves by its log), {peer_run.result.quantized_modules} modules; "
              f"resolved weight settings {peer_run.settings}; weights on their int grid to {peer_run.worst_off_grid:.1e} "
              f"(ints {peer_run.int_range[0]}..{peer_run.int_range[1]}); saved format {peer_run.saved_format}, "
              f"weights {json.dumps(peer_run.saved_weights)}; its fp logits vs this environment's: max |diff| "
              f"{peer_run.fp_logits_max_diff:.1e}", flush=True)

    rows = []
    for row in DSQ_ROWS:
        rows.append(run_dsq(row, model_dir, tokens, reference))
        print(f"done: {rows[-1].label}: {rows[-1].seconds:.1f} s", flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    peer = peer_run.result if peer_run else None
    print()
    print("\n".join(table(rows + ([peer] if peer else []), peer)))
    if peer:
        like = rows[0]
        verdict = "met" if like.seconds <= peer.seconds else "NOT met"
        print(f"\nlike-for-like: '{like.label}' vs '{peer.label}': {like.seconds:.1f} s vs {peer.seconds:.1f} s "
              f"({like.seconds / peer.seconds:.2f}x); floor (dsq wall <= llm-compressor's): {verdict}")
    print(f"1-minute load average at the end: {load:.1f} on {os.cpu_count()} cpus (other processes skew wall times; "
          "cpu s is this process's CPU time of the call, all threads)")
    (args.out / "peer_gptq.json").write_text(json.dumps({
        "rows": [r.__dict__ | {"quality": r.quality.__dict__} for r in rows + ([peer] if peer else [])],
        "peer_skipped": None if peer else peer_reason}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
