"""Tokenizers: byte-level BPE trained on a corpus, a model directory's ``tokenizer.json``, or plain bytes."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

END_OF_TEXT = "<|endoftext|>"


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer of ``vocab_size`` ids (all 256 bytes, then merges), with ``<|endoftext|>``."""
    if vocab_size < 257:
        raise ValueError(
            f"a byte-level BPE vocabulary needs at least 257 ids (256 bytes + end of text), got {vocab_size}"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


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
