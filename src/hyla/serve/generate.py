"""Single-batch generation on a :class:`~hyla.model.DecodeCache`: prefill once, then one token per step.

Lightning layers advance their constant-size state by one token per step (the recurrent kernel); softmax
layers attend over their cached keys and values. This is the per-request reference the batching engine is
tested against.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import torch
from torch import Tensor

from hyla.model import DecodeCache, HylaForCausalLM


def sample(logits: Tensor, temperature: float, top_k: int, generator: torch.Generator | None) -> Tensor:
    """Next tokens ``[B]`` from ``[B, vocab]`` logits: greedy at temperature 0, else top-k sampling."""
    if temperature < 0 or top_k < 0:
        raise ValueError(f"temperature and top_k must be >= 0, got {temperature} and {top_k}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(
    model: HylaForCausalLM,
    input_ids: Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int | None = None,
    eos_token_id: int | None = None,
    vocab_limit: int | None = None,
) -> Iterator[Tensor]:
    """Yield the next token of every sequence, ``[B]``, up to ``max_new_tokens`` times.

    Args:
        input_ids: ``[B, T]`` prompts of equal length (``T >= 1``).
        temperature: 0 for greedy decoding.
        eos_token_id: stop once every sequence has produced it.
        vocab_limit: never produce ids at or above it (a model vocabulary padded past its tokenizer's).
    """
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a non-empty [batch, seq_len] tensor, got {tuple(input_ids.shape)}")
    generator = None
    if seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(seed)
    cache = DecodeCache()
    step = functools.partial(model, cache=cache, logits_to_keep=1)
    logits = step(input_ids).logits[:, -1, :vocab_limit]
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        token = sample(logits, temperature, top_k, generator)
        yield token
        if eos_token_id is not None:
            finished |= token == eos_token_id
            if bool(finished.all()):
                return
        logits = step(token[:, None]).logits[:, -1, :vocab_limit]
