"""Token shards: a corpus tokenized once into memory-mapped token files with document offsets, cached.

The cache key hashes the tokenizer and every source file's path, size and modification time, so a changed
corpus or tokenizer is tokenized again and an unchanged one is not. Each document ends with the end-of-text
token. A deterministic held-out split sends a document to evaluation by a hash of its source and index. A corpus
with segments not to train on (:mod:`hyla.data.corpus`) also gets a mask: 1 where a token is a training target (its
segment's ``train``; the end of text takes the last segment's).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from hyla.atomic import atomic_directory
from hyla.data.corpus import Source, documents, segments
from hyla.data.tokenizer import END_OF_TEXT
from hyla.errors import ConfigError, DataError

SPLITS = ("train", "eval")


@dataclass
class TokenShard:
    """One split: ``tokens`` ``[N]`` (uint16 or uint32, memory-mapped) and ``offsets`` ``[docs + 1]``; for a corpus
    with segments not to train on, ``mask`` ``[N]`` (uint8: 1 where a token is a training target)."""

    tokens: np.ndarray
    offsets: np.ndarray
    mask: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def document(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]


def cache_key(sources: list[Source], tokenizer: Tokenizer, eval_fraction: float) -> str:
    digest = hashlib.sha256(tokenizer.to_str().encode())
    digest.update(repr(eval_fraction).encode())
    for source in sources:
        stat = source.path.stat()
        digest.update(f"{source.path.resolve()}|{source.kind}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def is_eval(source: Source, index: int, fraction: float) -> bool:
    """Deterministic held-out membership of the ``index``-th document of ``source``."""
    digest = hashlib.sha1(f"{source.path.name}|{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") < fraction * 2**32


def train_documents(sources: list[Source], fraction: float) -> Iterator[str]:
    """The texts of the training split only (what the tokenizer may learn from: the held-out split stays unseen)."""
    for source in sources:
        for index, text in enumerate(documents(source)):
            if not is_eval(source, index, fraction):
                yield text


def build_shards(
    sources: list[Source],
    tokenizer: Tokenizer,
    cache_dir: str | Path,
    eval_fraction: float = 0.01,
    progress: bool = True,
) -> dict[str, TokenShard]:
    """Tokenize ``sources`` into ``cache_dir/<key>/`` (once) and map the ``train`` and ``eval`` shards."""
    if not 0 <= eval_fraction < 1:
        raise ConfigError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    directory = Path(cache_dir) / cache_key(sources, tokenizer, eval_fraction)
    if not (directory / "meta.json").is_file():
        _tokenize(sources, tokenizer, directory, eval_fraction, progress)
    meta = json.loads((directory / "meta.json").read_text())

    def array(split: str, suffix: str, dtype: str) -> np.ndarray:
        count = meta[split]["tokens"]
        return np.memmap(directory / f"{split}.{suffix}", dtype=dtype, mode="r", shape=(count,)) if count else (
            np.zeros(0, dtype=dtype))  # fmt: skip

    return {
        split: TokenShard(
            array(split, "tokens", meta["dtype"]),
            np.load(directory / f"{split}.offsets.npy"),
            array(split, "mask", "uint8") if meta.get("masked") else None,
        )
        for split in SPLITS
    }


def _tokenize(sources: list[Source], tokenizer: Tokenizer, directory: Path, eval_fraction: float, progress: bool):
    eot = tokenizer.token_to_id(END_OF_TEXT)
    if eot is None:
        raise DataError(f"the tokenizer has no {END_OF_TEXT} token")
    dtype = np.uint16 if tokenizer.get_vocab_size() <= 2**16 else np.uint32
    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {split: [] for split in SPLITS}
    for source in tqdm(sources, desc="tokenizing", unit="file", disable=not progress):
        docs = list(segments(source))
        # encode_batch runs in parallel over the segments of a file (Rust threads).
        encodings = iter(tokenizer.encode_batch([text for doc in docs for text, _ in doc]))
        for index, doc in enumerate(docs):
            pieces = [next(encodings).ids for _ in doc]
            ids = np.asarray(list(itertools.chain(*pieces, [eot])), dtype=dtype)
            trained = [t for _, t in doc] + [doc[-1][1]]  # the end of text: as the last segment
            mask = np.repeat(np.asarray(trained, dtype=np.uint8), [len(p) for p in pieces] + [1])
            parts["eval" if is_eval(source, index, eval_fraction) else "train"].append((ids, mask))
    if not parts["train"]:
        raise DataError("the corpus holds no documents with text")
    masked = any(not mask.all() for docs in parts.values() for _, mask in docs)
    with atomic_directory(directory) as tmp:
        meta: dict = {"dtype": np.dtype(dtype).name, "vocab_size": tokenizer.get_vocab_size(), "masked": masked}
        for split, docs in parts.items():
            lengths = np.asarray([len(ids) for ids, _ in docs], dtype=np.int64)
            np.save(tmp / f"{split}.offsets.npy", np.concatenate(([0], np.cumsum(lengths))))
            (np.concatenate([ids for ids, _ in docs]) if docs else np.zeros(0, dtype)).tofile(tmp / f"{split}.tokens")
            if masked:
                (np.concatenate([m for _, m in docs]) if docs else np.zeros(0, np.uint8)).tofile(tmp / f"{split}.mask")
            meta[split] = {"documents": len(docs), "tokens": int(lengths.sum())}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def unigram_entropy(shard: TokenShard, vocab_size: int) -> float:
    """Entropy (nats per token) of the shard's token frequencies: the loss of a model that ignores context."""
    counts = np.bincount(np.asarray(shard.tokens), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
