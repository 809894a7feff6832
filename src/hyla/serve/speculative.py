"""Speculative decoding's drafts: prompt lookup (n-gram matching against a request's own context).

Code and agent transcripts copy from their context: when the last ``n`` tokens of a sequence occurred earlier in
its prompt or outputs, the tokens that followed them then are a likely continuation now. :class:`NgramProposer`
proposes them (no second model): the most recent earlier occurrence of the longest suffix of ``max_ngram`` down
to ``min_ngram`` tokens. Where that continuation runs into the end of the sequence, the text is taken to repeat
with the period between the two occurrences (a model caught in a loop repeats its last lines), so the draft goes on
copying itself. The engine verifies the drafts in one forward (the last token and the drafts of every sequence,
compiled with ``--compile``), keeps the longest prefix the target model agrees with and rewinds the lightning
states past it (:mod:`hyla.serve.runner`); the output distribution is the target model's, whatever is drafted.

Draft lengths adapt per request: the first round drafts :data:`START_DRAFT_TOKENS`, each round kept whole doubles
the next one's length up to ``num_draft_tokens``, and a round with a rejected draft returns it to the start. Long
drafts pay where the text repeats (a loop, a copied block: all of them kept), short ones elsewhere (a verify step
costs more with each token it carries: RESULTS.md, "Draft lengths").

A round of drafts is poor when all were rejected, or when the tokens it made (the accepted drafts and the one after
them) fall short of what its step cost in plain decode steps: the engine times every decode step by its sequences
and tokens (:meth:`NgramProposer.record_step`), and a verify step may cost several decode steps (its tokens route to
more experts and take more arithmetic). After a poor round the request gets no drafts for the next ``cooldown``
steps (doubling while poor rounds go on, up to :data:`MAX_COOLDOWN` times that cost ratio; reset by a good round).
Where even a round of drafts all kept would not pay (the cost ratio of a step of the last step's sequences and these
drafts above one plus the drafts), the request gets none but for one probe every :data:`MAX_COOLDOWN` times that
ratio of withheld rounds, which times such a step again. So text that does not repeat itself, or an engine whose
verify steps cost too much, decodes about as without speculation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

MAX_COOLDOWN = 32  # the longest run of steps without drafts after repeated poor rounds, per decode step a round costs
STEP_EMA = 0.2  # the weight of a new step's time in the running step times
START_DRAFT_TOKENS = 4  # a request's first round of drafts, and its length again after a rejection
RequestKey = tuple[str, int]
TokenSource = Callable[[int, int], list[int]]  # tokens(start, stop) of a request's prompt + outputs


@dataclass
class _History:
    """One request's n-gram index: each n-gram of its first ``indexed`` tokens -> where its last occurrence ends."""

    length: int  # drafts the next round proposes at most
    index: dict[tuple[int, ...], int] = field(default_factory=dict)
    indexed: int = 0
    cooldown: int = 0  # steps left without drafts
    backoff: int = 0  # the next cooldown after a poor round


class NgramProposer:
    """Drafts of at most ``num_draft_tokens`` tokens by prompt lookup, per request (see the module docstring)."""

    def __init__(self, num_draft_tokens: int, max_ngram: int = 4, min_ngram: int = 2) -> None:
        self.num_draft_tokens = num_draft_tokens
        self.start_length = min(START_DRAFT_TOKENS, num_draft_tokens)
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self._histories: dict[RequestKey, _History] = {}
        # Running wall seconds of decode steps by (sequences in the step, tokens in it: the sequences' last tokens
        # and their drafts); the last step's sequences (the next step's likely size); drafts withheld since the
        # last probe.
        self._step_seconds: dict[tuple[int, int], float] = {}
        self._num_seqs = 1
        self._withheld = 0

    def propose(self, key: RequestKey, tokens: TokenSource, num_tokens: int, limit: int) -> list[int]:
        """Up to ``limit`` tokens (and the request's draft length, see the module docstring) to follow the
        ``num_tokens`` tokens of request ``key`` (``tokens(start, stop)`` reads them); none when nothing matches or
        the request is cooling down."""
        history = self._histories.setdefault(key, _History(self.start_length))
        limit = min(history.length, limit)
        if history.cooldown:
            history.cooldown -= 1
            return []
        if limit <= 0 or num_tokens <= self.min_ngram:
            return []
        cost = self.verify_cost(self._num_seqs, self._num_seqs + limit)
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
                draft = tokens(follows, min(follows + limit, num_tokens))
                period = num_tokens - follows  # past the end, the text repeats what came since the occurrence
                while len(draft) < limit:
                    draft.append(draft[len(draft) - period])
                return draft
        return []

    def record_step(self, num_seqs: int, num_tokens: int, seconds: float) -> None:
        """A decode step of ``num_seqs`` sequences and ``num_tokens`` tokens (more than ``num_seqs`` where it
        verified drafts) ran in ``seconds``."""
        key, self._num_seqs = (num_seqs, num_tokens), num_seqs
        before = self._step_seconds.get(key)
        self._step_seconds[key] = seconds if before is None else before + STEP_EMA * (seconds - before)

    def verify_cost(self, num_seqs: int, num_tokens: int) -> float:
        """What a step of ``num_seqs`` sequences and ``num_tokens`` tokens (their last tokens and drafts) costs in
        plain decode steps of as many sequences (1.0 until both sizes were timed)."""
        verify, plain = self._step_seconds.get((num_seqs, num_tokens)), self._step_seconds.get((num_seqs, num_seqs))
        return verify / plain if verify and plain else 1.0

    def feedback(
        self, key: RequestKey, drafted: int, accepted: int, num_seqs: int = 1, num_tokens: int | None = None
    ) -> None:
        """How the request's last drafts fared in a step of ``num_seqs`` sequences and ``num_tokens`` tokens (by
        default its own: one sequence with these drafts): a round kept whole doubles the next one's length, a
        rejection returns it to the start; a poor round (see the module docstring) starts (or doubles) its
        cooldown, a good round resets it."""
        history = self._histories.get(key)
        if history is None or not drafted:
            return
        history.length = min(2 * history.length, self.num_draft_tokens) if accepted == drafted else self.start_length
        cost = self.verify_cost(num_seqs, num_seqs + drafted if num_tokens is None else num_tokens)
        if accepted and 1 + accepted >= cost:
            history.backoff = 0
        else:
            history.backoff = min(max(2 * history.backoff, 1), round(MAX_COOLDOWN * max(cost, 1.0)))
            history.cooldown = history.backoff

    def forget(self, key: RequestKey) -> None:
        """The request finished (or restarts from its prompt): drop its index."""
        self._histories.pop(key, None)
