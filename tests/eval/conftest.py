"""Shared fixtures for the evaluation tests: one thread, a tiny random Llama."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from dsq.tools.testing import tiny_llama

VOCAB = 300


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> object:
    """Tiny models run fastest, and unaffected by a busy machine, on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    """A random 2-layer Llama with a 300-token vocabulary."""
    return tiny_llama(VOCAB)
