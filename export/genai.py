"""``genai_config.json``: the description onnxruntime-genai reads to run an exported decoder.

The names follow :mod:`dsq.export.decoder` (``past_key_values.%d.key`` -> ``present.%d.key``). The
model ``type`` is the transformers architecture family genai knows (``llama``, ``qwen2``).
Checked with onnxruntime-genai 0.18.0 (``benchmarks/genai_check.py``): fp32 and int4
(``MatMulNBits``) Llama exports run in genai with greedy tokens identical to
:class:`dsq.export.runtime.OrtCausalLM`. genai rejects ``null`` token ids (``Expected a number but
saw a null``), so unknown ones are left out, and it stops at every id of a list ``eos_token_id``,
so the list is kept whole. ``past_present_share_buffer`` stays false: the graph concatenates the
cache, it does not write into a max-length buffer.

DeepSeek MLA graphs are described too, but genai does not run them: 0.18.0 has no
``deepseek_v2``/``deepseek_v3`` type (``Unsupported model_type in config.json: deepseek_v3``), and
its KV buffers have one ``head_size`` for both slots, while the MLA cache holds the latent (key
slot ``kv_lora_rank``, value slot ``qk_rope_head_dim``); described as ``llama`` the first step fails
with ``Got invalid dimensions for input: past_key_values.0.value``. Run those with
:class:`dsq.export.runtime.OrtCausalLM`.
"""
from __future__ import annotations

import json
from pathlib import Path

from .decoder import CacheLayout

GENAI_CONFIG = "genai_config.json"
GENAI_TYPES = {"llama": "llama", "qwen2": "qwen2", "deepseek_v3": "deepseek_v3", "deepseek_v2": "deepseek_v2"}


def _first(value):
    return value[0] if isinstance(value, (list, tuple)) else value


def _token_ids(config, tokenizer) -> dict:
    """bos/eos/pad ids, the config's first, else the tokenizer's; unknown ones are left out."""
    def pick(name):
        value = getattr(config, name, None)
        if value is None or value == []:
            value = getattr(tokenizer, name, None)
        return list(value) if isinstance(value, (list, tuple)) else value

    bos, eos, pad = pick("bos_token_id"), pick("eos_token_id"), pick("pad_token_id")
    if pad is None:
        pad = _first(eos)
    ids = {"bos_token_id": _first(bos), "eos_token_id": eos, "pad_token_id": _first(pad)}
    return {key: value for key, value in ids.items() if value is not None}


def genai_config(config, tokenizer, layout: CacheLayout, onnx_file: str = "model.onnx") -> dict:
    """The genai_config.json contents for one exported decoder."""
    ids = _token_ids(config, tokenizer)
    context = getattr(config, "max_position_embeddings", 2048)
    return {
        "model": {
            **ids,
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": onnx_file,
                "head_size": layout.key_dim,
                "hidden_size": config.hidden_size,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": config.num_attention_heads,
                "num_hidden_layers": layout.num_layers,
                "num_key_value_heads": layout.kv_heads,
            },
            "type": GENAI_TYPES.get(config.model_type, config.model_type),
            "vocab_size": config.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": context, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
            "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }


def write_genai_config(root: Path, config, tokenizer, layout: CacheLayout) -> Path:
    path = root / GENAI_CONFIG
    path.write_text(json.dumps(genai_config(config, tokenizer, layout), indent=2) + "\n")
    return path


def genai_greedy(directory: Path, prompt: list[int], new_tokens: int, *, threads: int | None = None) -> list[int]:
    """Greedy tokens from onnxruntime-genai for an export directory (stops at its eos ids).

    Raises:
        ImportError: onnxruntime-genai is not installed (``pip install dsq[genai]``).
    """
    import onnxruntime_genai as og

    config = og.Config(str(directory))
    if threads:
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(config)
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + new_tokens)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    out = []
    while not generator.is_done():
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return out
