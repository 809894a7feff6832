"""The synthetic tasks a recall sweep trains on (``[task]`` of a grid file) and asks each trained model after.

Each task writes its training documents with its own word-level tokenizer (:mod:`hyla.data.synthetic`), and
evaluates a trained model through the serving engine (:mod:`hyla.eval.recall`):

- ``mqar``: MQAR documents of ``lengths`` x ``pairs``; evaluated over the same lengths x pairs, then probed
  (:mod:`hyla.experiments.probe`).
- ``passkey``: passkey documents of ``lengths`` tokens (the training length), the needle at a random depth;
  evaluated at ``scales`` x the longest training length and at each of ``depths`` (length extrapolation).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Tokenizer

from hyla import eval as evaluation
from hyla.data.synthetic import passkey_tokenizer, word_tokenizer, write_mqar, write_passkey
from hyla.errors import ConfigError
from hyla.eval.recall import Grid
from hyla.serve import LLM


@dataclass
class MQARTask:
    """``[task] name = "mqar"``."""

    vocab: int = 64  # ids per third: keys, values, filler
    lengths: list[int] = field(default_factory=lambda: [64, 128, 256])
    pairs: list[int] = field(default_factory=lambda: [4, 8, 16, 32])
    documents: int = 20_000
    contexts: int = 16  # evaluation: random contexts per (length, pairs) cell ...
    queries: int = 4  # ... and keys asked of each
    seed: int = 0
    name = "mqar"

    def check(self, where: str) -> None:
        if self.vocab < max(self.pairs):
            raise ConfigError(f"{where}: {max(self.pairs)} pairs need as many distinct keys; vocab is {self.vocab}")

    def tokenizer(self) -> Tokenizer:
        return word_tokenizer(3 * self.vocab)

    @property
    def longest_document(self) -> int:
        return max(self.lengths) + 1  # and the end of text

    @property
    def longest_prompt(self) -> int:
        return max(self.lengths) + 16

    def write(self, path: Path, tokenizer: Tokenizer) -> None:
        write_mqar(path, tokenizer, self.documents, self.lengths, self.pairs, self.seed)

    def evaluate(self, llm: LLM) -> Grid:
        return evaluation.mqar(llm, self.lengths, self.pairs, self.contexts, self.queries, self.seed + 1)

    def describe(self) -> str:
        return f"MQAR over lengths {self.lengths} x pairs {self.pairs}"


@dataclass
class PasskeyTask:
    """``[task] name = "passkey"``."""

    lengths: list[int] = field(default_factory=lambda: [128])  # training lengths (tokens)
    documents: int = 20_000
    scales: list[int] = field(default_factory=lambda: [1, 2, 4, 8])  # evaluation lengths: x the longest training one
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    trials: int = 8  # random keys per (length, depth) cell
    seed: int = 0
    name = "passkey"

    def check(self, where: str) -> None:
        if any(not 0 <= d <= 1 for d in self.depths) or any(s < 1 for s in self.scales):
            raise ConfigError(f"{where}: depths must be in [0, 1] and scales at least 1")

    def tokenizer(self) -> Tokenizer:
        return passkey_tokenizer()

    @property
    def eval_lengths(self) -> list[int]:
        return [scale * max(self.lengths) for scale in self.scales]

    @property
    def longest_document(self) -> int:
        return max(self.lengths) + 8  # the five digits, the end of text, and a line of slack

    @property
    def longest_prompt(self) -> int:
        return max(self.eval_lengths) + 16

    def write(self, path: Path, tokenizer: Tokenizer) -> None:
        write_passkey(path, tokenizer, self.documents, self.lengths, self.seed)

    def evaluate(self, llm: LLM) -> Grid:
        return evaluation.passkey(llm, self.eval_lengths, self.depths, self.trials, self.seed + 1)

    def describe(self) -> str:
        return f"the passkey at lengths {self.eval_lengths} x depths {self.depths}"


TASKS = {"mqar": MQARTask, "passkey": PasskeyTask}
Task = MQARTask | PasskeyTask


def read_task(fields: dict | None, where: str) -> Task | None:
    """The ``[task]`` table of a grid file, checked; None without one."""
    if fields is None:
        return None
    fields = dict(fields)
    name = fields.pop("name", None)
    if name not in TASKS:
        raise ConfigError(f"{where} [task] needs name = one of {sorted(TASKS)} (the synthetic tasks a sweep trains "
                          f"on), got {name!r}")  # fmt: skip
    try:
        task = TASKS[name](**fields)
    except TypeError as e:
        raise ConfigError(f"{where} [task]: {e}") from None
    task.check(f"{where} [task]")
    return task
