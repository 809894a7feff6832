"""The scheduler's decisions against a fake cache manager (plain counters, no prefix caching): one token budget
per step, decodes first, chunked prefill, preemption of the newest request when blocks run out, and the step's
statistics. The engine tests check the same decisions end to end against a full forward."""

from __future__ import annotations

import torch

from hyla.serve.cache import PrefixHit
from hyla.serve.sampling import SamplingParams
from hyla.serve.scheduler import Request, Scheduler, Status


class FakePool:
    """Ids 0..n-1 handed out lowest first; records what is held."""

    def __init__(self, n: int) -> None:
        self.free = list(range(n))

    @property
    def num_free(self) -> int:
        return len(self.free)

    def allocate(self, n: int | None = None):
        if n is None:
            return self.free.pop(0) if self.free else None
        if n > len(self.free):
            return None
        taken, self.free = self.free[:n], self.free[n:]
        return taken

    def release(self, ids) -> None:
        self.free = sorted(self.free + ([ids] if isinstance(ids, int) else list(ids)))


class FakeCache:
    """The calls the scheduler makes of a cache manager, without prefix caching: nothing is ever cached."""

    prefix_caching = False

    def __init__(self, slots: int, blocks: int, block_size: int) -> None:
        self.block_size, self.slots, self.blocks = block_size, FakePool(slots), FakePool(blocks)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def lookup(self, names, max_tokens: int) -> PrefixHit:
        return PrefixHit(0)

    def take(self, hit: PrefixHit) -> None:
        pass


def request(name: str, prompt_len: int, max_tokens: int = 100) -> Request:
    return Request(name, 0, list(range(prompt_len)), SamplingParams(max_tokens=max_tokens), max_tokens, [],
                   torch.Generator(), 0.0)  # fmt: skip


def test_one_budget_decodes_first_then_chunks_then_new_requests():
    cache = FakeCache(slots=4, blocks=100, block_size=4)
    scheduler = Scheduler(cache, max_num_seqs=4, max_num_batched_tokens=10)
    a, b = request("a", 6), request("b", 15)
    scheduler.add(a)
    scheduler.add(b)
    out = scheduler.schedule()  # a whole (6), then 4 of b's 15: the budget of 10
    assert [len(s.token_ids) for s in out.seqs] == [6, 4] and [s.sample for s in out.seqs] == [True, False]
    assert out.zero_slots == [0, 1]
    (updates, stats) = scheduler.update(out, [[42]])
    assert [(r.key, t) for r, t in updates] == [(a.key, 42)] and stats.output_tokens == 1
    assert stats.prompt_tokens == 21  # both prompts' tokens, counted when their first chunk runs
    out = scheduler.schedule()  # a's decode first, then 9 more of b's prompt
    assert [(s.slot, len(s.token_ids)) for s in out.seqs] == [(0, 1), (1, 9)]
    assert out.seqs[0].token_ids == [42] and out.seqs[1].num_computed == 4


def test_the_newest_request_is_preempted_when_blocks_run_out_and_recomputed_later():
    cache = FakeCache(slots=2, blocks=4, block_size=4)  # 16 tokens in all
    scheduler = Scheduler(cache, max_num_seqs=2, max_num_batched_tokens=64)
    old, new = request("old", 7), request("new", 7)
    scheduler.add(old)
    scheduler.add(new)
    scheduler.update(scheduler.schedule(), [[1], [2]])
    scheduler.update(scheduler.schedule(), [[3], [4]])  # both at 9 tokens, 8 computed: 2 blocks each, the pool full
    out = scheduler.schedule()  # old needs a third block: the newest gives its up
    (updates, stats) = scheduler.update(out, [[5]])
    assert stats.preemptions == 1 and [r.key for r, _ in updates] == [old.key]
    assert new.status is Status.WAITING and new.num_computed == 0 and new.output_ids == [2, 4]
    assert cache.blocks.num_free == 1 and cache.slots.num_free == 1
    scheduler.finish(old, "stop")
    out = scheduler.schedule()  # new comes back with its prompt and its output so far, recomputed
    assert out.seqs[0].token_ids == [*range(7), 2, 4] and out.seqs[0].sample
    (_, stats) = scheduler.update(out, [[6]])
    assert stats.prompt_tokens == 0  # a recompute is not counted as new prompt work


def test_a_finished_or_aborted_request_frees_everything():
    cache = FakeCache(slots=1, blocks=8, block_size=4)
    scheduler = Scheduler(cache, max_num_seqs=1, max_num_batched_tokens=64)
    running, waiting = request("r", 5), request("w", 5)
    scheduler.add(running)
    scheduler.add(waiting)
    scheduler.update(scheduler.schedule(), [[9]])
    assert running.status is Status.RUNNING and waiting.status is Status.WAITING  # one slot
    scheduler.finish(waiting, "abort")
    scheduler.finish(running, "abort")
    assert not scheduler.has_work() and not scheduler.requests
    assert cache.slots.num_free == 1 and cache.blocks.num_free == 8
