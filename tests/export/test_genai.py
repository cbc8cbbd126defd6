"""onnxruntime-genai runs dsq's Llama exports from the written genai_config.json, token for token."""
from __future__ import annotations

import pytest
import torch

from dsq.export import OrtCausalLM
from dsq.export.genai import genai_greedy

og = pytest.importorskip("onnxruntime_genai")


@pytest.mark.parametrize("variant", ["fp", "int4"])
def test_genai_generates_the_tokens_of_ort_causal_lm(exported, variant):
    loaded, result = exported("llama", variant)
    prompt = [0, 17, 42, 99, 7]
    theirs = genai_greedy(result.path, prompt, 24)
    eos = loaded.model.config.eos_token_id
    ours = OrtCausalLM(result.path).generate(torch.tensor([prompt]), max_new_tokens=24, eos_token_id=eos)
    assert theirs == ours[0, len(prompt):].tolist()[: len(theirs)] and len(theirs) >= 1
    if theirs[-1] != eos:
        assert len(theirs) == 24
