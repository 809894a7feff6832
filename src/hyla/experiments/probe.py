"""Mechanism probes of a model trained on MQAR: what each layer computes, not only whether the answer is right.

Recall by lookup (an induction circuit) takes two steps: a layer writes into each value's position *which key
precedes it* (a previous-token feature), and a later layer, at the query (the key asked again), attends to the
position whose previous-token feature matches the query and copies that position's token. Two probes test which
step a model has, on fresh MQAR contexts (``length`` tokens, ``pairs`` key-value pairs, the last token a key):

- **previous key, linearly decoded**: for the residual stream after the embedding and after each layer, a ridge
  classifier fitted on half the contexts predicts, at every value position of the pairs, the key before it; its
  accuracy on the other half (chance ``1 / keys``). A sharp previous-token feature decodes near 1.0.
- **softmax attention at the query**: for each softmax layer and head, the attention weight the query position
  gives the matching value (the successor of the earlier occurrence of the asked key: the lookup), the matching
  key itself, and the other values; and, at the value positions, the weight on the position just before
  (a previous-token head).

The probes read the model's own modules (the softmax layers' q/k projections and RoPE); they are analysis, not a
serving path.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from hyla.checkpoint import load_pretrained
from hyla.config import SOFTMAX
from hyla.data.synthetic import mqar_document
from hyla.model.attention import SoftmaxAttention
from hyla.ops.rope import apply_rope

RIDGE = 1e-2  # the ridge classifier's penalty, relative to the features' mean square


@dataclass
class LayerProbe:
    """One layer's probes (``layer`` -1: the embedding). Attention fields are per head, softmax layers only."""

    layer: int
    kind: str  # "embedding", "lightning" or "softmax"
    previous_key: float  # held-out accuracy of the linear probe for the key before each value (after this layer)
    to_value: list[float] | None = None  # per head: weight from the query to the matching value (the lookup)
    to_key: list[float] | None = None  # ... to the matching key itself
    to_other_values: list[float] | None = None  # ... to the other values, summed
    previous_token: list[float] | None = None  # at value positions: weight on the position before


@dataclass
class Probe:
    """The probes of one model on ``contexts`` MQAR contexts of ``length`` tokens and ``pairs`` pairs."""

    length: int
    pairs: int
    contexts: int
    chance: float
    layers: list[LayerProbe]

    def to_json(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        """Markdown: one row per layer; attention columns give the best head (max over heads) and the mean."""

        def heads(values: list[float] | None) -> str:
            return "-" if values is None else f"{max(values):.2f} ({sum(values) / len(values):.2f})"

        lines = ["| layer | kind | previous key decodable | query -> matching value | query -> matching key | "
                 "query -> other values | value -> previous token |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for p in self.layers:
            lines.append(f"| {p.layer} | {p.kind} | {p.previous_key:.2f} | {heads(p.to_value)} | {heads(p.to_key)} | "
                         f"{heads(p.to_other_values)} | {heads(p.previous_token)} |")  # fmt: skip
        return "\n".join(lines)


def _ridge_accuracy(x: Tensor, y: Tensor, classes: int, split: int) -> float:
    """Fit a ridge classifier (least squares to one-hot targets) on rows ``[:split]``; accuracy on the rest.

    ``x`` ``[N, hidden]`` features, ``y`` ``[N]`` class ids below ``classes``."""
    x = torch.cat((x, torch.ones(len(x), 1, dtype=x.dtype)), dim=1).double()
    train, test = slice(0, split), slice(split, None)
    targets = torch.nn.functional.one_hot(y[train], classes).double()
    gram = x[train].T @ x[train]
    penalty = RIDGE * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
    weights = torch.linalg.solve(gram + penalty, x[train].T @ targets)
    return (x[test] @ weights).argmax(1).eq(y[test]).double().mean().item()


@torch.no_grad()
def probe(
    run: str | Path,
    length: int = 64,
    pairs: int = 8,
    contexts: int = 256,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> Probe:
    """Both probes of the model in ``run`` (a run or model directory) on ``contexts`` fresh MQAR contexts of
    ``length`` tokens (the last one the query key) with ``pairs`` pairs, ids drawn as ``hyla eval mqar`` draws
    them (the word tokenizer's thirds), the model on ``device``."""
    pretrained = load_pretrained(run, dtype=torch.float32, device=device)
    model, tokenizer = pretrained.model.eval(), pretrained.tokenizer
    special = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    ids = [i for i in range(tokenizer.get_vocab_size()) if i not in special]
    third = len(ids) // 3
    rng = random.Random(seed)
    rows, asked = [], []
    for _ in range(contexts):
        context, kv = mqar_document(rng, ids, pairs, length - 1, queries=0)
        key = rng.choice(sorted(kv))
        rows.append([*context, key])
        asked.append(context.index(key))  # the key's position among the pairs; its value follows
    tokens = torch.tensor(rows, device=device)  # [C, length]
    streams: list[Tensor] = []  # the residual stream after the embedding and each layer: [C, length, hidden]
    attn_inputs: dict[int, tuple[Tensor, tuple[Tensor, Tensor]]] = {}
    hooks = [model.model.embed_tokens.register_forward_hook(lambda m, a, out: streams.append(out.cpu()))]
    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.register_forward_hook(lambda m, a, out: streams.append(out[0].cpu())))
        if not layer.is_lightning:
            hooks.append(layer.self_attn.register_forward_pre_hook(
                lambda m, a, i=i: attn_inputs.__setitem__(i, (a[0], a[1]))))  # fmt: skip
    try:
        model(tokens)
    finally:
        for hook in hooks:
            hook.remove()
    values = torch.arange(1, 2 * pairs, 2)  # the value positions of the pairs
    tokens = tokens.cpu()
    targets = tokens[:, values - 1].reshape(-1) - ids[0]  # the key before each value, as a class id
    split = (contexts // 2) * len(values)
    kinds = ["softmax" if t == SOFTMAX else "lightning" for t in model.config.layer_types]
    result = []
    for i, stream in enumerate(streams):
        accuracy = _ridge_accuracy(stream[:, values].reshape(-1, stream.shape[-1]), targets, third, split)
        entry = LayerProbe(i - 1, "embedding" if i == 0 else kinds[i - 1], accuracy)
        if i - 1 in attn_inputs:
            weights = attention_weights(model.model.layers[i - 1].self_attn, *attn_inputs[i - 1])
            _attention_probe(entry, weights.cpu(), asked, values)
        result.append(entry)
    return Probe(length, pairs, contexts, 1 / third, result)


def attention_weights(attn: SoftmaxAttention, x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
    """The causal attention weights ``[B, H, T, T]`` of the softmax layer ``attn`` on its input ``x``
    ``[B, T, hidden]`` (``rope`` its cos/sin): what its ``softmax_attention`` applies to the values."""
    b, t, _ = x.shape
    q = apply_rope(attn.q_proj(x).view(b, t, attn.num_heads, attn.head_dim), *rope).transpose(1, 2)
    k = apply_rope(attn.k_proj(x).view(b, t, attn.num_kv_heads, attn.head_dim), *rope).transpose(1, 2)
    k = k.repeat_interleave(attn.num_heads // attn.num_kv_heads, dim=1)
    scores = (q @ k.transpose(-1, -2)) / attn.head_dim**0.5
    future = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
    return scores.masked_fill(future, float("-inf")).softmax(-1)


def _attention_probe(entry: LayerProbe, weights: Tensor, asked: list[int], values: Tensor) -> None:
    """Fill ``entry``'s attention fields from a softmax layer's ``weights`` ``[C, H, T, T]``."""
    rows, key_at = torch.arange(len(weights)), torch.tensor(asked)
    query = weights[:, :, -1]  # [C, H, T]: from the query position
    to_value = query[rows, :, key_at + 1]  # [C, H]
    to_key = query[rows, :, key_at]
    to_values = query[:, :, values].sum(-1) - to_value
    previous = weights[:, :, values, values - 1].mean(-1)  # [C, H]: each value position on the key before it
    entry.to_value, entry.to_key = to_value.mean(0).tolist(), to_key.mean(0).tolist()
    entry.to_other_values, entry.previous_token = to_values.mean(0).tolist(), previous.mean(0).tolist()
