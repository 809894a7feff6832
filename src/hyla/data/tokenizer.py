"""Tokenizers: byte-level BPE trained on a corpus, a model directory's ``tokenizer.json``, or plain bytes."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from hyla.errors import DataError

END_OF_TEXT = "<|endoftext|>"


def train_bpe(texts: Iterable[str], vocab_size: int, progress: bool = False) -> Tokenizer:
    """A byte-level BPE tokenizer of ``vocab_size`` ids (all 256 bytes, then merges), with ``<|endoftext|>``;
    ``progress`` shows the trainer's progress bars (on a terminal)."""
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
        show_progress=progress,
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


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A ``tokenizer.json`` file, or the one in model directory ``path``; :class:`~hyla.errors.DataError` naming
    the file when there is none or it cannot be read (no silent fallback: another tokenizer's ids would be
    garbage to the model)."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise DataError(
            f"{file} is missing: the model directory needs the tokenizer it was trained with "
            "(pass one with --tokenizer PATH/tokenizer.json)"
        )
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise DataError(f"cannot read the tokenizer {file}: {e}") from None


def load_chat_template(model_dir: str | Path) -> str | None:
    """The ``chat_template`` of model directory ``model_dir``'s ``tokenizer_config.json`` (as transformers keeps
    it), or None without one; :class:`~hyla.errors.DataError` naming the file when it cannot be read."""
    file = Path(model_dir) / "tokenizer_config.json"
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text()).get("chat_template")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise DataError(f"cannot read {file}: {e}") from None
