"""Long-context recall, measured through the serving engine: multi-query associative recall and the passkey.

MQAR (Zoology, Arora et al. 2023; :mod:`hyla.data.synthetic`): ``num_pairs`` distinct keys, each followed by its
value, then filler tokens up to ``length``, then one key asked again; the model is right when its greedy next token
is that key's value. Keys, values and filler come from three disjoint thirds of the vocabulary, drawn from a seed.
The queries of one context are separate requests that share the context, so the engine's prefix cache computes
the context once. It is a probe of in-context recall: a model never trained on the task scores near chance
(``1 / values``); ``hyla sweep``'s recall study trains models on it.

Passkey (Mohtashami & Jaggi 2023): a five-digit number hidden at a given depth of repetitive filler text, then
"What is the pass key? The pass key is" (:mod:`hyla.data.synthetic`); right when the greedy continuation starts
with the number.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from hyla.data.synthetic import (
    PASSKEY_FILLER,
    PASSKEY_INTRO,
    PASSKEY_KEYS,
    PASSKEY_NEEDLE,
    PASSKEY_QUESTION,
    mqar_document,
    passkey_layout,
)
from hyla.errors import ConfigError
from hyla.serve import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)


@dataclass
class Grid:
    """Accuracy over a grid: ``rows`` x ``columns`` cells, each ``correct / trials``."""

    task: str
    row_name: str
    column_name: str
    rows: list[float]
    columns: list[float]
    correct: list[list[int]] = field(default_factory=list)  # [len(rows)][len(columns)]
    trials: list[list[int]] = field(default_factory=list)
    chance: float = 0.0

    def accuracy(self, i: int, j: int) -> float:
        return self.correct[i][j] / self.trials[i][j] if self.trials[i][j] else float("nan")

    def table(self) -> str:
        """A markdown table: one row per ``rows`` value, one column per ``columns`` value."""
        head = f"| {self.row_name} \\ {self.column_name} | " + " | ".join(f"{c:g}" for c in self.columns) + " |"
        lines = [head, "|" + "---|" * (len(self.columns) + 1)]
        for i, r in enumerate(self.rows):
            cells = " | ".join(
                f"{self.accuracy(i, j):.2f}" if self.trials[i][j] else "-" for j in range(len(self.columns))
            )
            lines.append(f"| {r:g} | {cells} |")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "task": self.task, self.row_name: self.rows, self.column_name: self.columns, "chance": self.chance,
            "accuracy": [[self.accuracy(i, j) for j in range(len(self.columns))] for i in range(len(self.rows))],
            "correct": self.correct, "trials": self.trials,
        }  # fmt: skip


def _vocabulary(llm: LLM) -> list[int]:
    """The ids a task may use: the tokenizer's, without special tokens (end of text, ...)."""
    engine = llm.engine
    special = {i for i, token in engine.tokenizer.get_added_tokens_decoder().items() if token.special}
    return [i for i in range(engine.vocab_size) if i not in special]


def _check_length(llm: LLM, longest: int, task: str) -> None:
    limit = llm.engine.config.max_model_len
    if longest > limit:
        raise ConfigError(f"{task}: a {longest}-token prompt and its answer do not fit the context of {limit} tokens; "
                          "give shorter lengths (hyla eval --lengths)")  # fmt: skip


def mqar(llm: LLM, lengths: list[int], pairs: list[int], contexts: int = 8, queries: int = 4, seed: int = 0) -> Grid:
    """Accuracy by ``lengths`` (tokens including the query) x ``pairs``; ``contexts`` random contexts per cell,
    ``queries`` keys asked of each (without repeats, at most ``num_pairs``). A cell whose pairs do not fit its
    length is left empty (no trials: accuracy NaN, shown as ``-``)."""
    _check_length(llm, max(lengths) + 1, "mqar")
    if all(2 * p >= n for n in lengths for p in pairs):
        raise ConfigError(f"mqar: no length in {lengths} holds any of the pairs {pairs} and a query")
    ids = _vocabulary(llm)
    rng = random.Random(seed)
    grid = Grid("mqar", "length", "pairs", [float(n) for n in lengths], [float(p) for p in pairs])
    grid.chance = 1 / (len(ids) // 3)
    for length in lengths:
        prompts, answers = [], []
        for num_pairs in pairs:
            if 2 * num_pairs >= length:  # the pairs leave no room: the cell stays empty
                continue
            for _ in range(contexts):
                context, kv = mqar_document(rng, ids, num_pairs, length - 1, queries=0)
                for key in rng.sample(sorted(kv), min(queries, num_pairs)):
                    prompts.append([*context, key])
                    answers.append((num_pairs, kv[key]))
        outputs = llm.generate(prompts, GREEDY)
        correct = dict.fromkeys(pairs, 0)
        trials = dict.fromkeys(pairs, 0)
        for (num_pairs, value), (out,) in zip(answers, outputs, strict=True):
            trials[num_pairs] += 1
            correct[num_pairs] += out.token_ids[:1] == [value]
        grid.correct.append([correct[p] for p in pairs])
        grid.trials.append([trials[p] for p in pairs])
    return grid


def passkey_prompt(llm: LLM, key: int, length: int, depth: float) -> list[int]:
    """About ``length`` tokens: the intro, filler with the needle after ``depth`` (0..1) of it, the question."""
    encode = llm.engine.inputs.encode
    before, after = passkey_layout(encode, length, depth)
    filler = encode(PASSKEY_FILLER)
    return (encode(PASSKEY_INTRO) + filler * before + encode(PASSKEY_NEEDLE.format(key=key)) + filler * after
            + encode(PASSKEY_QUESTION))  # fmt: skip


def passkey(llm: LLM, lengths: list[int], depths: list[float], trials: int = 4, seed: int = 0) -> Grid:
    """Accuracy by context ``lengths`` (tokens) x needle ``depths`` (0: at the start, 1: just before the
    question), ``trials`` random keys per cell."""
    if any(not 0 <= d <= 1 for d in depths):
        raise ConfigError(f"passkey: depths must be in [0, 1], got {depths}")
    _check_length(llm, max(lengths) + 8, "passkey")
    rng = random.Random(seed)
    grid = Grid("passkey", "length", "depth", [float(n) for n in lengths], list(depths), chance=1e-5)
    params = SamplingParams(max_tokens=8, temperature=0.0)
    for length in lengths:
        keys = [[rng.randrange(*PASSKEY_KEYS) for _ in range(trials)] for _ in depths]
        prompts = [passkey_prompt(llm, key, length, d) for d, row in zip(depths, keys, strict=True) for key in row]
        outputs = iter(llm.generate(prompts, params))
        grid.correct.append([sum(_answers(next(outputs)[0].text, key) for key in row) for row in keys])
        grid.trials.append([trials] * len(depths))
    return grid


def _answers(text: str, key: int) -> bool:
    """Whether ``text`` starts with the digits of ``key``, spaces aside (a word-level tokenizer decodes digits
    with spaces between them)."""
    return "".join(text.split()).startswith(str(key))
