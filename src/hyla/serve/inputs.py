"""The input processor: prompts (text or ids) and sampling parameters in, checked sequences out. Every check a
request's inputs need happens here, once, before anything is queued; errors are :class:`RequestError` naming
the parameter (a 400 from the HTTP API)."""

from __future__ import annotations

import random
import time

import torch
from tokenizers import Tokenizer, pre_tokenizers

from hyla.errors import RequestError
from hyla.serve.sampling import SamplingParams
from hyla.serve.scheduler import Request


class InputProcessor:
    """Encodes and checks requests against a model's vocabulary (``vocab_size`` ids) and context
    (``max_model_len`` tokens); ``eos_token_id`` ends sequences unless ``ignore_eos``."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, max_model_len: int, eos_token_id: int | None) -> None:
        self.tokenizer, self.vocab_size, self.max_model_len = tokenizer, vocab_size, max_model_len
        self.eos_token_id = eos_token_id
        self._max_token_bytes = _max_token_bytes(tokenizer)

    def encode(self, prompt: str | list[int], param: str = "prompt") -> list[int]:
        """Token ids of a prompt, text or ids, checked against the vocabulary and the context; errors name
        ``param``.

        A text known to be over the context (more bytes than its longest possible tokenization covers) is
        refused without being tokenized; a text that is not valid Unicode (a lone surrogate, which JSON can
        carry) is refused before the tokenizer sees it."""
        context = self.max_model_len
        if isinstance(prompt, str):
            if not prompt.isascii():
                try:
                    prompt.encode()
                except UnicodeEncodeError as e:
                    raise RequestError(param, f"the text is not valid Unicode: {e.reason} at character "
                                       f"{e.start}") from None  # fmt: skip
            if self._max_token_bytes and len(prompt) > self._max_token_bytes * context:  # chars <= UTF-8 bytes
                num_bytes = len(prompt.encode())
                if num_bytes > self._max_token_bytes * context:
                    raise RequestError(
                        param,
                        f"the prompt is {num_bytes:,} bytes: at least {-(-num_bytes // self._max_token_bytes):,} "
                        f"tokens, past this model's context of {context} tokens",
                    )
            ids = self.tokenizer.encode(prompt).ids
        else:
            ids = list(prompt)
        if not ids:
            raise RequestError(param, "the prompt is empty")
        if len(ids) >= context:
            raise RequestError(
                param,
                f"the prompt is {len(ids)} tokens; this model's context is {context} tokens, "
                "including at least one to generate",
            )
        if any(not isinstance(t, int) or not 0 <= t < self.vocab_size for t in ids):
            raise RequestError(param, f"token ids must be in [0, {self.vocab_size})")
        return ids

    def check(self, prompts: list[list[int]], params: SamplingParams) -> list[int]:
        """The most tokens each prompt's sequences may generate; :class:`RequestError` for parameters this model
        cannot take: ``max_tokens`` past the context, token ids (stop tokens, logit bias) outside the
        vocabulary."""
        for name, ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", list(params.logit_bias))):
            bad = [t for t in ids if t >= self.vocab_size]
            if bad:
                raise RequestError(name, f"{bad[:8]} are not token ids of this model (ids are < {self.vocab_size})")
        limits = []
        for prompt_ids in prompts:
            room = self.max_model_len - len(prompt_ids)
            if params.max_tokens is not None and params.max_tokens > room:
                raise RequestError(
                    "max_tokens",
                    f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds this "
                    f"model's context of {self.max_model_len} tokens",
                )
            limits.append(params.max_tokens or room)
        return limits

    def sequences(
        self,
        request_id: str,
        prompts: list[list[int]],
        params: SamplingParams,
        limits: list[int],
        device: torch.device,
    ) -> list[Request]:
        """``n`` sequences for each prompt (checked: ``limits`` from :meth:`check`); sequence ``i * n + j`` is
        prompt ``i``'s ``j``-th, with its own random generator (``seed + j``, or a random seed)."""
        stops = set(params.stop_token_ids) | ({self.eos_token_id} if not params.ignore_eos else set())
        stop_ids = sorted(t for t in stops if t is not None)
        now = time.monotonic()
        out = []
        for i, (ids, max_tokens) in enumerate(zip(prompts, limits, strict=True)):
            for j in range(params.n):
                seed = params.seed + j if params.seed is not None else random.getrandbits(62)
                generator = torch.Generator(device=device).manual_seed(seed)
                out.append(Request(request_id, i * params.n + j, ids, params, max_tokens, stop_ids, generator, now))
        return out


def _max_token_bytes(tokenizer: Tokenizer) -> int:
    """An upper bound on the UTF-8 bytes of text one token covers, or 0 when none is known.

    Known for byte-level BPE without a normalizer (hyla's own tokenizers, GPT-2's): every byte of the text is
    in some token, spelled as one or two bytes of the token's string. Elsewhere a normalizer, an unknown-token
    id or dropped characters can make a long text a few tokens, and only the body-size limit applies."""
    if tokenizer.normalizer is not None or not isinstance(tokenizer.pre_tokenizer, pre_tokenizers.ByteLevel):
        return 0
    return max((len(t.encode()) for t in tokenizer.get_vocab(with_added_tokens=True)), default=0)
