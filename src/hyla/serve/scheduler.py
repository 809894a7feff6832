"""The scheduler decides what each engine step computes, within one token budget.

There is no prefill phase: a request is a list of tokens (prompt, then outputs) of which ``num_computed``
are in the cache, and each step gives it some of the rest. Running decodes (one token left) are served
first, then running prompts continue in chunks, then waiting requests are admitted while the budget, the
state slots and the KV blocks last. When a running request needs a block and none is free, the newest
running request is preempted: its slot and blocks are freed and it waits at the front of the queue, to be
recomputed from its prompt and the outputs it already has (so its output is unchanged).
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

import torch

from hyla.serve.cache import EngineCache
from hyla.serve.sampling import SamplingParams


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

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_ids(self, start: int, stop: int) -> list[int]:
        """Tokens ``start .. stop - 1`` of prompt + outputs."""
        p = len(self.prompt_ids)
        return self.prompt_ids[start:stop] + self.output_ids[max(start - p, 0) : max(stop - p, 0)]


class Scheduler:
    def __init__(self, cache: EngineCache, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.cache = cache
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order: the last is the first preempted
        self._preempted: set[int] = set()
        self.num_preemptions = 0  # since the start, for metrics

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, request: Request, reason: str) -> None:
        """End a request (done, stopped or aborted) and free its slot and blocks."""
        if request.status is Status.RUNNING:
            self._free(request)
            self.running.remove(request)
        elif request.status is Status.WAITING:
            self.waiting.remove(request)
        request.status, request.finish_reason = Status.FINISHED, reason

    def schedule(self) -> list[tuple[Request, int]]:
        """This step's ``(request, num_new_tokens)``: decodes first, then prompt chunks."""
        budget = self.max_num_batched_tokens
        self._preempted: set[int] = set()
        decodes: list[tuple[Request, int]] = []
        prefills: list[tuple[Request, int]] = []
        for want_decode in (True, False):
            for request in list(self.running):
                left = request.num_tokens - request.num_computed
                if budget == 0 or request.status is not Status.RUNNING or (left == 1) != want_decode:
                    continue
                n = min(left, budget)
                if self._grow(request, request.num_computed + n):
                    (decodes if n == 1 else prefills).append((request, n))
                    budget -= n
        while self.waiting and budget and len(self.running) < self.max_num_seqs and self.cache.slots.num_free:
            request = self.waiting[0]
            if id(request) in self._preempted:  # it gave its blocks up this step: not back before the next
                break
            n = min(request.num_tokens, budget)
            blocks = self.cache.blocks.allocate(self.cache.blocks_for(n))
            if blocks is None:
                break
            self.waiting.popleft()
            (request.slot,) = self.cache.slots.allocate(1)
            self.cache.reset_slot(request.slot)
            request.block_table, request.status = blocks, Status.RUNNING
            self.running.append(request)
            (decodes if n == 1 else prefills).append((request, n))
            budget -= n
        # Decodes in slot order, so that the state update runs in place over consecutive slots. A request
        # preempted after it was scheduled (to make room for an older one) sits this step out.
        decodes.sort(key=lambda item: item[0].slot if item[0].slot is not None else -1)
        return [(r, n) for r, n in decodes + prefills if r.status is Status.RUNNING]

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
        self._preempted.add(id(request))
        request.status, request.num_computed = Status.WAITING, 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _free(self, request: Request) -> None:
        self.cache.blocks.release(request.block_table)
        self.cache.slots.release([request.slot])
        request.block_table, request.slot = [], None
