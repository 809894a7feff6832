"""Prefix caching is exact: with it on, every output equals the output with it off and a full forward per token
(greedy, float64), across shared prefixes, boundaries, chunked prefill, preemption, eviction, n > 1 and races."""

import pytest
import torch

from hyla.data.tokenizer import byte_level_tokenizer
from hyla.serve import LLM, EngineConfig, SamplingParams
from hyla.serve.cache import BlockPool, CacheManager, SnapshotPool, block_hashes
from tests.helpers import PATTERNS, full_forward_greedy, random_model

VOCAB = 256
BS = 8  # KV block size of these tests


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return random_model(layer_types=PATTERNS["alternating"]).double()


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def engine(model, **config) -> LLM:
    defaults = dict(max_num_seqs=4, max_num_batched_tokens=64, block_size=BS, max_model_len=160, snapshot_every=16)
    return LLM(model, byte_level_tokenizer(), EngineConfig(**{**defaults, **config}))


def greedy(llm: LLM, prompts: list[list[int]], max_tokens: int = 8, n: int = 1):
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, n=n)
    return llm.generate(prompts, params)


def check_all_free(llm: LLM) -> None:
    e = llm.engine
    assert e.cache.blocks.num_free == e.config.num_blocks and e.cache.slots.num_free == e.config.max_num_seqs
    assert not e.scheduler.running and not e.scheduler.waiting


def test_shared_prefixes_hit_and_equal_the_uncached_outputs(model):
    system = tokens(37, 0)
    first = [system + tokens(5, 1), system + tokens(19, 2)]
    # Later prompts: the same system prompt with other questions; one prompt again; one ending exactly on a
    # block boundary (40) and one just past it (41); a conversation's next turn (prompt + its reply + more).
    cached, plain = engine(model), engine(model, enable_prefix_caching=False)
    replies = [c[0].token_ids for c in greedy(cached, first)]
    later = [system + tokens(11, 3), first[1], (system + tokens(3, 4))[:40], (system + tokens(4, 5))[:41],
             first[0] + replies[0] + tokens(6, 6)]  # fmt: skip
    for batch in (first, later):
        got = [c[0].token_ids for c in greedy(cached, batch)]
        assert got == [c[0].token_ids for c in greedy(plain, batch)]
        assert got == [full_forward_greedy(model, p, 8) for p in batch]
    hits = [c[0] for c in greedy(cached, later)]  # a third time: everything up to the last boundary is cached
    e = cached.engine
    assert e.stats.hit_tokens > 0 and plain.engine.stats.hit_tokens == 0
    check_all_free(cached)
    assert hits[0].token_ids == full_forward_greedy(model, later[0], 8)


def test_cached_tokens_stop_before_the_last_prompt_token(model):
    """A prompt seen before resumes at its last boundary before its last token (whose logits must be computed)."""
    llm = engine(model)
    for length in (32, 33, 39):  # on a boundary, one past it, one short of the next
        prompt = tokens(length, length)
        greedy(llm, [prompt])
        outputs = list(llm.stream([prompt], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)))
        assert outputs[-1].num_cached_tokens == (length - 1) // BS * BS
        assert [t for o in outputs for t in o.token_ids] == full_forward_greedy(model, prompt, 3)


def test_a_conversation_resumes_from_the_end_of_the_last_reply(model):
    """The state at the last block boundary a request's decodes passed is kept when it finishes: the next turn,
    which repeats the conversation, resumes there (past the first prompt's own end)."""
    llm = engine(model)
    prompt = tokens(21, 7)
    (reply,) = greedy(llm, [prompt], max_tokens=30)[0]
    turn = prompt + reply.token_ids + tokens(5, 8)
    outputs = list(llm.stream([turn], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)))
    assert outputs[-1].num_cached_tokens == (len(prompt) + 30 - 1) // BS * BS  # 48: inside the reply
    assert [t for o in outputs for t in o.token_ids] == full_forward_greedy(model, turn, 6)


def test_a_later_turn_runs_in_one_step_and_its_inner_snapshot_serves_the_next(model):
    """A later turn's new tokens cross a snapshot boundary (its prompt's last full block); they still run in one
    step, the snapshot taken inside it, and a prompt that parts from the turn there resumes from that snapshot."""
    llm = engine(model)
    prompt = tokens(21, 30)
    (reply,) = greedy(llm, [prompt], max_tokens=10)[0]  # resumable at 24, the last boundary its decodes passed
    turn = prompt + reply.token_ids + tokens(30, 31)  # 61 tokens: 37 new, a boundary at 56 inside them
    e = llm.engine
    e.add_request("turn", [turn], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    first = e.step()
    assert [o.num_cached_tokens for o in first] == [24] and len(first[0].token_ids) == 1  # one step to a token
    outputs = first + [o for _ in range(3) for o in e.step()]
    assert [t for o in outputs for t in o.token_ids] == full_forward_greedy(model, turn, 4)
    parted = turn[:56] + tokens(9, 32)
    outputs = list(llm.stream([parted], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)))
    assert outputs[-1].num_cached_tokens == 56
    assert [t for o in outputs for t in o.token_ids] == full_forward_greedy(model, parted, 3)
    check_all_free(llm)


@pytest.mark.parametrize(
    ("budget", "num_blocks", "prefix_cache_gb", "max_num_seqs"),
    [
        (7, None, 0.25, 4),  # chunks of 7 tokens: snapshot boundaries inside and at the ends of chunks
        (64, 22, 0.25, 4),  # too few KV blocks: preemption, cached blocks evicted
        (24, 20, 0.25, 4),  # both
        (64, None, 2 * 8 * 16**2 * 8 / 2**30, 4),  # room for two snapshots: snapshots evicted
    ],
)
def test_under_pressure_the_outputs_do_not_change(model, budget, num_blocks, prefix_cache_gb, max_num_seqs):
    system = tokens(45, 10)
    prompts = [system + tokens(n, 11 + n) for n in (1, 8, 15, 30)] + [system[:16], system + tokens(9, 99)]
    config = dict(max_num_batched_tokens=budget, num_blocks=num_blocks, prefix_cache_gb=prefix_cache_gb,
                  max_num_seqs=max_num_seqs)  # fmt: skip
    llm = engine(model, **config)
    for _ in range(2):  # the second round meets what the first left in the cache
        got = [c[0].token_ids for c in greedy(llm, prompts, max_tokens=20)]
        assert got == [full_forward_greedy(model, p, 20) for p in prompts]
    if num_blocks is not None:
        assert llm.engine.stats.preemptions > 0
    if prefix_cache_gb >= 0.25:  # (two snapshots are taken over by the decodes' before anyone reuses them)
        assert llm.engine.stats.hit_tokens > 0
    check_all_free(llm)


def test_n_sequences_and_racing_requests_share_safely(model):
    llm = engine(model, max_num_seqs=6)
    prompt = tokens(30, 20)
    (first,) = greedy(llm, [prompt], n=1)
    # Three sequences of one prompt, and two requests of the same new prompt in the same step.
    twice = tokens(27, 21)
    results = greedy(llm, [prompt, twice, twice], n=2)
    for p, pair in zip([prompt, twice, twice], results, strict=True):
        assert [c.token_ids for c in pair] == [full_forward_greedy(model, p, 8)] * 2
    assert first[0].token_ids == results[0][0].token_ids
    check_all_free(llm)


def test_block_pool_counts_references_and_evicts_the_oldest_cached_block():
    pool = BlockPool(4)
    a = pool.allocate(3)
    pool.register(a[0], b"x")
    pool.register(a[1], b"y")
    pool.register(a[2], b"x")  # the name is taken: this block stays unnamed
    pool.take(a[0])
    pool.release(a)  # a[0] still held once; a[1] cached; a[2] free
    assert pool.num_free == 3 and pool.cached == {b"x": a[0], b"y": a[1]}
    assert pool.allocate(2) == sorted({0, 1, 2, 3} - {a[0], a[1]})  # free ones before cached ones
    (evicted,) = pool.allocate(1)
    assert evicted == a[1] and pool.cached == {b"x": a[0]}  # the cached one, its name forgotten
    assert pool.allocate(1) is None


def test_snapshot_pool_forgets_the_least_recently_used():
    pool = SnapshotPool(2)
    s1, s2 = pool.allocate(), pool.allocate()
    pool.name(s1, b"a")
    pool.name(s2, b"b")
    assert pool.find(b"a") == s1  # now the most recent
    assert pool.allocate() == s2 and pool.find(b"b") is None
    s3 = pool.allocate()
    assert s3 == s1 and pool.allocate() is None  # both in flight: none to give


def test_lookup_needs_every_block_and_a_snapshot():
    cache = CacheManager(num_slots=1, num_blocks=8, block_size=4, num_snapshots=4)
    names = block_hashes(list(range(20)), 4)
    assert len(names) == 5 and block_hashes(list(range(12)), 4) == names[:3]  # a prefix's names are a prefix
    blocks = cache.blocks.allocate(4)
    for block_id, name in zip(blocks, names, strict=False):
        cache.blocks.register(block_id, name)
    for boundary in (1, 3):  # snapshots after blocks 1 and 3 (8 and 16 tokens)
        cache.snapshots.name(cache.snapshots.allocate(), names[boundary])
    assert cache.lookup(names, 19).num_tokens == 16
    assert cache.lookup(names, 15).num_tokens == 8  # at most 15 tokens
    cache.blocks.release(blocks)
    cache.blocks.allocate(5)  # evicts the oldest cached blocks: the chain breaks at block 0
    assert cache.lookup(names, 19).num_tokens == 0
