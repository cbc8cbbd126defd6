"""onnxruntime-genai runs dsq's Llama exports from the written genai_config.json, token for token."""
from __future__ import annotations

import pytest
import torch

from dsq.export import OrtCausalLM

og = pytest.importorskip("onnxruntime_genai")


def _genai_greedy(directory, prompt: list[int], new_tokens: int) -> list[int]:
    model = og.Model(str(directory))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + new_tokens)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    out = []
    while not generator.is_done():
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return out


@pytest.mark.parametrize("variant", ["fp", "int4"])
def test_genai_generates_the_tokens_of_ort_causal_lm(exported, variant):
    loaded, result = exported("llama", variant)
    prompt = [0, 17, 42, 99, 7]
    theirs = _genai_greedy(result.path, prompt, 24)
    eos = loaded.model.config.eos_token_id
    ours = OrtCausalLM(result.path).generate(torch.tensor([prompt]), max_new_tokens=24, eos_token_id=eos)
    assert theirs == ours[0, len(prompt):].tolist()[: len(theirs)] and len(theirs) >= 1
    if theirs[-1] != eos:
        assert len(theirs) == 24
