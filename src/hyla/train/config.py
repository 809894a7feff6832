"""A training run's settings: :class:`TrainConfig` (``hyla train``'s flags, from each field's help) and its TOML
file form (``--config run.toml``, and a sweep's grid files)."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from hyla.errors import ConfigError, check_fields


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class TrainConfig:
    """A training run. The defaults are the main job: `hyla train` with no flags."""

    run_dir: str = field(default="runs/default", metadata=_help("where the run's files go"))
    preset: str = field(default="demo", metadata=_help("model preset: tiny, demo (2.3M) or small (68.7M)"))
    model: dict = field(default_factory=dict)  # overrides of the preset's fields (--set FIELD=VALUE)
    data: str | None = field(default=None, metadata=_help(
        "a text file, a directory, .jsonl or .parquet (default: this Python's standard library)"))  # fmt: skip
    tokenizer: str | None = field(default=None, metadata=_help(
        "a tokenizer.json to use (default: train a byte-level BPE on the data)"))  # fmt: skip
    vocab_size: int = field(default=384, metadata=_help("ids of the BPE tokenizer trained on the data"))
    steps: int = field(default=440, metadata=_help("optimizer steps"))
    tokens_per_batch: int = field(default=8192, metadata=_help("tokens in one micro-batch"))
    max_seq_len: int = field(default=512, metadata=_help("longest piece of a document in a batch"))
    grad_accum: int = field(default=1, metadata=_help("micro-batches per optimizer step"))
    lr: float = field(default=5e-3, metadata=_help("peak learning rate"))
    warmup: int = field(default=20, metadata=_help("steps of linear warmup, before the cosine decay"))
    weight_decay: float = field(default=0.1, metadata=_help("AdamW weight decay (not on norms)"))
    betas: tuple[float, float] = (0.9, 0.95)
    clip: float = field(default=1.0, metadata=_help("gradient-norm clipping"))
    eval_every: int = field(default=70, metadata=_help("steps between held-out evaluations"))
    eval_batches: int = field(default=4, metadata=_help("batches in each periodic evaluation"))
    checkpoint_every: int = field(default=100, metadata=_help("steps between checkpoints"))
    eval_fraction: float = field(default=0.01, metadata=_help("share of documents held out"))
    seed: int = field(default=0, metadata=_help("seed of the weights, batches and samples"))
    device: str = field(default="auto", metadata=_help("auto (a GPU if there is one), cpu or cuda"))
    dtype: str = field(default="auto", metadata=_help(
        "auto (bfloat16 autocast on a GPU, float32 on a CPU), float32 or bfloat16"))  # fmt: skip
    cache_dir: str = field(default=str(Path.home() / ".cache" / "hyla"), metadata=_help(
        "where tokenized corpora are cached"))  # fmt: skip

    def __post_init__(self) -> None:
        check_fields(self, [
            ("steps", self.steps >= 1, "must be >= 1"),
            ("max_seq_len", self.max_seq_len >= 2, "must be >= 2 (a token and its successor)"),
            ("tokens_per_batch", self.tokens_per_batch >= self.max_seq_len,
             f"must be >= max_seq_len ({self.max_seq_len})"),
            ("grad_accum", self.grad_accum >= 1, "must be >= 1"),
            ("lr", self.lr > 0, "must be > 0"),
            ("warmup", self.warmup >= 0, "must be >= 0"),
            ("clip", self.clip > 0, "must be > 0"),
            ("eval_every", self.eval_every >= 1, "must be >= 1"),
            ("eval_batches", self.eval_batches >= 1, "must be >= 1"),
            ("checkpoint_every", self.checkpoint_every >= 1, "must be >= 1"),
            ("eval_fraction", 0 <= self.eval_fraction < 1, "must be in [0, 1)"),
            ("device", self.device in ("auto", "cpu", "cuda"), "must be auto, cpu or cuda"),
            ("dtype", self.dtype in ("auto", "float32", "bfloat16"), "must be auto, float32 or bfloat16"),
            ("vocab_size", self.tokenizer is not None or self.vocab_size >= 257,
             "must be >= 257 (256 bytes + end of text)"),
        ])  # fmt: skip

    def to_json(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


def read_toml(path: str | Path, what: str) -> dict:
    """A TOML file's tables; :class:`ConfigError` saying which ``what`` (``"config file"``, ...) is missing or
    malformed."""
    try:
        return tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{what} {str(path)!r} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{what} {str(path)!r} is not valid TOML: {e}") from None


def train_fields(fields: dict, source: str) -> dict:
    """``fields`` checked by name against :class:`TrainConfig` (``source`` names them in the error), with TOML's
    arrays made the tuples the config holds."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown fields {unknown}; known: {sorted(known)}")
    return {**fields, "betas": tuple(fields["betas"])} if "betas" in fields else dict(fields)


def load_train_toml(path: str | Path) -> dict:
    """The fields of a :class:`TrainConfig` from a TOML file (``[model]``: preset overrides), checked by name."""
    return train_fields(read_toml(path, "config file"), f"config file {str(path)!r}")
