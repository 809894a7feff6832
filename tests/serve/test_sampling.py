"""The sampler: each parameter's effect, seeded draws, and the distribution it samples from."""

import math

import pytest
import torch

from hyla.serve.sampling import RequestError, SampleInput, SamplingParams, sample

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])


def row(params: SamplingParams, seed: int = 0, output=(), prompt=(), stop_ids=()) -> SampleInput:
    return SampleInput(params, list(prompt), list(output), torch.Generator().manual_seed(seed), list(stop_ids))


def frequencies(params: SamplingParams, logits: torch.Tensor, draws: int = 4000) -> torch.Tensor:
    rows = [row(params, seed=i) for i in range(draws)]
    tokens = sample(logits.expand(draws, -1), rows).tokens
    return torch.bincount(tokens, minlength=logits.shape[-1]).double() / draws


@pytest.mark.parametrize(
    ("field", "value"),
    [("temperature", -0.1), ("top_p", 0.0), ("top_k", -1), ("min_p", 1.5), ("max_tokens", 0), ("n", 0),
     ("presence_penalty", 3.0), ("frequency_penalty", -2.5), ("repetition_penalty", 0.0),
     ("repetition_penalty", 1e-300), ("logprobs", 21), ("min_tokens", -1),
     ("stop", [""]), ("seed", -1), ("stop_token_ids", [-3])],
)  # fmt: skip
def test_invalid_parameters_are_named(field, value):
    with pytest.raises(RequestError) as error:
        SamplingParams(**{field: value})
    assert error.value.param == field


def test_min_tokens_cannot_exceed_max_tokens():
    with pytest.raises(RequestError, match="min_tokens"):
        SamplingParams(max_tokens=4, min_tokens=5)


def test_greedy_and_degenerate_filters_take_the_argmax():
    logits = torch.randn(6, 50)
    expected = logits.argmax(-1)
    for params in (
        SamplingParams(temperature=0),
        SamplingParams(top_k=1),
        SamplingParams(top_p=1e-6),
        SamplingParams(min_p=1.0),
    ):
        tokens = sample(logits, [row(params, seed=i) for i in range(6)]).tokens
        assert torch.equal(tokens, expected), params


def test_samples_follow_the_softmax_distribution():
    freq = frequencies(SamplingParams(), PROBS.log())
    assert (freq - PROBS.double()).abs().max() < 0.03
    hot = frequencies(SamplingParams(temperature=2.0), PROBS.log())
    expected = PROBS.sqrt() / PROBS.sqrt().sum()  # temperature 2 takes the square root of the probabilities
    assert (hot - expected.double()).abs().max() < 0.03


@pytest.mark.parametrize(
    ("params", "kept"),
    [
        (SamplingParams(top_k=2), [0, 1]),
        (SamplingParams(top_p=0.7), [0, 1]),  # 0.5 < 0.7, then 0.5 + 0.3 covers it
        (SamplingParams(top_p=0.85), [0, 1, 2]),
        (SamplingParams(min_p=0.5), [0, 1]),  # at least half as likely as 0.5
        (SamplingParams(min_p=0.2), [0, 1, 2]),
    ],
)
def test_filters_keep_the_right_tokens_renormalised(params, kept):
    freq = frequencies(params, PROBS.log())
    expected = torch.zeros(4, dtype=torch.float64)
    expected[kept] = PROBS[kept].double() / PROBS[kept].sum()
    assert (freq - expected).abs().max() < 0.03
    assert freq[[i for i in range(4) if i not in kept]].sum() == 0


def test_a_seed_fixes_the_draw_whatever_shares_the_batch():
    logits = torch.randn(5, 100)
    params = SamplingParams(temperature=1.0, seed=7)
    alone = sample(logits[2:3], [row(params, seed=7)]).tokens
    together = sample(logits, [row(params, seed=s) for s in (1, 2, 7, 3, 4)]).tokens
    assert together[2] == alone[0]
    draws = {int(sample(logits[2:3], [row(params, seed=s)]).tokens) for s in range(30)}
    assert len(draws) > 1  # other seeds give other tokens


def test_penalties_shift_logits_by_their_documented_amounts():
    logits = torch.tensor([[2.0, 1.9, -1.0, -1.05]])

    def greedy(**kw) -> int:
        output, prompt = kw.pop("output", []), kw.pop("prompt", [])
        return int(sample(logits, [row(SamplingParams(temperature=0, **kw), output=output, prompt=prompt)]).tokens)

    assert greedy() == 0
    assert greedy(presence_penalty=0.2, output=[0]) == 1  # 2.0 - 0.2 < 1.9
    assert greedy(presence_penalty=0.05, output=[0]) == 0
    assert greedy(frequency_penalty=0.04, output=[0, 0, 0]) == 1  # 2.0 - 3 * 0.04 < 1.9
    assert greedy(frequency_penalty=0.04, output=[0, 0]) == 0
    assert greedy(repetition_penalty=1.1, prompt=[0]) == 1  # 2.0 / 1.1 < 1.9: the prompt counts too
    # A negative logit is multiplied: -1.0 * 1.2 < -1.05, so token 3 overtakes token 2 once 0 and 1 are out.
    masked = logits.clone()
    masked[0, :2] = -10
    args = dict(temperature=0, repetition_penalty=1.2)
    assert int(sample(masked, [row(SamplingParams(**args), output=[2])]).tokens) == 3


def test_min_tokens_holds_back_stop_tokens():
    logits = torch.tensor([[5.0, 1.0, 0.0]])
    early = row(SamplingParams(temperature=0, min_tokens=2), output=[1], stop_ids=[0])
    late = row(SamplingParams(temperature=0, min_tokens=2), output=[1, 1], stop_ids=[0])
    assert sample(logits, [early]).tokens.item() == 1
    assert sample(logits, [late]).tokens.item() == 0


def test_logprobs_are_the_models_before_processing():
    logits = torch.randn(3, 20)
    params = [SamplingParams(temperature=0.5, top_k=3, logprobs=4), SamplingParams(temperature=0), SamplingParams()]
    out = sample(logits, [row(p, seed=i) for i, p in enumerate(params)])
    reference = torch.log_softmax(logits, -1)
    assert torch.allclose(out.logprobs, reference.gather(1, out.tokens[:, None]).squeeze(1))
    values, ids = out.top
    assert values.shape == (3, 4)
    assert torch.allclose(values[0], reference[0].sort(descending=True).values[:4])
    assert math.isclose(float(values[0].exp().sum()), float(reference[0].exp().sort().values[-4:].sum()), rel_tol=1e-6)
    assert ids[0, 0] == logits[0].argmax()


@pytest.mark.parametrize("temperature", [1e-39, 1e-30, 9e-6])
def test_a_tiny_temperature_is_greedy_not_nan(temperature):
    """Dividing float32 logits by 1e-39 gives inf and NaN probabilities, which drew token 0."""
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.6, 0.1]])).expand(16, -1)
    rows = [row(SamplingParams(temperature=temperature), seed=i) for i in range(16)]
    assert sample(logits, rows).tokens.tolist() == [2] * 16


def test_logit_bias_shifts_the_distribution_it_samples_from():
    logits = torch.log(PROBS)[None]
    bias = {3: 2.0, 0: -1.0}
    shifted = logits.clone()
    shifted[0, 3] += 2.0
    shifted[0, 0] -= 1.0
    expected = torch.softmax(shifted[0].double(), -1)
    assert torch.allclose(frequencies(SamplingParams(logit_bias=bias), logits), expected, atol=0.03)
    assert sample(logits, [row(SamplingParams(temperature=0, logit_bias={2: 100.0}))]).tokens.tolist() == [2]
    with pytest.raises(RequestError, match=r"values must be in \[-100, 100\]"):
        SamplingParams(logit_bias={1: 101.0})
