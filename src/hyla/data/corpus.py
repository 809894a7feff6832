"""Corpora: where documents come from.

The embedded default is the Python standard library of the running interpreter (every ``*.py`` under its
stdlib directory: tens of MB of real text on every machine, no download). A user corpus is a text file, a
directory (every file under it, or those matching a glob), a ``.jsonl`` file with a ``text`` field per line,
or a ``.parquet`` file with a ``text`` column (needs pyarrow).

A ``.jsonl`` line may instead train on part of its text only: ``{"prompt": ..., "completion": ...}`` (loss on the
completion) or ``{"segments": [{"text": ..., "train": false}, ...]}`` (loss on the segments with ``train`` true,
the default). The document is the segments' texts in order; the others are context the model reads but is not
trained to predict (prompt-completion fine-tuning; the answers of a synthetic task).
"""

from __future__ import annotations

import json
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from hyla.errors import DataError


@dataclass(frozen=True)
class Source:
    """One file of a corpus and how to read documents from it."""

    path: Path
    kind: str  # "text" (the file is one document), "jsonl" or "parquet" (one document per row)


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def discover(spec: str | Path | None, pattern: str = "**/*") -> list[Source]:
    """The files of a corpus, in a stable order. ``None`` means the standard library's ``*.py`` files."""
    if spec is None:
        root = stdlib_dir()
        files = [p for p in root.glob("**/*.py") if "site-packages" not in p.parts and p.is_file()]
        return [Source(p, "text") for p in sorted(files)]
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.glob(pattern) if p.is_file() and not p.name.startswith("."))
        if not files:
            raise DataError(f"no files matching {pattern!r} under {path}")
        return [_source(p) for p in files]
    if path.is_file():
        return [_source(path)]
    raise DataError(f"corpus {str(path)!r} does not exist")


def _source(path: Path) -> Source:
    suffix = path.suffix.lower()
    return Source(path, "jsonl" if suffix == ".jsonl" else "parquet" if suffix == ".parquet" else "text")


# A document as segments: (text, trained) in order; a plain document is one trained segment.
Segments = list[tuple[str, bool]]


def documents(source: Source) -> Iterator[str]:
    """The non-empty documents of one file (segmented ones joined). Undecodable text files are skipped (a corpus
    directory may hold binaries); a malformed ``.jsonl`` line or a missing ``text`` field is an error naming the
    line."""
    for parts in segments(source):
        yield "".join(text for text, _ in parts)


def segments(source: Source) -> Iterator[Segments]:
    """The non-empty documents of one file as :data:`Segments` (see the module docstring)."""
    if source.kind == "text":
        try:
            text = source.path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            return
        if text.strip():
            yield [(text, True)]
    elif source.kind == "jsonl":
        with source.path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    parts = _json_segments(json.loads(line))
                except (json.JSONDecodeError, KeyError, TypeError, AttributeError, DataError) as e:
                    raise DataError(
                        f"{source.path}:{number}: expected a JSON object with a 'text' field, 'prompt' and "
                        f"'completion', or 'segments' of {{'text', 'train'}} ({type(e).__name__}: {e})"
                    ) from None
                if any(text.strip() for text, _ in parts):
                    yield parts
    else:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"reading {source.path} needs pyarrow: pip install pyarrow") from None
        table = pq.read_table(source.path)
        if "text" not in table.column_names:
            raise DataError(f"{source.path} has no 'text' column (columns: {table.column_names})")
        yield from ([(t, True)] for t in table.column("text").to_pylist() if isinstance(t, str) and t.strip())


def _json_segments(row: dict) -> Segments:
    if "segments" in row:
        parts = [(part["text"], bool(part.get("train", True))) for part in row["segments"]]
    elif "prompt" in row:
        parts = [(row["prompt"], False), (row["completion"], True)]
    else:
        parts = [(row["text"], True)]
    if not all(isinstance(text, str) for text, _ in parts):
        raise DataError("every text must be a string")
    return parts
