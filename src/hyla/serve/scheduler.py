"""The scheduler decides what each engine step computes, within one token budget, and is the only writer of
request state.

There is no prefill phase: a request is a list of tokens (prompt, then outputs) of which ``num_computed``
are in the cache, and each step gives it some of the rest. Running decodes (one token left) are served
first, then running prompts continue in chunks, then waiting requests are admitted while the budget, the
state slots and the KV blocks last. When a running request needs a block and none is free, the newest
running request is preempted: its slot and blocks are freed and it waits at the front of the queue, to be
recomputed from its prompt and the outputs it already has (so its output is unchanged).

:meth:`Scheduler.schedule` returns a plain :class:`SchedulerOutput` (token ids, slots, block tables, and the
slot resets and snapshot copies the runner makes around the forward); :meth:`Scheduler.update` applies the
step's sampled tokens. With prefix caching, an admitted request starts after the longest cached prefix (its
blocks shared, its lightning states copied from the snapshot there). Snapshots are taken at a few block
boundaries of a prompt: the end of its last full block (and of the one before, when the prompt ends on a
boundary), the point where it parts from the cached blocks of an earlier sequence (a shared system prompt's end,
so that the sequences after it resume there) and, inside long prompts, one every ``snapshot_every`` tokens or
more. A boundary may fall anywhere in a step's chunk: the runner computes the states there from the states
before the step (:func:`~hyla.ops.lightning.lightning_state`), so snapshots cost no step of their own (a later
turn of a conversation crosses two or three of them in one step). A request's end keeps the last block boundary
its decodes passed.

With speculative decoding (a ``proposer``, :mod:`hyla.serve.speculative`), a decode may carry drafted tokens: it
is scheduled as a chunk of its last token and the drafts (among the prefill chunks), every position sampled;
:meth:`Scheduler.update` then takes the tokens the engine accepted (the drafts the model agreed with and one
more) and advances the request past the accepted ones only, so no block is named and no snapshot taken for a
rejected token (a step with drafts plans no snapshot).
"""

from __future__ import annotations

import bisect
import enum
from collections import deque
from dataclasses import dataclass, field

import torch

from hyla.serve.cache import CacheManager, block_hashes
from hyla.serve.sampling import SamplingParams
from hyla.serve.speculative import NgramProposer


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """One sequence being generated (a prompt with ``n = 3`` is three of them, ``index`` 0, 1, 2)."""

    request_id: str
    index: int
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    stop_ids: list[int]
    generator: torch.Generator
    arrival_time: float
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    status: Status = Status.WAITING
    slot: int | None = None
    block_table: list[int] = field(default_factory=list)
    num_preemptions: int = 0
    finish_reason: str | None = None
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at the first admission
    block_names: list[bytes] = field(default_factory=list)  # the prefix-cache names of its full blocks
    boundaries: list[int] = field(default_factory=list)  # where a snapshot of its prompt is taken
    last_snapshot: int = 0  # where the last snapshot of its prompt was taken
    pending_snapshot: int | None = None  # the states at the last block boundary a decode passed ...
    pending_boundary: int = 0  # ... and that boundary

    @property
    def key(self) -> tuple[str, int]:
        return self.request_id, self.index

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_ids(self, start: int, stop: int) -> list[int]:
        """Tokens ``start .. stop - 1`` of prompt + outputs."""
        p = len(self.prompt_ids)
        return self.prompt_ids[start:stop] + self.output_ids[max(start - p, 0) : max(stop - p, 0)]


@dataclass
class ScheduledSeq:
    """One request's share of a step: ``token_ids`` (``num_tokens`` new tokens) after ``num_computed`` cached
    ones, in state slot ``slot`` and KV blocks ``block_table``; ``sample``: its next token is drawn (with a
    ``draft``, the last ``len(draft)`` of ``token_ids``, a token after every one of them too)."""

    slot: int
    block_table: list[int]
    num_computed: int
    token_ids: list[int]
    sample: bool
    draft: list[int] = field(default_factory=list)

    @property
    def num_samples(self) -> int:
        """Positions whose next token is drawn: the last ``num_samples`` of ``token_ids``."""
        return (1 + len(self.draft)) * self.sample

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class SchedulerOutput:
    """One step, in plain values: decodes (one new token) first in slot order, then prefill chunks. Before the
    forward the runner zeroes ``zero_slots`` and copies each ``(snapshot, slot)`` of ``restores``; for each
    ``(seq, tokens, snapshot)`` of ``saves`` it keeps in ``snapshot`` the states of ``seqs[seq]`` after its first
    ``tokens`` new tokens (all of them, or fewer: a boundary inside a prefill chunk). ``draft_saves`` are the same
    for sequences with drafts, kept only where the step accepts the drafts up to there (the rewind writes them)."""

    seqs: list[ScheduledSeq] = field(default_factory=list)
    keys: list[tuple[str, int]] = field(default_factory=list)  # the request of each seq
    zero_slots: list[int] = field(default_factory=list)
    restores: list[tuple[int, int]] = field(default_factory=list)
    saves: list[tuple[int, int, int]] = field(default_factory=list)
    draft_saves: list[tuple[int, int, int]] = field(default_factory=list)


@dataclass
class StepStats:
    """What steps did, for metrics: counted by the scheduler during a step, returned by :meth:`Scheduler.update`
    and added up by the engine (on its thread)."""

    prompt_tokens: int = 0  # prompts' tokens to compute, counted at their first chunk (not a preempted recompute)
    queried_tokens: int = 0  # prompt tokens looked up in the prefix cache (first admissions)
    hit_tokens: int = 0  # of those, read from it
    preemptions: int = 0
    output_tokens: int = 0
    draft_tokens: int = 0  # tokens drafted for speculative decoding ...
    accepted_tokens: int = 0  # ... and of those, accepted

    def add(self, other: StepStats) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class _Save:
    request: Request
    snapshot: int
    boundary: int
    pending: bool  # a decode's boundary (named when the request ends) or a prompt's (named now)
    seq: int  # the request's index in the step's seqs ...
    tokens: int  # ... and how many of its new tokens come before the boundary


class Scheduler:
    def __init__(
        self,
        cache: CacheManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        snapshot_every: int = 256,
        proposer: NgramProposer | None = None,
        verify_tokens: int | None = None,
    ) -> None:
        """``verify_tokens``: the most tokens a step of decodes with drafts may hold (the compiled verify graph's:
        past it the step would run eager), drafts cut to fit; None: only the step's token budget bounds them."""
        self.cache = cache
        self.proposer = proposer
        self.verify_tokens = verify_tokens
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.snapshot_every = snapshot_every
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order: the last is the first preempted
        self.requests: dict[tuple[str, int], Request] = {}
        self._preempted: set[tuple[str, int]] = set()
        self._saves: list[_Save] = []
        self._draft_saves: list[_Save] = []  # end snapshots of steps with drafts, kept if accepted that far
        self._stats = StepStats()  # this step's, returned by update()

    def add(self, request: Request) -> None:
        if self.cache.prefix_caching:
            bs = self.cache.block_size
            request.block_names = block_hashes(request.prompt_ids, bs)
            p = len(request.prompt_ids)
            ends = {p // bs * bs, (p - 1) // bs * bs}  # the prompt's last full block; the one before if p ends one
            request.boundaries = sorted(ends - {0})
        self.requests[request.key] = request
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, request: Request, reason: str, num_outputs: int | None = None) -> None:
        """End a request (done, stopped or aborted) and free its slot and blocks; ``num_outputs``: keep only that
        many outputs (a stop string inside a run of accepted drafts ends it there)."""
        if num_outputs is not None:
            del request.output_ids[num_outputs:]
        if request.status is Status.FINISHED:  # ended by its last token; a stop string came earlier in the run
            request.finish_reason = reason
            return
        if self.proposer is not None:
            self.proposer.forget(request.key)
        if request.status is Status.RUNNING:
            self._free(request)
            self.running.remove(request)
        elif request.status is Status.WAITING:
            self.waiting.remove(request)
        request.status, request.finish_reason = Status.FINISHED, reason
        self.requests.pop(request.key, None)

    # -- a step --------------------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """This step: decodes first, then prompt chunks of running requests, then newly admitted ones."""
        budget = self.max_num_batched_tokens
        self._preempted = set()
        for save in self._saves:  # planned for a step that failed: the snapshot was never written
            if not save.pending:
                self.cache.snapshots.release(save.snapshot)
        self._saves, self._draft_saves = [], []
        self._stats = StepStats()
        out = SchedulerOutput()
        chosen: list[tuple[Request, int]] = []
        drafts: dict[tuple[str, int], list[int]] = {}
        # Tokens left for drafts: the verify size less one token for each decode (every decode has its last token).
        room = budget
        if self.verify_tokens is not None:
            room = self.verify_tokens - sum(r.num_tokens - r.num_computed == 1 for r in self.running)
        for want_decode in (True, False):
            for request in list(self.running):
                left = request.num_tokens - request.num_computed
                if budget == 0 or request.status is not Status.RUNNING or (left == 1) != want_decode:
                    continue
                draft = self._draft(request, min(budget, 1 + room)) if left == 1 else []
                n = len(draft) + 1 if left == 1 else min(left, budget)
                if self._grow(request, request.num_computed + n):
                    chosen.append((request, n))
                    budget -= n
                    if draft:
                        drafts[request.key] = draft
                        room -= len(draft)
        while self.waiting and budget and len(self.running) < self.max_num_seqs and self.cache.slots.num_free:
            request = self.waiting[0]
            if request.key in self._preempted:  # it gave its blocks up this step: not back before the next
                break
            n = self._admit(request, budget, out)
            if n is None:
                break
            chosen.append((request, n))
            budget -= n
        # A request preempted after it was scheduled (to make room for an older one) sits this step out.
        chosen = [(r, n) for r, n in chosen if r.status is Status.RUNNING]
        # Decodes in slot order, so that the state update runs in place over consecutive slots.
        decodes = sorted((c for c in chosen if c[1] == 1), key=lambda c: c[0].slot)
        for request, n in decodes + [c for c in chosen if c[1] > 1]:
            draft = drafts.get(request.key, [])
            start, end = request.num_computed, request.num_computed + n - len(draft)
            tokens = request.token_ids(start, end) + draft
            out.seqs.append(
                ScheduledSeq(request.slot, list(request.block_table), start, tokens, end == request.num_tokens, draft)
            )
            out.keys.append(request.key)
            if draft:  # the states after this step may hold tokens that will be rejected
                self._plan_draft_save(request, start, start + n, len(out.seqs) - 1)
            else:
                self._plan_saves(request, start, start + n, len(out.seqs) - 1)
        out.saves = [(save.seq, save.tokens, save.snapshot) for save in self._saves]
        out.draft_saves = [(save.seq, save.tokens, save.snapshot) for save in self._draft_saves]
        return out

    def _draft(self, request: Request, budget: int) -> list[int]:
        """Drafted tokens to verify after a decode's last token: within the budget and the request's
        ``max_tokens`` (the token after the drafts comes too); none without a proposer."""
        if self.proposer is None:
            return []
        limit = min(budget - 1, request.max_tokens - len(request.output_ids) - 1)
        return self.proposer.propose(request.key, request.token_ids, request.num_tokens, limit)

    def _admit(self, request: Request, budget: int, out: SchedulerOutput) -> int | None:
        """Give ``request`` a slot, its cached prefix and blocks for this step's tokens; None if they do not fit."""
        cache = self.cache
        if cache.prefix_caching:
            self._extend_names(request, request.num_tokens - 1)
        hit = cache.lookup(request.block_names, request.num_tokens - 1)
        if hit.matched_tokens > hit.num_tokens and hit.matched_tokens not in request.boundaries:
            # Another sequence shares the prefix up to here (a system prompt, say) but no snapshot was taken at
            # the point where they part: take one, so that the next sequence that shares it resumes there.
            bisect.insort(request.boundaries, hit.matched_tokens)
        cache.take(hit)
        request.num_computed = hit.num_tokens
        n = min(request.num_tokens - hit.num_tokens, budget)
        blocks = cache.blocks.allocate(cache.blocks_for(hit.num_tokens + n) - len(hit.blocks))
        if blocks is None:
            cache.blocks.release(hit.blocks)
            request.num_computed = 0
            return None
        self.waiting.popleft()
        request.slot = cache.slots.allocate()
        if hit.snapshot is None:
            out.zero_slots.append(request.slot)
        else:
            out.restores.append((hit.snapshot, request.slot))
        if request.num_preemptions == 0:
            request.num_cached_tokens = hit.num_tokens
            self._stats.queried_tokens += len(request.prompt_ids)
            self._stats.hit_tokens += hit.num_tokens
        request.block_table, request.status = hit.blocks + blocks, Status.RUNNING
        self.running.append(request)
        return n

    def _plan_saves(self, request: Request, start: int, end: int, seq: int) -> None:
        """Snapshots for a step that computes the request's tokens ``start .. end - 1`` (``seq``: its index in the
        step): at each of its boundaries in ``(start, end]``; at the last block boundary inside its prompt up to
        ``end`` if that is ``snapshot_every`` tokens or more past the last snapshot; decoding, at ``end`` if it is
        a block boundary (kept as the request's end)."""
        if not self.cache.prefix_caching:
            return
        bs, prompt = self.cache.block_size, len(request.prompt_ids)
        points = request.boundaries[bisect.bisect_right(request.boundaries, start) :]
        points = [p for p in points if p <= end]
        inside = min(end, prompt - 1) // bs * bs  # the last block boundary inside the prompt
        if inside > start and inside - request.last_snapshot >= self.snapshot_every and inside not in points:
            bisect.insort(points, inside)
        for point in points:
            snapshot = self.cache.snapshots.allocate()
            if snapshot is not None:
                request.last_snapshot = point
                self._saves.append(_Save(request, snapshot, point, False, seq, point - start))
        if end > prompt and end % bs == 0 and end not in points:
            self._saves += self._end_save(request, end, start, seq)

    def _plan_draft_save(self, request: Request, start: int, end: int, seq: int) -> None:
        """The request's end snapshot for a step with drafts that computes its tokens ``start .. end - 1``: at the
        last block boundary past the prompt in ``(start, end]``, kept (:meth:`update`) only if the step accepts the
        drafts up to it; the rewind writes it (:meth:`~hyla.serve.runner.ModelRunner.rewind`)."""
        bs = self.cache.block_size
        boundary = end // bs * bs
        if self.cache.prefix_caching and boundary > max(start, len(request.prompt_ids)):
            self._draft_saves += self._end_save(request, boundary, start, seq)

    def _end_save(self, request: Request, boundary: int, start: int, seq: int) -> list[_Save]:
        """The save of the request's end snapshot (allocated once per request) at a decode's ``boundary``, in a
        step whose tokens for it start at ``start``; none when the snapshot pool is full."""
        if request.pending_snapshot is None:
            request.pending_snapshot = self.cache.snapshots.allocate()
        if request.pending_snapshot is None:
            return []
        return [_Save(request, request.pending_snapshot, boundary, True, seq, boundary - start)]

    def update(self, out: SchedulerOutput, sampled: list[list[int]]) -> tuple[list[tuple[Request, int]], StepStats]:
        """Apply a step that ran: advance each request, cache its newly full blocks and snapshots, append the
        ``sampled`` tokens (per seq with ``sample``, in order: one token, or with a draft the accepted drafts and
        the token after them) and finish those that reached a stop token or ``max_tokens``. Returns each
        appended ``(request, token)`` in order, and the step's :class:`StepStats`."""
        stats, self._stats = self._stats, StepStats()
        requests = [self.requests[k] for k in out.keys]
        runs = iter(sampled)
        emitted = [next(runs) if seq.sample else [] for seq in out.seqs]
        step_tokens = sum(seq.num_tokens for seq in out.seqs)
        for request, seq, tokens in zip(requests, out.seqs, emitted, strict=True):
            if seq.num_computed == request.num_cached_tokens and not request.num_preemptions:  # its first chunk
                stats.prompt_tokens += len(request.prompt_ids) - request.num_cached_tokens
            rejected = len(seq.draft) - (len(tokens) - 1) if seq.draft else 0
            request.num_computed += seq.num_tokens - rejected
            # (accepted drafts are computed tokens not yet among the outputs: they are appended below)
            self._register_blocks(request, seq.num_computed, request.num_computed, tokens[:-1] if seq.draft else [])
            if seq.draft:
                drafted, accepted = len(seq.draft), len(seq.draft) - rejected
                stats.draft_tokens += drafted
                stats.accepted_tokens += accepted
                self.proposer.feedback(request.key, drafted, accepted, len(out.seqs), step_tokens)
        for save in self._saves:
            if save.pending:
                save.request.pending_boundary = save.boundary
            else:
                name = save.request.block_names[save.boundary // self.cache.block_size - 1]
                self.cache.snapshots.name(save.snapshot, name)
        for save in self._draft_saves:  # written by the rewind where the step kept that many tokens
            if save.tokens <= len(emitted[save.seq]):
                save.request.pending_boundary = save.boundary
        self._saves, self._draft_saves = [], []
        results = []
        for request, tokens in zip(requests, emitted, strict=True):
            for token in tokens:
                stats.output_tokens += 1
                request.output_ids.append(token)
                results.append((request, token))
                if token in request.stop_ids:
                    self.finish(request, "stop")
                elif len(request.output_ids) >= request.max_tokens:
                    self.finish(request, "length")
                if request.status is Status.FINISHED:
                    break
        return results, stats

    def _extend_names(self, request: Request, num_tokens: int, accepted: list[int] | None = None) -> None:
        """Block names for the full blocks of the request's first ``num_tokens`` tokens (its prompt, outputs and
        then ``accepted``, drafts to be appended)."""
        bs = self.cache.block_size
        have = len(request.block_names)
        if num_tokens // bs > have:
            parent = request.block_names[-1] if have else b""
            tokens = request.token_ids(have * bs, num_tokens // bs * bs)
            if accepted:
                tokens = (tokens + accepted)[: num_tokens // bs * bs - have * bs]
            request.block_names += block_hashes(tokens, bs, parent)

    def _register_blocks(self, request: Request, before: int, after: int, accepted: list[int]) -> None:
        """Name the blocks that the last step filled (``accepted``: drafts it computed, not yet outputs)."""
        if not self.cache.prefix_caching or after // self.cache.block_size == before // self.cache.block_size:
            return
        self._extend_names(request, after, accepted)
        for i in range(before // self.cache.block_size, after // self.cache.block_size):
            self.cache.blocks.register(request.block_table[i], request.block_names[i])

    # -- memory --------------------------------------------------------------------------------------------

    def _grow(self, request: Request, num_tokens: int) -> bool:
        """Blocks for ``num_tokens``, preempting the newest running requests if needed; False if that was
        ``request`` itself."""
        need = self.cache.blocks_for(num_tokens) - len(request.block_table)
        while need > 0:
            blocks = self.cache.blocks.allocate(need)
            if blocks is not None:
                request.block_table += blocks
                return True
            victim = self.running[-1]
            self._preempt(victim)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        self._free(request)
        self.running.remove(request)
        self._preempted.add(request.key)
        request.status, request.num_computed = Status.WAITING, 0
        request.num_preemptions += 1
        self._stats.preemptions += 1
        self.waiting.appendleft(request)

    def _free(self, request: Request) -> None:
        """Give back the request's slot and blocks; its decode snapshot, if any, is kept under its boundary."""
        if request.pending_snapshot is not None:
            if request.pending_boundary:
                name = request.block_names[request.pending_boundary // self.cache.block_size - 1]
                self.cache.snapshots.name(request.pending_snapshot, name)
            else:  # allocated, never written
                self.cache.snapshots.release(request.pending_snapshot)
            request.pending_snapshot, request.pending_boundary = None, 0
        self.cache.blocks.release(request.block_table)
        self.cache.slots.release(request.slot)
        request.block_table, request.slot = [], None
