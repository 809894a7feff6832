"""Held-out loss by token position: does more context keep helping?

Each document is read from its start, up to ``context`` tokens; the next-token loss at position ``t`` (predicting
token ``t + 1`` from the ``t + 1`` before it) is averaged over every document that reaches it, then over
log-spaced position buckets ``[1, 2), [2, 4), ... ``. A model that uses long context keeps lowering the loss
in the late buckets; one that forgets flattens out. The documents are packed, several per forward, with
``cu_seqlens`` (no document sees another).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from hyla.data.corpus import Source, documents
from hyla.data.packing import pack_greedy
from hyla.data.shards import is_eval
from hyla.errors import DataError
from hyla.model import HylaForCausalLM


@dataclass
class PositionLoss:
    """``sums[t]`` / ``counts[t]``: the mean loss at position ``t`` (0-based) over the documents reaching it."""

    sums: list[float]
    counts: list[int]
    documents: int
    split: str

    def buckets(self) -> list[tuple[int, int, float, int]]:
        """``(first, last, mean loss, tokens)`` per log2 bucket of positions ``first..last`` (1-based)."""
        out, first = [], 1
        while first <= len(self.sums):
            last = min(2 * first - 1, len(self.sums))
            s, n = sum(self.sums[first - 1 : last]), sum(self.counts[first - 1 : last])
            if n:
                out.append((first, last, s / n, n))
            first *= 2
        return out

    def table(self) -> str:
        lines = ["| positions | mean loss (nats) | tokens |", "|---|---|---|"]
        lines += [f"| {a}-{b} | {loss:.3f} | {n} |" for a, b, loss, n in self.buckets()]
        return "\n".join(lines)

    def to_json(self) -> dict:
        rows = [{"first": a, "last": b, "loss": loss, "tokens": n} for a, b, loss, n in self.buckets()]
        return {"task": "loss", "documents": self.documents, "split": self.split, "buckets": rows}


def document_ids(
    sources: list[Source], tokenizer: Tokenizer, held_out: float | None, limit: int, context: int
) -> tuple[list[list[int]], str]:
    """Up to ``limit`` documents as token ids, each cut to ``context + 1`` tokens; with ``held_out`` (a run's
    eval fraction) only the documents that run held out. Returns the ids and the split's name."""
    texts = (text for source in sources for index, text in enumerate(documents(source))
             if held_out is None or is_eval(source, index, held_out))  # fmt: skip
    ids = [e.ids[: context + 1] for e in tokenizer.encode_batch(list(itertools.islice(texts, limit)))]
    ids = [x for x in ids if len(x) > 1]
    if not ids:
        where = " among the run's held-out documents (--all reads every document)" if held_out is not None else ""
        raise DataError(f"no document of two tokens or more in the data{where}")
    return ids, "held-out" if held_out is not None else "all"


@torch.inference_mode()
def loss_by_position(model: HylaForCausalLM, docs: list[list[int]], split: str, tokens_per_batch: int = 8192):
    """:class:`PositionLoss` of ``model`` over ``docs`` (token ids), packed ``tokens_per_batch`` at a time."""
    length = max(len(d) for d in docs) - 1
    sums, counts = torch.zeros(length, dtype=torch.float64), torch.zeros(length, dtype=torch.long)
    device = next(model.parameters()).device
    for tokens, cu_seqlens, _ in pack_greedy((np.asarray(d) for d in docs), tokens_per_batch):
        ids = tokens[0].to(device)
        logits = model(ids[None], cu_seqlens=cu_seqlens.to(device)).logits[0].float()  # [ΣT, V]
        for start, end in itertools.pairwise(cu_seqlens.tolist()):
            n = end - start - 1
            nll = F.cross_entropy(logits[start : end - 1], ids[start + 1 : end], reduction="none")
            sums[:n] += nll.double().cpu()
            counts[:n] += 1
    return PositionLoss(sums.tolist(), counts.tolist(), len(docs), split)
