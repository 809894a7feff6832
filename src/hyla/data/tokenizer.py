"""Tokenizers: a model directory's ``tokenizer.json``, or a plain byte-level one (256 ids, no merges)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers


def byte_level_tokenizer() -> Tokenizer:
    """Every byte is one token (ids 0..255): needs no training and can encode any text."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def load_tokenizer(model_dir: str | Path | None) -> Tokenizer:
    """``model_dir/tokenizer.json`` if there is one, else :func:`byte_level_tokenizer`."""
    if model_dir is not None and (Path(model_dir) / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    return byte_level_tokenizer()
