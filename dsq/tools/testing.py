"""Tiny, deterministic checkpoints for tests.

Each supported architecture has a tiny configuration (hidden size 128, two layers,
every linear layer at least 64 inputs wide). :func:`make_tiny_checkpoint` writes a
randomly initialised fp32 model of that configuration with safetensors weights and a
byte-level BPE tokenizer, exactly as a real Hugging Face checkpoint directory looks.
"""
from __future__ import annotations

import json
import math
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerFast

from dsq.core.checkpoint import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME
from dsq.core.layout import SUPPORTED_MODEL_TYPES

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
SPECIAL_TOKENS: tuple[str, ...] = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
"""Special tokens, with ids 0, 1 and 2 in this order."""

_COMMON: Mapping[str, Any] = {
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "intermediate_size": 256,
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": 2,
}

_MLA_MOE: Mapping[str, Any] = {
    "first_k_dense_replace": 1,
    "moe_intermediate_size": 64,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "kv_lora_rank": 64,
    "qk_rope_head_dim": 32,
    "qk_nope_head_dim": 32,
    "v_head_dim": 64,
}

TINY_CONFIGS: Mapping[str, Mapping[str, Any]] = {
    "deepseek_v3": {**_COMMON, **_MLA_MOE, "q_lora_rank": 64, "n_group": 1, "topk_group": 1},
    # V2-Lite style: queries are projected directly (no q LoRA), greedy top-k routing.
    "deepseek_v2": {**_COMMON, **_MLA_MOE, "q_lora_rank": None, "topk_method": "greedy"},
    # V3 plus the DSA lightning indexer in every layer.
    "deepseek_v32": {**_COMMON, **_MLA_MOE, "q_lora_rank": 64, "n_group": 1, "topk_group": 1, "index_n_heads": 2,
                     "index_head_dim": 32, "index_topk": 16},
    # Every V4 part: sliding, CSA (indexer) and HCA attention layers, hash-routed and top-k MoE layers,
    # two hyper-connection streams, grouped output projection.
    "deepseek_v4": {**_COMMON, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 32,
                    "q_lora_rank": 64, "qk_rope_head_dim": 8, "o_groups": 2, "o_lora_rank": 32,
                    "moe_intermediate_size": 64, "n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 1,
                    "layer_types": ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                                    "compressed_sparse_attention"],
                    "mlp_layer_types": ["hash_moe", "moe", "moe", "moe"], "sliding_window": 16,
                    "index_n_heads": 2, "index_head_dim": 16, "index_topk": 8, "hc_mult": 2, "max_position_embeddings": 4096},
    "llama": {**_COMMON, "num_attention_heads": 4, "num_key_value_heads": 2},
    "qwen2": {**_COMMON, "num_attention_heads": 4, "num_key_value_heads": 2},
}
"""Configuration fields of the tiny model of each supported model type."""

_TOKENIZER_TEXT: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
    "DeepSeek models use multi-head latent attention and a mixture of experts in every layer.",
    "Quantization maps floating point weights to a small set of integer levels with a scale.",
    "Post-training quantization needs calibration data; quantization-aware training does not.",
    "Low-rank adapters add a small trainable update to a frozen weight matrix.",
    "An evaluation gate compares the compressed model with the original on held-out tasks.",
    "Perplexity, accuracy and latency are measured before and after compression.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 16 32 64 128 256 512 1024 2048 4096 8192.",
    "Question: what is the capital of France? Answer: Paris is the capital of France.",
    "Question: how many legs does a spider have? Answer: a spider has eight legs.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "Symbols and punctuation: ( ) [ ] { } < > = + - * / % & | ^ ~ ! ? , . ; : ' \" # @ $",
    "She sells sea shells by the sea shore, and the shells she sells are surely sea shells.",
    "Every model is saved with its configuration, its tokenizer and its weights in one folder.",
    "Experts are routed per token; the router picks the top experts and mixes their outputs.",
    "Shared experts process every token, routed experts only the tokens assigned to them.",
)


def tiny_config(model_type: str, *, vocab_size: int = 512, **overrides: Any) -> PretrainedConfig:
    """Return the configuration of a tiny model of a supported type.

    Args:
        model_type: One of :data:`dsq.core.checkpoint.SUPPORTED_MODEL_TYPES`.
        vocab_size: Vocabulary size of the model.
        **overrides: Configuration fields that replace the tiny defaults.

    Returns:
        The transformers configuration.

    Raises:
        ValueError: ``model_type`` is not supported.
    """
    if model_type not in TINY_CONFIGS:
        raise ValueError(
            f"no tiny configuration for model_type {model_type!r}; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    fields = {**TINY_CONFIGS[model_type], "vocab_size": vocab_size, **overrides}
    return AutoConfig.for_model(model_type, **fields)


def byte_bpe_tokenizer(
    texts: Sequence[str], vocab_size: int, *, prepend_bos: bool = False
) -> PreTrainedTokenizerFast:
    """Train a deterministic byte-level BPE tokenizer on ``texts``.

    Ids 0, 1 and 2 are the bos, eos and pad tokens. Any text round-trips through encode
    and decode (with ``skip_special_tokens=True``).

    Args:
        texts: Training text.
        vocab_size: Largest vocabulary size (259 learns no merges: one token per byte).
        prepend_bos: Make encoding prepend bos.

    Returns:
        The tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size {vocab_size} is too small for a byte-level tokenizer")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(texts), trainer)
    if prepend_bos:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{BOS_TOKEN} $A",
            pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
            special_tokens=[(BOS_TOKEN, backend.token_to_id(BOS_TOKEN))],
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
    )


def make_tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """The tiny checkpoints' tokenizer: byte-level BPE on a fixed text, encoding prepends bos.

    Args:
        vocab_size: Largest vocabulary size; the fixed text may yield fewer tokens.

    Returns:
        The tokenizer.
    """
    return byte_bpe_tokenizer(_TOKENIZER_TEXT, vocab_size, prepend_bos=True)


def tiny_llama(vocab_size: int, *, seed: int = 0, max_position_embeddings: int = 512) -> torch.nn.Module:
    """A random 2-layer Llama (hidden 64) in eval mode, for tests that need any causal LM."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).eval()


def make_tiny_checkpoint(
    model_type: str,
    path: str | Path,
    *,
    seed: int = 0,
    shards: int = 1,
    vocab_size: int = 512,
    **config_overrides: Any,
) -> Path:
    """Write a tiny randomly initialised fp32 checkpoint with tokenizer.

    The same arguments always produce byte-identical files. The global torch random
    state is left untouched.

    Args:
        model_type: One of :data:`dsq.core.checkpoint.SUPPORTED_MODEL_TYPES`.
        path: Directory to write (created if needed).
        seed: Seed of the random initialisation.
        shards: Number of safetensors shards; above 1 an index file is written too.
        vocab_size: Vocabulary size of the model (and upper bound for the tokenizer).
        **config_overrides: Configuration fields that replace the tiny defaults.

    Returns:
        The checkpoint directory.

    Raises:
        ValueError: ``model_type`` is not supported or ``shards`` is not positive.
    """
    if shards < 1:
        raise ValueError(f"shards must be at least 1, got {shards}")
    root = Path(path)
    config = tiny_config(model_type, vocab_size=vocab_size, **config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(root)
    make_tiny_tokenizer(vocab_size).save_pretrained(root)
    if shards > 1:
        split_into_shards(root, shards)
    return root


def split_into_shards(root: Path, shards: int) -> None:
    """Rewrite ``model.safetensors`` in ``root`` as ``shards`` files plus an index.

    Tensors are assigned in name order to shards of roughly equal byte size.

    Args:
        root: Checkpoint directory holding a single ``model.safetensors``.
        shards: Number of shard files to write.

    Raises:
        ValueError: There are fewer tensors than shards.
    """
    single = root / SAFE_WEIGHTS_NAME
    with safe_open(str(single), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in sorted(handle.keys())}
    if len(tensors) < shards:
        raise ValueError(f"cannot split {len(tensors)} tensors into {shards} shards")
    groups = _balanced_groups(list(tensors), [_nbytes(tensor) for tensor in tensors.values()], shards)
    weight_map: dict[str, str] = {}
    for number, names in enumerate(groups, start=1):
        shard_name = f"model-{number:05d}-of-{shards:05d}.safetensors"
        save_file({name: tensors[name] for name in names}, str(root / shard_name), metadata=metadata)
        weight_map.update({name: shard_name for name in names})
    index = {
        "metadata": {
            "total_size": sum(_nbytes(tensor) for tensor in tensors.values()),
            "total_parameters": sum(tensor.numel() for tensor in tensors.values()),
        },
        "weight_map": dict(sorted(weight_map.items())),
    }
    (root / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    single.unlink()


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _balanced_groups(names: Sequence[str], sizes: Sequence[int], groups: int) -> list[list[str]]:
    """Cut ``names`` into ``groups`` non-empty consecutive runs of similar total size."""
    target = math.ceil(sum(sizes) / groups)
    result: list[list[str]] = [[]]
    filled = 0
    for position, (name, size) in enumerate(zip(names, sizes, strict=True)):
        remaining_names = len(names) - position
        remaining_groups = groups - len(result)
        must_cut = remaining_names == remaining_groups
        may_cut = remaining_groups > 0 and filled + size > target
        if result[-1] and (must_cut or may_cut):
            result.append([])
            filled = 0
        result[-1].append(name)
        filled += size
    return result


def fast_export_config():
    """An export whose validation uses few, short shapes (tests of the tiny models)."""
    from dsq.export import ExportConfig, ValidationConfig

    return ExportConfig(validation=ValidationConfig(batch_sizes=(1, 2), seq_lens=(1, 9), decode_steps=4, greedy_tokens=16))


def randomize_lora(peft_model: torch.nn.Module, std: float = 0.05, seed: int = 3) -> None:
    """Give every LoRA matrix random values (peft initialises B to zero), so the adapter acts."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def make_rtn_artifact(checkpoint: Path, directory: Path, scheme=None) -> Path:
    """A dsq artifact of ``checkpoint`` as ``dsq run`` writes its core (RTN weights, config, tokenizer, manifest).

    Args:
        checkpoint: an fp checkpoint directory (e.g. from :func:`make_tiny_checkpoint`).
        directory: the artifact directory to create (must not exist).
        scheme: a :class:`dsq.quantize.WeightScheme` (default INT8, groups of 32, symmetric).

    Returns:
        ``directory``.
    """
    from dsq.quantize.artifact_save import save_quantized_model
    from dsq.core.manifest import write_manifest
    from dsq.core.loading import load_checkpoint
    from dsq.quantize import PerGroup, RTNConfig, TargetSpec, WeightScheme, quantize_

    loaded = load_checkpoint(checkpoint)
    scheme = scheme if scheme is not None else WeightScheme(8, PerGroup(32), True)
    quantize_(loaded.model, RTNConfig(scheme, TargetSpec()), progress=False)
    directory.mkdir(parents=True)
    save_quantized_model(loaded.model, loaded.tokenizer, directory)
    write_manifest(directory, source=loaded.source.to_dict())
    return directory


def write_sentencepiece_tokenizer(
    path: str | Path, *, add_bos: bool = True, add_eos: bool = False, vocab_size: int = 400
) -> Path:
    """Write a sentencepiece tokenizer as Llama checkpoints ship it: ``tokenizer.model`` only.

    A BPE sentencepiece model with byte fallback is trained in-process on a fixed text (ids 0,
    1 and 2 are ``<unk>``, ``<s>`` and ``</s>``) and saved with a ``LlamaTokenizer`` config;
    any ``tokenizer.json`` in ``path`` is removed, so transformers converts ``tokenizer.model``
    when it loads the directory. Needs the ``sentencepiece`` package.

    Args:
        path: Directory to write into (created if needed).
        add_bos: Encoding prepends ``<s>``.
        add_eos: Encoding appends ``</s>``.
        vocab_size: Vocabulary size of the model.

    Returns:
        ``path``.
    """
    import io

    import sentencepiece

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_TOKENIZER_TEXT), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, character_coverage=1.0,
        num_threads=1, minloglevel=2,
    )
    (path / "tokenizer.model").write_bytes(model.getvalue())
    (path / "tokenizer.json").unlink(missing_ok=True)
    config = {
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": add_bos, "add_eos_token": add_eos, "legacy": False, "model_max_length": 4096,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (path / "special_tokens_map.json").unlink(missing_ok=True)
    return path


def tensor_data_bytes(files) -> int:
    """Bytes of tensor data in safetensors files, from their headers (file size minus header)."""
    from dsq.core.checkpoint import read_safetensors_header

    total = 0
    for path in files:
        _, header_len = read_safetensors_header(path)
        total += path.stat().st_size - 8 - header_len
    return total


def fold_every_mapping(model: torch.nn.Module, generator: torch.Generator) -> list:
    """Fold a random scale in ``[0.3, 3.3)`` through every balance mapping that resolves in each decoder layer.

    The full-precision function must not change (:mod:`dsq.quantize.mappings`); returns the mappings
    folded (:class:`~dsq.quantize.mappings.Balance`), in layer order.
    """
    from dsq.core.layout import decoder_layers
    from dsq.quantize.mappings import fold, resolve

    applied = []
    for layer in decoder_layers(model)[1]:
        for m in resolve(layer):
            first = layer.get_submodule(m.balance[0])
            if m.per_expert:  # one scale per expert over its intermediate channels
                experts, _, inter = first.down_proj.shape
                shape = (experts, inter)
            else:
                shape = (first.gate_up_proj.shape[-1] if hasattr(first, "gate_up_proj") else first.in_features,)
            fold(layer, m, torch.rand(shape, generator=generator) * 3 + 0.3)
            applied.append(m)
    return applied


def free_port() -> int:
    """A TCP port free on this host now (for ``torchrun --master_port``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hessian_of(x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """GPTQ's ``2/n X^T W X`` of rows ``x`` ``[..., in]`` as calibration collects it (:class:`dsq.quantize.stats.InputStats`)."""
    from dsq.quantize.stats import InputStats

    stats = InputStats()
    stats.add(x, hessian=True, sample_rows=0, weights=weights, channels=False)
    return stats.hessian


def onnx_logits_gap(a: Path, b: Path, vocab: int = 500, seed: int = 4) -> float:
    """Largest ``|logit_a - logit_b|`` of two ONNX exports (``OrtCausalLM``) on one seeded ``[2, 9]`` batch."""
    from dsq.export import OrtCausalLM

    ids = torch.randint(3, vocab, (2, 9), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    logits = [OrtCausalLM(path)(input_ids=ids, attention_mask=mask).logits for path in (a, b)]
    return float((logits[0] - logits[1]).abs().max())
