"""The tokenizer against config.json's vocab_size: no token id without an embedding row."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dsq.core.config_checks import is_int, name_some
from dsq.core.errors import CheckpointError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def check_tokenizer(tokenizer: PreTrainedTokenizerBase, config: Mapping[str, Any], root: Path) -> str | None:
    """Check that every token id the tokenizer can emit has a row in the model's embedding.

    Added tokens count (special or not: text and chat templates can contain them). The unknown
    token is the exception: it is emitted only for text the vocabulary cannot encode (a byte-level
    BPE never does), so an unknown token beyond the vocabulary is a note, not an error.

    Args:
        tokenizer: The checkpoint's tokenizer.
        config: Its parsed config.json.
        root: The checkpoint directory (its tokenizer files are named in messages).

    Returns:
        None when the tokenizer fills the vocabulary exactly (or config.json sets no vocab_size);
        otherwise a note for the run's report: fewer tokens than ``vocab_size`` (a padded
        vocabulary, allowed) or an unknown token beyond it.

    Raises:
        CheckpointError: A token id reaches ``vocab_size`` (the tokenizer is larger than the
            vocabulary); the message names both sizes, a few such tokens and the files.
    """
    vocab_size = config.get("vocab_size")
    if not is_int(vocab_size):
        return None
    ids = {token: index for token, index in tokenizer.get_vocab().items() if token != tokenizer.unk_token}
    beyond = sorted((index, token) for token, index in ids.items() if index >= vocab_size)
    if beyond:
        files = ", ".join(_tokenizer_files(root)) or "its tokenizer files"
        tokens = name_some([f"{token!r} ({index})" for index, token in beyond], ordered=True)
        raise CheckpointError(
            f"the tokenizer of {root} ({files}) has {len(tokenizer)} tokens, added tokens included, but "
            f"{root / 'config.json'} vocab_size is {vocab_size}: {len(beyond)} token id(s) have no embedding row: {tokens}"
        )
    unk_id = tokenizer.unk_token_id if tokenizer.unk_token is not None else None
    if unk_id is not None and unk_id >= vocab_size:
        return (
            f"the tokenizer's unknown token {tokenizer.unk_token!r} (id {unk_id}) is beyond vocab_size {vocab_size} in "
            "config.json: text the tokenizer cannot encode would fail (a byte-level BPE encodes every text)"
        )
    size = 1 + max(ids.values(), default=-1)
    if size < vocab_size:
        return (
            f"the tokenizer has {size} tokens, fewer than vocab_size {vocab_size} in config.json: "
            f"embedding rows {size} to {vocab_size - 1} are never used (a padded vocabulary)"
        )
    return None


def _tokenizer_files(root: Path) -> list[str]:
    stems = ("tokenizer", "added_tokens", "special_tokens_map", "vocab.", "merges.", "tiktoken")
    try:
        return sorted(p.name for p in root.iterdir() if p.is_file() and p.name.startswith(stems))
    except OSError:
        return []
