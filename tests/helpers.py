"""Helpers the tests share (no test imports another test module's helpers)."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers


def byte_tokenizer(num_ids: int = 256) -> Tokenizer:
    """Byte-level tokens without merges, the first ``num_ids`` of the 256 (ids in byte-level BPE's alphabet
    order): a tokenizer as small as a small test model's vocabulary. Text with other bytes cannot be encoded;
    tests of such models feed token ids."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())[:num_ids]
    tokenizer = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer
