"""Does onnxruntime-genai run dsq's ONNX exports? Greedy tokens of genai against OrtCausalLM.

Makes a tiny random Llama checkpoint in a temp dir, exports it fp32 and RTN int4 (group 32,
``MatMulNBits``), then for a few prompts generates 32 tokens greedily with onnxruntime-genai (reading
the export's ``genai_config.json``) and with :class:`dsq.export.OrtCausalLM`, and compares the ids.
genai stops at an ``eos_token_id`` of the config; the OrtCausalLM row is cut at the same place.
Exits 1 when any tokens differ; exits 0 with "onnxruntime-genai not installed" when it does not
import. Run it with a python where ``onnxruntime_genai`` imports (a venv with
``--system-site-packages`` and ``pip install onnxruntime-genai``):

    OMP_NUM_THREADS=1 /tmp/genai-venv/bin/python benchmarks/genai_check.py
"""
import json
import logging
import sys
import tempfile
from pathlib import Path

try:
    import onnxruntime_genai as og
except ImportError as exc:
    print(f"onnxruntime-genai not installed ({exc}): nothing checked")
    sys.exit(0)

import onnx
import onnxruntime
import torch
import transformers
from dsq.core.loading import load_checkpoint
from dsq.export import OrtCausalLM, export_onnx
from dsq.export.genai import genai_greedy as _genai_greedy
from dsq.quantize import PerGroup, RTNConfig, TargetSpec, WeightScheme, quantize_
from dsq.tools.testing import make_tiny_checkpoint

NEW_TOKENS = 32
THREADS = 1
transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
logging.getLogger("torch.onnx").setLevel(logging.ERROR)


def genai_greedy(directory: Path, prompt: list[int], new_tokens: int) -> list[int]:
    return _genai_greedy(directory, prompt, new_tokens, threads=THREADS)


def ort_greedy(directory: Path, prompt: list[int], new_tokens: int, eos: set[int]) -> list[int]:
    ids = OrtCausalLM(directory, threads=THREADS).generate(torch.tensor([prompt]), max_new_tokens=new_tokens)
    out = []
    for token in ids[0, len(prompt):].tolist():
        out.append(token)
        if token in eos:
            break
    return out


def main() -> int:
    print(f"onnxruntime-genai {og.__version__}, onnxruntime {onnxruntime.__version__}, torch {torch.__version__}")
    gen = torch.Generator().manual_seed(0)
    prompts = [[0, 17, 42, 99, 123, 7, 250, 311]] + [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (1, 5, 24)]
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = make_tiny_checkpoint("llama", Path(tmp) / "llama", vocab_size=512)
        for name in ("fp32", "int4"):
            lm = load_checkpoint(checkpoint)
            if name == "int4":
                quantize_(lm.model, RTNConfig(scheme=WeightScheme(4, PerGroup(32), True), targets=TargetSpec()), progress=False)
            out = Path(tmp) / f"llama-{name}"
            export_onnx(lm.model, lm.tokenizer, out)
            genai_cfg = json.loads((out / "genai_config.json").read_text())["model"]
            eos = genai_cfg.get("eos_token_id", [])
            eos = set(eos if isinstance(eos, list) else [eos])
            graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
            ops = sum(node.op_type == "MatMulNBits" for node in graph.node)
            tok = og.Tokenizer(og.Model(str(out)))
            text = "hello world, the quick brown fox"
            same_tok = list(tok.encode(text)) == lm.tokenizer(text, add_special_tokens=False).input_ids
            print(f"llama {name}: type={genai_cfg['type']} eos={sorted(eos)} MatMulNBits nodes={ops} "
                  f"genai tokenizer encodes like transformers: {same_tok}")
            for prompt in prompts:
                got = genai_greedy(out, prompt, NEW_TOKENS)
                want = ort_greedy(out, prompt, NEW_TOKENS, eos)
                same = got == want
                failures += not same
                print(f"  prompt len {len(prompt):2d}: {len(got):2d} genai tokens, identical to OrtCausalLM: {same}")
                if not same:
                    print(f"    genai       {got}\n    OrtCausalLM {want}")
    print("RESULT:", "tokens identical" if not failures else f"{failures} prompt(s) differ")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
