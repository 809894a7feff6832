"""Token shards: a corpus tokenized once into memory-mapped token files with document offsets, cached.

The cache key hashes the tokenizer and every source file's path, size and modification time, so a changed
corpus or tokenizer is tokenized again and an unchanged one is not. Each document ends with the end-of-text
token. A deterministic held-out split sends a document to evaluation by a hash of its source and index.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from hyla.atomic import atomic_directory
from hyla.data.corpus import Source, documents
from hyla.data.tokenizer import END_OF_TEXT
from hyla.errors import DataError

SPLITS = ("train", "eval")


@dataclass
class TokenShard:
    """One split: ``tokens`` ``[N]`` (uint16 or uint32, memory-mapped) and ``offsets`` ``[docs + 1]``."""

    tokens: np.ndarray
    offsets: np.ndarray

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
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    directory = Path(cache_dir) / cache_key(sources, tokenizer, eval_fraction)
    if not (directory / "meta.json").is_file():
        _tokenize(sources, tokenizer, directory, eval_fraction, progress)
    meta = json.loads((directory / "meta.json").read_text())
    return {
        split: TokenShard(
            np.memmap(directory / f"{split}.tokens", dtype=meta["dtype"], mode="r", shape=(meta[split]["tokens"],))
            if meta[split]["tokens"]
            else np.zeros(0, dtype=meta["dtype"]),
            np.load(directory / f"{split}.offsets.npy"),
        )
        for split in SPLITS
    }


def _tokenize(sources: list[Source], tokenizer: Tokenizer, directory: Path, eval_fraction: float, progress: bool):
    eot = tokenizer.token_to_id(END_OF_TEXT)
    if eot is None:
        raise DataError(f"the tokenizer has no {END_OF_TEXT} token")
    dtype = np.uint16 if tokenizer.get_vocab_size() <= 2**16 else np.uint32
    parts: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
    for source in tqdm(sources, desc="tokenizing", unit="file", disable=not progress):
        texts = list(documents(source))
        # encode_batch runs in parallel over the documents of a file (Rust threads).
        for index, encoding in enumerate(tokenizer.encode_batch(texts)):
            ids = np.asarray([*encoding.ids, eot], dtype=dtype)
            parts["eval" if is_eval(source, index, eval_fraction) else "train"].append(ids)
    if not parts["train"]:
        raise DataError("the corpus holds no documents with text")
    with atomic_directory(directory) as tmp:
        meta: dict = {"dtype": np.dtype(dtype).name, "vocab_size": tokenizer.get_vocab_size()}
        for split, docs in parts.items():
            lengths = np.asarray([len(d) for d in docs], dtype=np.int64)
            np.save(tmp / f"{split}.offsets.npy", np.concatenate(([0], np.cumsum(lengths))))
            (np.concatenate(docs) if docs else np.zeros(0, dtype)).tofile(tmp / f"{split}.tokens")
            meta[split] = {"documents": len(docs), "tokens": int(lengths.sum())}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def unigram_entropy(shard: TokenShard, vocab_size: int) -> float:
    """Entropy (nats per token) of the shard's token frequencies: the loss of a model that ignores context."""
    counts = np.bincount(np.asarray(shard.tokens), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
