"""Sampling parameters, validated in one place, and the batched sampler that applies them.

The sampler turns a step's ``[N, vocab]`` logits into one token per request: minimum-length masking of stop
tokens, repetition / presence / frequency penalties, then greedy (``temperature == 0``) or temperature,
top-k, top-p and min-p filtering and a draw from each request's own generator (so a seed fixes the output
whatever else shares the batch). Logprobs are those of the model's distribution, before any processing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from hyla.errors import RequestError, check_fields

# Temperatures below this sample greedily (as vLLM's); a smaller one would make float32 logits / temperature inf.
GREEDY_BELOW = 1e-5
# A repetition penalty divides or multiplies logits by itself: a tiny one underflows float32 to 0 (then NaN).
MIN_REPETITION_PENALTY = 0.01


@dataclass
class SamplingParams:
    """How to continue one prompt. Defaults follow OpenAI's completions API (``max_tokens=16``).

    ``temperature`` below :data:`GREEDY_BELOW` (0 among them) is greedy. ``top_k = 0`` and ``top_p = 1`` disable
    those filters; ``min_p`` keeps tokens at least ``min_p`` times as
    likely as the most likely one. Penalties: ``repetition_penalty`` divides the positive logits (multiplies
    the negative ones) of tokens seen in the prompt or output; ``presence_penalty`` and ``frequency_penalty``
    subtract a constant, and a multiple of the count, from the logits of tokens in the output.
    ``logprobs = k`` returns the chosen token's logprob and the ``k`` most likely alternatives. ``logit_bias``
    adds a value in [-100, 100] to the logits of the ids given, after the penalties (as OpenAI's).
    """

    max_tokens: int | None = 16  # None: up to the model's context
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    n: int = 1
    logprobs: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            ("max_tokens", self.max_tokens is None or self.max_tokens >= 1, "must be at least 1"),
            ("temperature", 0 <= self.temperature <= 100, "must be in [0, 100]"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("top_k", self.top_k >= 0, "must be >= 0 (0 disables it)"),
            ("min_p", 0 <= self.min_p <= 1, "must be in [0, 1]"),
            (
                "repetition_penalty",
                MIN_REPETITION_PENALTY <= self.repetition_penalty <= 10,
                f"must be in [{MIN_REPETITION_PENALTY}, 10]",
            ),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "must be in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "must be in [-2, 2]"),
            ("min_tokens", self.min_tokens >= 0, "must be >= 0"),
            ("min_tokens", self.max_tokens is None or self.min_tokens <= self.max_tokens, "must be <= max_tokens"),
            ("n", 1 <= self.n <= 128, "must be in [1, 128]"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= 20, "must be in [0, 20]"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must be non-empty strings"),
            ("stop", len(self.stop) <= 16, "takes at most 16 strings"),
            ("stop_token_ids", all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "must be ids >= 0"),
            ("seed", self.seed is None or 0 <= self.seed < 2**63, "must be in [0, 2^63)"),
            ("logit_bias", all(isinstance(t, int) and t >= 0 for t in self.logit_bias), "keys must be ids >= 0"),
            ("logit_bias", all(-100 <= b <= 100 for b in self.logit_bias.values()), "values must be in [-100, 100]"),
            ("logit_bias", len(self.logit_bias) <= 1024, "takes at most 1024 tokens"),
        ]
        check_fields(self, checks, RequestError)

    @property
    def greedy(self) -> bool:
        """Temperatures below :data:`GREEDY_BELOW` are greedy: dividing float32 logits by them overflows."""
        return self.temperature < GREEDY_BELOW

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


@dataclass
class SampleInput:
    """One row of the sampler's batch: a request's parameters, history and random generator."""

    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]
    generator: torch.Generator
    stop_ids: list[int]  # the token ids that end the request (EOS unless ignored, and stop_token_ids)


@dataclass
class Sampled:
    """``tokens`` ``[N]``; ``logprobs`` ``[N]`` of the chosen tokens; ``top`` ``(values, ids)`` ``[N, k]``."""

    tokens: Tensor
    logprobs: Tensor
    top: tuple[Tensor, Tensor]


def sample(logits: Tensor, rows: list[SampleInput]) -> Sampled:
    """One token for each of the ``N`` rows of ``[N, vocab]`` logits."""
    logits = logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)
    logits = logits.clone()
    _mask_early_stops(logits, rows)
    _apply_penalties(logits, rows)
    for i, r in enumerate(rows):
        if r.params.logit_bias:
            ids = torch.tensor(list(r.params.logit_bias), device=logits.device)
            logits[i, ids] += torch.tensor(list(r.params.logit_bias.values()), device=logits.device)
    tokens = logits.argmax(dim=-1)
    sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
    if sampled:
        index = torch.tensor(sampled, device=logits.device)
        probs = _filtered_probs(logits[index], [rows[i].params for i in sampled])
        # A draw per row from the row's own generator: argmax(p / Exp(1)) is a sample from p.
        noise = torch.stack([torch.empty_like(probs[0]).exponential_(generator=rows[i].generator) for i in sampled])
        tokens[index] = probs.div_(noise).argmax(dim=-1)
    k = max((r.params.logprobs or 0) for r in rows)
    top = torch.topk(logprobs, k, dim=-1) if k else (logprobs[:, :0], tokens[:, None][:, :0])
    return Sampled(tokens, logprobs.gather(1, tokens[:, None]).squeeze(1), (top[0], top[1]))


def _mask_early_stops(logits: Tensor, rows: list[SampleInput]) -> None:
    """Before ``min_tokens`` outputs, no stop token may be drawn."""
    for i, r in enumerate(rows):
        if len(r.output_ids) < r.params.min_tokens and r.stop_ids:
            logits[i, [t for t in r.stop_ids if t < logits.shape[-1]]] = float("-inf")


def _apply_penalties(logits: Tensor, rows: list[SampleInput]) -> None:
    penalized = [i for i, r in enumerate(rows) if r.params.penalized]
    if not penalized:
        return
    index = torch.tensor(penalized, device=logits.device)
    vocab = logits.shape[-1]
    rows_ = [rows[i] for i in penalized]
    counts = _counts([r.output_ids for r in rows_], vocab, logits.device)  # [P, V]
    seen = (counts + _counts([r.prompt_ids for r in rows_], vocab, logits.device)) > 0
    x = logits[index]
    params = [r.params for r in rows_]
    repetition = _column(params, "repetition_penalty", x)
    x = torch.where(seen, torch.where(x > 0, x / repetition, x * repetition), x)
    x -= _column(params, "frequency_penalty", x) * counts + _column(params, "presence_penalty", x) * (counts > 0)
    logits[index] = x


def _counts(ids: list[list[int]], vocab: int, device: torch.device) -> Tensor:
    """``[N, vocab]`` float occurrences of each id in each row."""
    counts = torch.zeros(len(ids), vocab, device=device)
    for i, row in enumerate(ids):
        if row:
            counts[i].index_add_(
                0, torch.tensor(row, device=device).clamp_(max=vocab - 1), torch.ones(len(row), device=device)
            )
    return counts


def _filtered_probs(logits: Tensor, params: list[SamplingParams]) -> Tensor:
    """``[N, V]`` probabilities after temperature, top-k, top-p and min-p (at least one token survives)."""
    device = logits.device
    logits = logits / _column(params, "temperature", logits)
    vocab = logits.shape[-1]
    top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=device)
    ordered, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=device)[None]
    drop = ranks >= top_k[:, None]
    probs = torch.softmax(ordered.masked_fill(drop, float("-inf")), dim=-1)
    # top-p: drop a token once the more likely ones already cover top_p (the first always stays).
    drop |= (probs.cumsum(-1) - probs) >= _column(params, "top_p", probs)
    drop |= probs < _column(params, "min_p", probs) * probs[:, :1]
    drop[:, 0] = False
    probs = torch.softmax(ordered.masked_fill(drop, float("-inf")), dim=-1)
    return torch.empty_like(probs).scatter_(1, order, probs)


def _column(params: list[SamplingParams], name: str, like: Tensor) -> Tensor:
    """``[N, 1]``: each row's parameter ``name``, in ``like``'s dtype and device."""
    return torch.tensor([getattr(p, name) for p in params], dtype=like.dtype, device=like.device)[:, None]
