"""Calibrated methods on CUDA against CPU, on tiny random DeepSeek-V3 and Llama checkpoints.

For GPTQ, AWQ and static W8A8 + SmoothQuant: quantize the same model on CPU and on CUDA with the
same calibration tokens, print each one's relative logit error against the fp model, the CPU vs
CUDA difference, the int8 matmul that ran, and peak CUDA memory. Needs a CUDA device.

    python benchmarks/cuda_parity.py
"""
import copy
import importlib.util
import tempfile
import time

import torch
from dsq.tools.testing import make_tiny_checkpoint
from dsq.core.loading import load_checkpoint
from dsq.quantize import GPTQConfig, AWQConfig, W8A8Config, WeightScheme, PerGroup, quantize_, BnbNF4Config
from dsq.quantize.w8a8 import StaticPerTensor, w8a8_matmul_calls

print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0))
for arch in ["deepseek_v3", "llama"]:
    d = tempfile.mkdtemp(); make_tiny_checkpoint(arch, d)
    base = load_checkpoint(d).model
    ids = torch.randint(0, base.config.vocab_size, (8, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = base(input_ids=ids).logits
    for name, cfg in [("gptq", GPTQConfig(WeightScheme(4, PerGroup(32)), batch_size=4)),
                      ("awq", AWQConfig(WeightScheme(4, PerGroup(32)), batch_size=4)),
                      ("w8a8-static-sq", W8A8Config(StaticPerTensor(), 0.5, batch_size=4))]:
        out = {}
        for dev in ["cpu", "cuda"]:
            m = copy.deepcopy(base).to(dev)
            t = time.time()
            torch.cuda.reset_peak_memory_stats()
            rep = quantize_(m, cfg, calibration=ids, progress=False)
            secs = time.time() - t
            with torch.no_grad():
                out[dev] = m(input_ids=ids.to(dev)).logits.float().cpu()
            extra = f"peak cuda MiB {torch.cuda.max_memory_allocated()/2**20:.0f}" if dev == "cuda" else ""
            rel = float((out[dev] - ref).norm() / ref.norm())
            print(f"{arch} {name} {dev}: {secs:.1f}s rel err vs fp {rel:.4f} scheme={rep.scheme} {extra}", flush=True)
            if name.startswith("w8a8"):
                print("   matmul calls", w8a8_matmul_calls(m))
        agree = float((out["cpu"].argmax(-1) == out["cuda"].argmax(-1)).float().mean())
        print(f"{arch} {name}: cpu vs cuda max|dlogit| {float((out['cpu']-out['cuda']).abs().max()):.2e} top1 agree {agree:.3f}", flush=True)
    if importlib.util.find_spec("bitsandbytes") is None:
        print("bitsandbytes not installed: bnb-nf4 skipped")
        continue
    m = copy.deepcopy(base).to("cuda")
    rep = quantize_(m, BnbNF4Config(), progress=False)
    with torch.no_grad():
        o = m(input_ids=ids.to("cuda")).logits.float().cpu()
    print(f"{arch} bnb-nf4 cuda: rel err {float((o-ref).norm()/ref.norm()):.4f}, kept {[k.name for k in rep.kept][:4]}", flush=True)
