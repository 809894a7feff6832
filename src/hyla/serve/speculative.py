"""Speculative decoding's drafts: prompt lookup (n-gram matching against a request's own context).

Code and agent transcripts copy from their context: when the last ``n`` tokens of a sequence occurred earlier in
its prompt or outputs, the tokens that followed them then are a likely continuation now. :class:`NgramProposer`
proposes them (no second model): the most recent earlier occurrence of the longest suffix of ``max_ngram`` down
to ``min_ngram`` tokens. The engine verifies the drafts in one forward (the last token and the drafts of every
sequence, compiled with ``--compile``), keeps the longest prefix the target model agrees with and rewinds the lightning
states past it (:mod:`hyla.serve.runner`); the output distribution is the target model's, whatever is drafted.

A round of drafts is poor when all were rejected, when the request's running share of accepted drafts fell below
:data:`MIN_ACCEPTANCE`, or when the tokens it made (the accepted drafts and the one after them) fall short of what
its step cost in plain decode steps: the engine times both kinds of step (:meth:`NgramProposer.record_step`), and a
verify step may cost several decode steps (its tokens route to more experts: 1.45x with one draft, 1.7x with four
on `small` int8 compiled, RESULTS.md). After a poor round the request gets no
drafts for the next ``cooldown`` steps (doubling while poor rounds go on, up to :data:`MAX_COOLDOWN` times that
cost ratio; reset by a good round). Where even a round of drafts all kept would not pay (the cost ratio at the last
step's number of sequences above one plus the drafts), no request gets drafts but for one probe every
:data:`MAX_COOLDOWN` times that ratio of withheld rounds, which times a verify step again. So text that does not
repeat itself, or an engine whose verify steps cost too much, decodes about as without speculation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

MAX_COOLDOWN = 32  # the longest run of steps without drafts after repeated poor rounds, per decode step a round costs
STEP_EMA = 0.2  # the weight of a new step's time in the running step times
# Below this running share of drafts accepted a request's round counts as poor (cools down): a verify step costs
# more than a decode step (measured on the main job's model: RESULTS.md, "Speculative decoding").
MIN_ACCEPTANCE = 0.5
RequestKey = tuple[str, int]
TokenSource = Callable[[int, int], list[int]]  # tokens(start, stop) of a request's prompt + outputs


@dataclass
class _History:
    """One request's n-gram index: each n-gram of its first ``indexed`` tokens -> where its last occurrence ends."""

    index: dict[tuple[int, ...], int] = field(default_factory=dict)
    indexed: int = 0
    cooldown: int = 0  # steps left without drafts
    backoff: int = 0  # the next cooldown after a poor round
    acceptance: float = 1.0  # running share of drafts accepted (each round weighs half)


class NgramProposer:
    """Drafts of at most ``num_draft_tokens`` tokens by prompt lookup, per request (see the module docstring)."""

    def __init__(self, num_draft_tokens: int, max_ngram: int = 4, min_ngram: int = 2) -> None:
        self.num_draft_tokens = num_draft_tokens
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self._histories: dict[RequestKey, _History] = {}
        # Running wall seconds of decode steps by (sequences in the step, whether it verified drafts); the last
        # step's sequences (the next step's likely size); drafts withheld since the last probe.
        self._step_seconds: dict[tuple[int, bool], float] = {}
        self._num_seqs = 1
        self._withheld = 0

    def propose(self, key: RequestKey, tokens: TokenSource, num_tokens: int, limit: int) -> list[int]:
        """Up to ``min(num_draft_tokens, limit)`` tokens to follow the ``num_tokens`` tokens of request ``key``
        (``tokens(start, stop)`` reads them); none when nothing matches or the request is cooling down."""
        history = self._histories.setdefault(key, _History())
        limit = min(self.num_draft_tokens, limit)
        if history.cooldown:
            history.cooldown -= 1
            return []
        if limit <= 0 or num_tokens <= self.min_ngram:
            return []
        cost = self.verify_cost(self._num_seqs)
        if 1 + limit < cost:  # not even all drafts kept would pay for the step: only a rare probe re-measures it
            self._withheld += 1
            if self._withheld < MAX_COOLDOWN * cost:
                return []
            self._withheld = 0
        # Index the n-grams that end before the last token: a suffix then matches only an earlier occurrence.
        start = max(history.indexed - self.max_ngram + 1, 0)
        seen = tokens(start, num_tokens)
        for end in range(history.indexed, num_tokens - 1):  # the n-grams ending at token `end`
            for n in range(self.min_ngram, self.max_ngram + 1):
                if end - n + 1 >= 0:
                    history.index[tuple(seen[end - n + 1 - start : end + 1 - start])] = end + 1
        history.indexed = max(history.indexed, num_tokens - 1)
        for n in range(min(self.max_ngram, num_tokens - 1), self.min_ngram - 1, -1):
            follows = history.index.get(tuple(seen[num_tokens - n - start :]))
            if follows is not None:
                return tokens(follows, min(follows + limit, num_tokens))
        return []

    def record_step(self, num_seqs: int, drafted: bool, seconds: float) -> None:
        """A decode step of ``num_seqs`` sequences ran in ``seconds``, verifying drafts or not."""
        key, self._num_seqs = (num_seqs, drafted), num_seqs
        before = self._step_seconds.get(key)
        self._step_seconds[key] = seconds if before is None else before + STEP_EMA * (seconds - before)

    def verify_cost(self, num_seqs: int) -> float:
        """What a step of ``num_seqs`` sequences that verifies drafts costs in plain decode steps of as many (1.0
        until both kinds were timed)."""
        verify, plain = self._step_seconds.get((num_seqs, True)), self._step_seconds.get((num_seqs, False))
        return verify / plain if verify and plain else 1.0

    def feedback(self, key: RequestKey, drafted: int, accepted: int, num_seqs: int = 1) -> None:
        """How the request's last drafts fared in a step of ``num_seqs`` sequences: a poor round (see the module
        docstring) starts (or doubles) its cooldown; a good round resets it."""
        history = self._histories.get(key)
        if history is None or not drafted:
            return
        history.acceptance = (history.acceptance + accepted / drafted) / 2
        cost = self.verify_cost(num_seqs)
        if accepted and history.acceptance >= MIN_ACCEPTANCE and 1 + accepted >= cost:
            history.backoff = 0
        else:
            history.backoff = min(max(2 * history.backoff, 1), round(MAX_COOLDOWN * max(cost, 1.0)))
            history.cooldown = history.backoff

    def forget(self, key: RequestKey) -> None:
        """The request finished (or restarts from its prompt): drop its index."""
        self._histories.pop(key, None)
