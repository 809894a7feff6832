"""The offline API: ``LLM("runs/default").generate(["def f(x):"], params)``, batched on the serving engine."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from hyla.errors import ConfigError
from hyla.model import HylaForCausalLM
from hyla.ops.precision import DTYPES
from hyla.serve.engine import EngineConfig, LLMEngine
from hyla.serve.outputs import RequestOutput, TokenLogprob
from hyla.serve.sampling import SamplingParams


@dataclass
class Completion:
    """A finished sequence of :meth:`LLM.generate`."""

    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[TokenLogprob]


class LLM:
    """Offline batched generation: ``LLM("runs/default").generate(["def f(x):"], params)`` (a model directory or a
    ``hyla train`` run directory, whose tokenizer it loads; or a model object and its tokenizer). ``dtype`` is a
    ``torch.dtype`` or its name (``"float32"``, ``"bfloat16"``, ...)."""

    def __init__(
        self,
        model: str | Path | HylaForCausalLM,
        tokenizer: Tokenizer | None = None,
        config: EngineConfig | None = None,
        dtype: torch.dtype | str = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise ConfigError(f"dtype must be one of {sorted(DTYPES)} or a torch.dtype, got {dtype!r}")
            dtype = DTYPES[dtype]
        if not isinstance(model, HylaForCausalLM):
            from hyla.checkpoint import load_pretrained

            loaded = load_pretrained(model, dtype=dtype, device=device)
            model, tokenizer = loaded.model, tokenizer or loaded.tokenizer
        if tokenizer is None:
            raise ConfigError("LLM(model) of a model object needs its tokenizer: LLM(model, tokenizer)")
        self.engine = LLMEngine(model, tokenizer, config)
        self._next_id = 0

    def stream(self, prompts: list[str | list[int]], params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Run ``prompts`` together; yield each sequence's deltas as steps produce them."""
        params = params or SamplingParams()
        for prompt in prompts:
            self.engine.add_request(str(self._next_id), [self.engine.inputs.encode(prompt)], params)
            self._next_id += 1
        while self.engine.has_work():
            yield from self.engine.step()

    def generate(self, prompts: list[str | list[int]], params: SamplingParams | None = None) -> list[list[Completion]]:
        """The ``n`` completions of each prompt, in the prompts' order."""
        first = self._next_id
        results: dict[tuple[int, int], Completion] = {}
        for out in self.stream(prompts, params):
            key = (int(out.request_id) - first, out.index)
            done = results.setdefault(key, Completion("", [], "", []))
            done.text += out.text
            done.token_ids += out.token_ids
            done.logprobs += out.logprobs
            done.finish_reason = out.finish_reason or ""
        n = (params or SamplingParams()).n
        return [[results[(i, j)] for j in range(n)] for i in range(len(prompts))]
