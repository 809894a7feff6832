"""Speculative decoding by prompt lookup: drafts from a request's own context, verified in one step, lightning
states rewound past rejected drafts. Greedy outputs equal a full forward per token (float64) and speculation off,
token for token, for every layer pattern and under chunking, preemption, prefix caching, n > 1, stop strings and
max_tokens inside an accepted run; sampled outputs follow the model's distribution (a chi-square test)."""

import itertools
import math
import random

import pytest
import torch

from hyla.errors import ConfigError
from hyla.serve import LLM, EngineConfig, SamplingParams
from hyla.serve.speculative import NgramProposer
from tests.helpers import PATTERNS, byte_tokenizer, full_forward_greedy, random_model

VOCAB = 12  # a small vocabulary: random models repeat themselves, so drafts come and are both kept and rejected


def reader(tokens: list[int]):
    return lambda start, stop: tokens[start:stop]


@pytest.fixture(autouse=True)
def untimed_steps(monkeypatch):
    """The engines here do not tell their proposers the steps' times (the drafts a test sees would otherwise depend
    on how fast this machine ran the steps); the timing policy has tests of its own below."""
    monkeypatch.setattr(NgramProposer, "record_step", lambda self, num_seqs, num_tokens, seconds: None)


def test_the_proposer_continues_the_latest_earlier_occurrence_of_the_longest_suffix():
    proposer = NgramProposer(num_draft_tokens=3)
    tokens = [5, 1, 2, 9, 8, 1, 2, 7, 6, 3, 4, 0, 1, 2]
    # (1, 2) last occurred before the end at positions 5-6, followed by 7, 6, 3
    assert proposer.propose(("a", 0), reader(tokens), len(tokens), limit=8) == [7, 6, 3]
    tokens += [7, 6]  # now (1, 2, 7, 6) matches too; the continuation is the same run
    assert proposer.propose(("a", 0), reader(tokens), len(tokens), limit=2) == [3, 4]
    tokens += [5]  # (6, 5) never occurred; nor did anything ending in 5 except the first token
    assert proposer.propose(("a", 0), reader(tokens), len(tokens), limit=8) == []
    assert proposer.propose(("b", 0), reader([1, 2, 1, 2]), 4, limit=8) == [1, 2, 1]  # it may overlap the suffix
    assert proposer.propose(("c", 0), reader([3, 3]), 2, limit=8) == []  # too short for a 2-gram before the end


def test_a_match_that_runs_into_the_end_repeats_its_period():
    """A model in a loop: the continuation after the earlier occurrence reaches the last token, and the draft goes
    on with the text since that occurrence, as often as its length asks."""
    proposer = NgramProposer(num_draft_tokens=8)
    tokens = [9, 5, 1, 2, 3, 1, 2]  # (1, 2) last occurred at 2-3, followed by 3, 1, 2 and then the end
    assert proposer.propose(("a", 0), reader(tokens), len(tokens), limit=8) == [3, 1, 2, 3]  # the first round: 4
    proposer.feedback(("a", 0), drafted=4, accepted=4)
    assert proposer.propose(("a", 0), reader(tokens), len(tokens), limit=8) == [3, 1, 2, 3, 1, 2, 3, 1]
    assert proposer.propose(("b", 0), reader([4, 4, 4]), 3, limit=8) == [4, 4, 4, 4]  # a period of one token


def test_draft_lengths_double_while_kept_whole_and_return_to_the_start_after_a_rejection():
    from hyla.serve.speculative import START_DRAFT_TOKENS

    proposer, key = NgramProposer(num_draft_tokens=16), ("a", 0)
    tokens = list(range(40)) * 2  # a long run to copy: drafts are as long as the request's length allows

    def length(limit: int = 64) -> int:
        return len(proposer.propose(key, reader(tokens), len(tokens), limit))

    assert START_DRAFT_TOKENS == 4
    lengths = []
    for _ in range(4):
        lengths.append(length())
        proposer.feedback(key, drafted=lengths[-1], accepted=lengths[-1])
    assert lengths == [4, 8, 16, 16]  # doubling up to num_draft_tokens
    assert length(limit=3) == 3  # near max_tokens: no more than the limit; the length itself stays
    assert length() == 16
    proposer.feedback(key, drafted=16, accepted=9)
    assert length() == 4
    assert NgramProposer(num_draft_tokens=2).propose(key, reader(tokens), len(tokens), 64) == [0, 1]


def test_a_long_round_is_judged_by_what_a_step_of_its_size_costs(monkeypatch):
    """Steps are timed by their tokens: a 16-draft round whose 3 tokens fall short of its step's cost pauses the
    request, while the same 3 tokens from a 4-draft round, whose step cost less, do not."""
    monkeypatch.undo()  # the real record_step
    proposer, key = NgramProposer(num_draft_tokens=16), ("a", 0)
    tokens = list(range(40)) * 2
    proposer.record_step(1, num_tokens=1, seconds=0.002)
    proposer.record_step(1, num_tokens=5, seconds=0.004)  # 2 decode steps
    proposer.record_step(1, num_tokens=17, seconds=0.008)  # 4 decode steps
    assert proposer.propose(key, reader(tokens), len(tokens), limit=64) == [0, 1, 2, 3]
    proposer.feedback(key, drafted=4, accepted=2)  # 3 tokens for 2 decode steps: good
    for _ in range(2):  # two rounds kept whole: 4, 8 and then 16 drafts
        draft = proposer.propose(key, reader(tokens), len(tokens), limit=64)
        proposer.feedback(key, drafted=len(draft), accepted=len(draft))
    assert len(proposer.propose(key, reader(tokens), len(tokens), limit=64)) == 16
    proposer.feedback(key, drafted=16, accepted=2)  # 3 tokens for 4 decode steps: poor
    assert proposer.propose(key, reader(tokens), len(tokens), limit=64) == []  # paused a step
    assert len(proposer.propose(key, reader(tokens), len(tokens), limit=64)) == 4


def test_a_request_whose_drafts_fail_waits_longer_each_time():
    """Full rejections pause a request's drafts, longer each time until a round keeps some."""
    proposer, key, tokens = NgramProposer(num_draft_tokens=2), ("a", 0), [1, 2, 3, 1, 2]
    assert proposer.propose(key, reader(tokens), 5, limit=8) == [3, 1]
    proposer.feedback(key, drafted=2, accepted=0)
    assert proposer.propose(key, reader(tokens), 5, limit=8) == []  # cooling down: one step
    assert proposer.propose(key, reader(tokens), 5, limit=8) == [3, 1]
    proposer.feedback(key, drafted=2, accepted=0)
    assert [proposer.propose(key, reader(tokens), 5, limit=8) for _ in range(3)] == [[], [], [3, 1]]
    proposer.feedback(key, drafted=2, accepted=2)  # a good round resets the backoff
    proposer.feedback(key, drafted=2, accepted=0)
    assert [proposer.propose(key, reader(tokens), 5, limit=8) for _ in range(2)] == [[], [3, 1]]
    proposer.feedback(key, drafted=2, accepted=1)  # one kept: a step that made two tokens (untimed: it paid)
    assert proposer.propose(key, reader(tokens), 5, limit=8) == [3, 1]


def test_drafts_pause_while_a_verify_step_costs_more_decode_steps_than_it_makes_tokens(monkeypatch):
    """The measured cost of a step with drafts over a plain one (running averages, per number of sequences and
    tokens) is the bar a round's tokens (its accepted drafts and the one after them) must clear; the longest pause
    grows with it, and where even all drafts kept would not clear it, drafts come only as a rare probe."""
    monkeypatch.undo()  # the real record_step
    from hyla.serve.speculative import MAX_COOLDOWN, STEP_EMA

    proposer, key, tokens = NgramProposer(num_draft_tokens=4), ("a", 0), [1, 2, 3, 4, 5, 6, 1, 2]
    assert proposer.verify_cost(1, 5) == 1.0  # nothing timed yet
    proposer.record_step(1, num_tokens=1, seconds=0.002)
    assert proposer.verify_cost(1, 5) == 1.0  # no verify step timed yet
    proposer.record_step(1, num_tokens=5, seconds=0.006)
    assert proposer.verify_cost(1, 5) == pytest.approx(3.0)
    assert proposer.verify_cost(2, 6) == 1.0  # another batch size: its own steps
    assert proposer.verify_cost(1, 3) == 1.0  # and another number of drafts
    proposer.record_step(1, num_tokens=5, seconds=0.016)
    assert proposer.verify_cost(1, 5) == pytest.approx((0.006 + STEP_EMA * 0.010) / 0.002)  # 4
    assert proposer.propose(key, reader(tokens), 8, limit=8) == [3, 4, 5, 6]
    proposer.feedback(key, drafted=4, accepted=2)  # 3 tokens for a step that cost 4 decode steps: poor
    assert proposer.propose(key, reader(tokens), 8, limit=8) == []
    assert proposer.propose(key, reader(tokens), 8, limit=8) == [3, 4, 5, 6]
    proposer.feedback(key, drafted=4, accepted=3)  # 4 tokens: good
    assert proposer.propose(key, reader(tokens), 8, limit=8) == [3, 4, 5, 6]
    for _ in range(12):  # poor rounds in a row: the pause doubles up to MAX_COOLDOWN times the cost
        proposer.feedback(key, drafted=4, accepted=0)

    def pause() -> int:
        n = 0
        while not proposer.propose(key, reader(tokens), 8, limit=8):
            n += 1
        return n

    assert pause() == round(MAX_COOLDOWN * proposer.verify_cost(1, 5))
    proposer.feedback(key, drafted=4, accepted=4)
    proposer.record_step(1, num_tokens=5, seconds=0.068)  # a verify step now costs 10 decode steps: 5 tokens can't pay
    assert proposer.verify_cost(1, 5) == pytest.approx(10.0)
    assert pause() == math.ceil(MAX_COOLDOWN * proposer.verify_cost(1, 5)) - 1  # withheld, then one probe
    assert proposer.propose(("b", 0), reader(tokens), 8, limit=8) == []  # every request: the engine's steps cost it


def test_the_engine_times_its_decode_steps_for_the_proposer(monkeypatch):
    """Decode steps (no prompt chunk) report their sequences, their tokens (drafts included), and a duration."""
    steps = []
    monkeypatch.setattr(
        NgramProposer, "record_step", lambda self, n, tokens, seconds: steps.append((n, tokens > n, seconds))
    )
    torch.manual_seed(3)
    spec, _ = engines(random_model(layer_types=PATTERNS["alternating"], vocab_size=VOCAB + 4))
    spec.generate(repetitive_prompts(seed=3)[:1], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    assert {(n, drafted) for n, drafted, _ in steps} == {(1, False), (1, True)}
    assert all(seconds > 0 for *_, seconds in steps)
    # Every decode step, and only those: 20 tokens = the prefill step's + each decode step's 1 + accepted drafts.
    assert len(steps) == 19 - spec.engine.stats.accepted_tokens


def repetitive_prompts(seed: int, lengths=(24, 9, 40, 3)) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    motif = torch.randint(0, VOCAB, (5,), generator=g).tolist()
    noise = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]
    return [(motif + x)[: max(n, 2)] * 2 + x[:3] for x, n in zip(noise, lengths, strict=True)]


def engines(model, **config):
    defaults = dict(max_num_seqs=3, max_num_batched_tokens=64, block_size=4, max_model_len=120)
    tokenizer = byte_tokenizer(VOCAB)
    spec = LLM(model, tokenizer, EngineConfig(**{**defaults, "num_draft_tokens": 8, **config}, speculative="ngram"))
    plain = LLM(model, tokenizer, EngineConfig(**{**defaults, **config}))
    return spec, plain


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize(
    ("budget", "num_blocks", "caching"),
    [(64, None, True), (6, None, False), (16, 30, True)],  # one chunk; tiny chunks; preemption and the cache
)
def test_greedy_outputs_equal_a_full_forward_and_speculation_off(pattern, budget, num_blocks, caching):
    torch.manual_seed(0)
    model = random_model(layer_types=PATTERNS[pattern], vocab_size=VOCAB + 4).double()
    spec, plain = engines(model, max_num_batched_tokens=budget, num_blocks=num_blocks,
                          enable_prefix_caching=caching)  # fmt: skip
    prompts = repetitive_prompts(seed=budget)
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    for _ in range(2):  # the second time, prompts resume from cached prefixes
        got = [c[0].token_ids for c in spec.generate(prompts, params)]
        assert got == [c[0].token_ids for c in plain.generate(prompts, params)]
        assert got == [full_forward_greedy(model, p, 30, vocab=VOCAB) for p in prompts]
    stats = spec.engine.stats
    assert 0 < stats.accepted_tokens < stats.draft_tokens  # drafts were kept and rejected
    if num_blocks is not None:
        assert stats.preemptions > 0
    e = spec.engine
    assert e.cache.blocks.num_free == e.config.num_blocks and e.cache.slots.num_free == e.config.max_num_seqs


def test_without_the_cpp_kernels_verify_steps_take_the_packed_path_and_rewind_in_closed_form(monkeypatch):
    """Where the C++ decode kernel is absent (another device, no compiler), drafted decodes run through the packed
    prefill path and the rewind computes the states in closed form: the same greedy tokens as a full forward."""
    from hyla.ops.lightning import lightning_decode

    torch.manual_seed(3)
    model = random_model(layer_types=PATTERNS["alternating"], vocab_size=VOCAB + 4).double()
    spec, _ = engines(model)
    monkeypatch.setattr(spec.engine.runner, "lightning_decode", lightning_decode)
    prompts = repetitive_prompts(seed=6)
    got = [c[0].token_ids for c in spec.generate(prompts, SamplingParams(max_tokens=30, temperature=0,
                                                                          ignore_eos=True))]  # fmt: skip
    assert got == [full_forward_greedy(model, p, 30, vocab=VOCAB) for p in prompts]
    assert 0 < spec.engine.stats.accepted_tokens < spec.engine.stats.draft_tokens


@pytest.mark.slow
def test_compiled_verify_steps_equal_a_full_forward_without_recompiling(monkeypatch):
    """``compile=True`` with speculation: steps of decodes with drafts (one to three requests, some without drafts,
    requests arriving, finishing and preempted) run the verify graphs compiled at start, never recompiling; every
    greedy token equals a full forward's (float64), and the rewound states carry on exactly."""
    torch.manual_seed(4)
    model = random_model(layer_types=PATTERNS["alternating"], vocab_size=VOCAB + 4).double()
    spec, _ = engines(model, compile=True, num_blocks=40)
    runner = spec.engine.runner
    compiled, shapes = runner._compiled_verify, []

    def counted(ids, step, rows):
        shapes.append((len(step.slots), len(ids)))
        return compiled(ids, step, rows)

    monkeypatch.setattr(runner, "_compiled_verify", counted)
    prompts = repetitive_prompts(seed=7, lengths=(24, 9, 40, 3, 17))
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = [c[0].token_ids for c in spec.generate(prompts, SamplingParams(max_tokens=30, temperature=0,
                                                                              ignore_eos=True))]  # fmt: skip
    assert got == [full_forward_greedy(model, p, 30, vocab=VOCAB) for p in prompts]
    stats = spec.engine.stats
    assert 0 < stats.accepted_tokens < stats.draft_tokens and stats.preemptions > 0
    assert {b for b, _ in shapes} >= {1, 2, 3} and any(n > b + 1 for b, n in shapes)


@pytest.mark.slow
def test_compiled_float32_verify_steps_past_the_experts_kernels_size_do_not_recompile(monkeypatch):
    """A float32 model prepared for the CPU (experts through the gemv kernel up to COMPILED_GEMV_MAX_TOKENS tokens,
    the graph's products beyond): verify steps of more tokens than that, and of fewer, run graphs compiled at start;
    greedy outputs equal speculation off's (float32: the verify and decode steps sum in other orders, so a rare
    near tie could differ; none does on these prompts)."""
    from hyla.ops import gemv
    from hyla.ops.moe import COMPILED_GEMV_MAX_TOKENS

    if not gemv.available():
        pytest.skip("no C++ compiler: no compiled verify step")
    torch.manual_seed(5)
    model = random_model(layer_types=PATTERNS["alternating"], vocab_size=VOCAB + 4)
    spec, plain = engines(model, compile=True, max_num_seqs=8, max_num_batched_tokens=256)
    runner = spec.engine.runner
    compiled, tokens = runner._compiled_verify, []

    def counted(ids, step, rows):
        tokens.append(len(ids))
        return compiled(ids, step, rows)

    monkeypatch.setattr(runner, "_compiled_verify", counted)
    prompts = [p for seed in (8, 9) for p in repetitive_prompts(seed=seed)]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = [c[0].token_ids for c in spec.generate(prompts, params)]
    assert got == [c[0].token_ids for c in plain.generate(prompts, params)]
    assert max(tokens) > COMPILED_GEMV_MAX_TOKENS >= min(tokens)


def test_a_steps_drafts_fit_the_verify_size_and_outputs_stay_exact(monkeypatch):
    """With a verify size (the compiled graph's, under compile), a step of decodes holds at most that many tokens:
    each decode keeps its last token, the drafts share what is left; greedy outputs still equal a full forward."""
    torch.manual_seed(6)
    model = random_model(layer_types=PATTERNS["alternating"], vocab_size=VOCAB + 4).double()
    spec, _ = engines(model, max_num_seqs=4, num_draft_tokens=16)
    spec.engine.scheduler.verify_tokens = 9
    execute, sizes = spec.engine.runner.execute, []

    def counted(out):
        if any(s.draft for s in out.seqs) and all(s.num_tokens == 1 + len(s.draft) for s in out.seqs):
            sizes.append((len(out.seqs), sum(s.num_tokens for s in out.seqs)))  # a step of decodes with drafts
        return execute(out)

    monkeypatch.setattr(spec.engine.runner, "execute", counted)
    prompts = repetitive_prompts(seed=11)
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    got = [c[0].token_ids for c in spec.generate(prompts, params)]
    assert got == [full_forward_greedy(model, p, 30, vocab=VOCAB) for p in prompts]
    assert max(tokens for _, tokens in sizes) == 9  # drafts filled the room and never passed it
    assert any(seqs > 1 and tokens == 9 for seqs, tokens in sizes)  # shared between several decodes


def test_the_next_turn_resumes_from_a_snapshot_a_step_with_drafts_wrote(monkeypatch):
    """A step with drafts that crosses a block boundary past the prompt writes the request's end snapshot there
    when the drafts up to it were kept (replayed from the states before the step): the next turn (the transcript
    and more) resumes from the last boundary its first reply reached, and its greedy tokens equal a full forward."""
    from hyla.serve.runner import ModelRunner

    torch.manual_seed(7)
    model = random_model(layer_types=PATTERNS["alternating"], vocab_size=VOCAB + 4).double()
    spec, _ = engines(model, enable_prefix_caching=True, max_num_seqs=1)
    written = []
    rewind = ModelRunner.rewind

    def counted(self, accepted):
        written.extend(save for save in self._draft_saves if save[1] <= 1 + accepted[0])
        return rewind(self, accepted)

    monkeypatch.setattr(ModelRunner, "rewind", counted)
    prompt = repetitive_prompts(seed=12)[0]
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    reply = spec.generate([prompt], params)[0][0].token_ids
    assert written  # steps with drafts wrote end snapshots
    turn = prompt + reply + [1, 2, 3]
    before = spec.engine.stats.hit_tokens
    assert spec.generate([turn], params)[0][0].token_ids == full_forward_greedy(model, turn, 30, vocab=VOCAB)
    block = spec.engine.config.block_size
    assert spec.engine.stats.hit_tokens - before == (len(prompt) + len(reply) - 1) // block * block


def test_stop_strings_max_tokens_n_and_logprobs_are_those_of_speculation_off():
    torch.manual_seed(1)
    model = random_model(layer_types=PATTERNS["alternating"], vocab_size=VOCAB + 4).double()
    spec, plain = engines(model)
    prompts = repetitive_prompts(seed=5)
    texts = [c[0].text for c in plain.generate(prompts, SamplingParams(max_tokens=30, temperature=0,
                                                                        ignore_eos=True))]  # fmt: skip
    stops = [text[7:9] for text in texts]  # strings the greedy outputs reach part-way
    cases = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in (1, 2, 3, 5, 7)]
    cases += [SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=[s]) for s in stops]
    cases += [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, n=2, logprobs=2)]
    for params in cases:
        a, b = spec.generate(prompts, params), plain.generate(prompts, params)
        for x, y in zip(itertools.chain(*a), itertools.chain(*b), strict=True):
            assert (x.token_ids, x.text, x.finish_reason) == (y.token_ids, y.text, y.finish_reason)
            assert [t.token_id for t in x.logprobs] == [t.token_id for t in y.logprobs]
            assert [t.logprob for t in x.logprobs] == pytest.approx([t.logprob for t in y.logprobs], abs=1e-9)
    assert spec.engine.stats.accepted_tokens > 0


def test_sampled_outputs_follow_the_models_distribution():
    """Three sampled tokens after a prompt in which every pair (3, x) occurs, so that from the second token on
    each is verified against a draft: their joint frequencies over 3,000 sequences against the model's
    probabilities (a chi-square test)."""
    from scipy.stats import chisquare

    vocab, n = 5, 3000
    torch.manual_seed(2)
    model = random_model(layer_types=PATTERNS["alternating"], vocab_size=8)
    prompt = [3, 0, 3, 1, 3, 2, 3, 3, 3, 4, 3]  # the draft for t2 is always 3, which the model draws 13% of times

    def probs(*tokens: int) -> torch.Tensor:
        with torch.no_grad():
            return model(torch.tensor([[*prompt, *tokens]])).logits[0, -1, :vocab].double().softmax(-1)

    expected = torch.stack([probs()[a] * probs(a)[b] * probs(a, b) for a in range(vocab) for b in range(vocab)])
    expected = expected.flatten()  # [vocab^3]: P(t1, t2, t3)
    config = EngineConfig(max_num_seqs=32, max_model_len=32, speculative="ngram", num_draft_tokens=3)
    llm = LLM(model, byte_tokenizer(vocab), config)
    random.seed(7)  # each sequence draws its generator's seed from `random`: the test is deterministic
    outputs = llm.generate([prompt] * n, SamplingParams(max_tokens=3, temperature=1.0, ignore_eos=True))
    counts = torch.zeros(vocab**3, dtype=torch.float64)
    for (c,) in outputs:
        counts[(c.token_ids[0] * vocab + c.token_ids[1]) * vocab + c.token_ids[2]] += 1
    stats = llm.engine.stats
    assert stats.draft_tokens >= n and 0 < stats.accepted_tokens < stats.draft_tokens
    keep = expected * n >= 5  # cells too rare for the test are pooled into one
    observed = torch.cat((counts[keep], counts[~keep].sum()[None])).numpy()
    wanted = torch.cat((expected[keep], expected[~keep].sum()[None])).numpy() * n
    assert chisquare(observed, wanted).pvalue > 1e-3


def test_what_cannot_speculate_is_refused():
    with pytest.raises(ConfigError, match="speculative"):
        EngineConfig(speculative="draft").resolve(1024)
    with pytest.raises(ConfigError, match="num_draft_tokens"):
        EngineConfig(speculative="ngram", num_draft_tokens=0).resolve(1024)
    model = random_model(layer_types=PATTERNS["alternating"], lightning_qk_conv=2)
    with pytest.raises(ConfigError, match="does not rewind a lightning q/k convolution"):
        LLM(model, byte_tokenizer(VOCAB), EngineConfig(speculative="ngram"))
