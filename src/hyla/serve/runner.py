"""The runner executes a scheduled step: one forward over every request's new tokens, packed in one row."""

from __future__ import annotations

import torch
from torch import Tensor

from hyla.model import HylaForCausalLM
from hyla.serve.cache import EngineCache, ScheduledSeq, StepCache


class ModelRunner:
    def __init__(self, model: HylaForCausalLM, cache: EngineCache, vocab_limit: int) -> None:
        self.model = model
        self.cache = cache
        self.vocab_limit = vocab_limit  # logits at or past it (padding past the tokenizer's ids) are dropped
        self.device = next(model.parameters()).device

    @torch.inference_mode()
    def execute(self, seqs: list[ScheduledSeq], input_ids: list[int], logits_rows: list[int]) -> Tensor:
        """Run ``input_ids`` (every sequence's new tokens, decodes first, concatenated) through the model.

        Returns the ``[len(logits_rows), vocab_limit]`` float32 logits of the last new token of the sequences
        ``logits_rows``: those whose next token is to be sampled.
        """
        step = StepCache(self.cache, seqs, self.device)
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)[None]  # [1, ΣT]
        hidden, _ = self.model.model(ids, step)  # [1, ΣT, hidden]
        ends = torch.tensor([s.num_tokens for s in seqs], device=self.device).cumsum(0) - 1
        rows = ends[torch.tensor(logits_rows, dtype=torch.long, device=self.device)]
        return self.model.lm_head(hidden[0, rows])[:, : self.vocab_limit].float()
