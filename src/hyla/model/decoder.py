"""The hybrid decoder: embeddings, lightning/softmax layers with MoE feed-forwards, and the LM head.

Module and parameter names follow transformers' ``MiniMaxForCausalLM`` (``model.layers.3.self_attn...``),
except the experts, which are stacked here and per-expert on disk; ``hyla.interop`` maps between the two.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from hyla.config import LIGHTNING, HylaConfig
from hyla.model.attention import SoftmaxAttention
from hyla.model.cache import Cache
from hyla.model.lightning import LightningAttention
from hyla.model.moe import SparseMoE
from hyla.model.norm import RMSNorm
from hyla.ops.loss import IGNORE_INDEX, linear_cross_entropy
from hyla.ops.moe import load_balancing_loss
from hyla.ops.rope import rope_cos_sin, rope_inv_freq
from hyla.ops.varlen import Varlen, as_varlen


@dataclass
class CausalLMOutput:
    """What :class:`HylaForCausalLM` returns.

    ``logits`` ``[B, T, vocab]`` (the last ``logits_to_keep`` positions, or ``[K, vocab]`` for ``logits_indices``;
    None from :meth:`~HylaForCausalLM.loss`); ``aux_loss`` the MoE load-balancing loss (a scalar, not yet
    multiplied by its coefficient) when router statistics were computed (training, or ``router_stats=True``);
    ``loss`` the next-token cross-entropy, from :meth:`~HylaForCausalLM.loss`.
    """

    logits: Tensor | None
    aux_loss: Tensor | None
    loss: Tensor | None = None


class DecoderLayer(nn.Module):
    """Post-norm with DeepNorm factors: ``x = norm(x); x = alpha * x + beta * f(x)``, for attention then MoE."""

    def __init__(self, config: HylaConfig, layer_idx: int) -> None:
        super().__init__()
        self.is_lightning = config.layer_types[layer_idx] == LIGHTNING
        if self.is_lightning:
            self.self_attn: nn.Module = LightningAttention(config, layer_idx)
            self.attn_alpha, self.attn_beta = config.linear_attn_alpha_factor, config.linear_attn_beta_factor
        else:
            self.self_attn = SoftmaxAttention(config, layer_idx)
            self.attn_alpha, self.attn_beta = config.full_attn_alpha_factor, config.full_attn_beta_factor
        self.mlp_alpha, self.mlp_beta = config.mlp_alpha_factor, config.mlp_beta_factor
        self.postnorm = config.postnorm
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SparseMoE(config)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        cache: Cache | None,
        cu_seqlens: Varlen | None,
        router_stats: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        h = self.input_layernorm(x)
        residual = h if self.postnorm else x
        # Lightning layers have no positional encoding: only softmax layers take the RoPE tables.
        args = (cache, cu_seqlens) if self.is_lightning else (rope, cache, cu_seqlens)
        a = self.self_attn(h, *args)
        x = _scaled_sum(residual, self.attn_alpha, a, self.attn_beta)
        h = self.post_attention_layernorm(x)
        residual = h if self.postnorm else x
        m, stats = self.mlp(h, router_stats)
        return _scaled_sum(residual, self.mlp_alpha, m, self.mlp_beta), stats


def next_token_targets(labels: Tensor, cu_seqlens: Tensor | None) -> Tensor:
    """``[B, T - 1]`` next-token targets of ``labels`` ``[B, T]`` (``-100``: none); a packed document's last token has
    none. What :meth:`HylaForCausalLM.loss` scores, and what the training loop counts."""
    targets = labels[:, 1:]
    if cu_seqlens is not None:
        targets = targets.clone()
        targets[0, cu_seqlens[1:-1].to(targets.device) - 1] = IGNORE_INDEX
    return targets


def _scaled_sum(x: Tensor, alpha: float, y: Tensor, beta: float) -> Tensor:
    """``alpha * x + beta * y``, written into ``y``: a sublayer's fresh output, which no backward needs.

    Multiplications by 1 are skipped (exact: ``1 * x == x`` in floating point).
    """
    y = y if beta == 1 else y.mul_(beta)
    return y.add_(x) if alpha == 1 else y.add_(x, alpha=alpha)


class HylaModel(nn.Module):
    """Embeddings, the decoder layers and the final norm: ``[B, T]`` ids -> ``[B, T, hidden]``."""

    def __init__(self, config: HylaConfig) -> None:
        super().__init__()
        self.rotary_dim, self.rope_theta = config.rotary_dim, config.rope_theta
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.register_buffer("inv_freq", torch.empty(config.rotary_dim // 2), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """(Re)compute the derived buffers, on the CPU: after construction on the meta device, for one."""
        self.inv_freq = rope_inv_freq(self.rotary_dim, self.rope_theta)

    def forward(
        self,
        input_ids: Tensor,
        cache: Cache | None = None,
        cu_seqlens: Tensor | None = None,
        router_stats: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Returns the final hidden states ``[B, T, hidden]`` and, with ``router_stats``, the MoE load-balancing
        stats summed over layers ``[2, E]``."""
        x = self.embed_tokens(input_ids)
        t = input_ids.shape[1]
        # A packed batch is planned once here and its plans shared by every layer.
        varlen = None if cu_seqlens is None else as_varlen(cu_seqlens, t, x.device)
        if cache is not None:
            positions = cache.positions(t, x.device)
        elif varlen is not None:  # each packed sequence counts its positions from 0
            starts = torch.repeat_interleave(varlen.cu_seqlens[:-1], varlen.cu_seqlens.diff())
            positions = (torch.arange(t, device=x.device) - starts)[None]
        else:
            positions = torch.arange(t, device=x.device)[None]
        rope = rope_cos_sin(positions, self.inv_freq, x.dtype)
        stats = []
        for layer in self.layers:
            x, layer_stats = layer(x, rope, cache, varlen, router_stats)
            stats.append(layer_stats)
        return self.norm(x), torch.stack(stats).sum(0) if router_stats else None


class HylaForCausalLM(nn.Module):
    """A hybrid lightning/softmax-attention MoE language model, numerically MiniMax's.

    Example::

        model = HylaForCausalLM(preset("tiny"))
        out = model(input_ids)                 # out.logits [B, T, vocab]
        out = model.loss(input_ids)            # out.loss: next-token cross-entropy; out.aux_loss in training
    """

    def __init__(self, config: HylaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = HylaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.reset_parameters()

    def reset_buffers(self) -> None:
        """Recompute every derived buffer (RoPE frequencies, lightning slopes) on the CPU."""
        for module in self.modules():
            if module is not self and hasattr(module, "reset_buffers"):
                module.reset_buffers()

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """Normal(0, initializer_range) for every matrix, ones for norms (as transformers initialises); a lightning
        q/k convolution (``lightning_qk_conv``) starts as the identity."""
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if p.is_meta:
                continue
            if name.endswith("qk_conv"):  # the identity: tap 0, the token itself
                p.zero_()[0] = 1.0
            elif p.dim() == 1:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32) * std)

    def forward(
        self,
        input_ids: Tensor,
        cache: Cache | None = None,
        cu_seqlens: Tensor | None = None,
        logits_to_keep: int = 0,
        logits_indices: Tensor | None = None,
        router_stats: bool | None = None,
    ) -> CausalLMOutput:
        """Logits of ``input_ids`` ``[B, T]``.

        ``logits_to_keep=n`` computes the logits of the last ``n`` positions only (a prefill needs one);
        ``logits_indices`` (``[K]``, into the ``B * T`` positions flattened) those of chosen positions (a serving
        step: each sequence's last token), ``[K, vocab]``. ``cu_seqlens`` (``[N + 1]`` offsets) packs ``N``
        documents into ``B = 1``: no attention, lightning or softmax, crosses a document boundary. The MoE
        load-balancing loss is computed when ``router_stats`` (default: in training mode).
        """
        hidden, aux_loss = self._hidden(input_ids, cache, cu_seqlens, router_stats)
        if logits_indices is not None:
            hidden = hidden.flatten(0, 1)[logits_indices]
        elif logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return CausalLMOutput(logits=self.lm_head(hidden), aux_loss=aux_loss)

    def loss(
        self,
        input_ids: Tensor,
        labels: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
        router_stats: bool | None = None,
    ) -> CausalLMOutput:
        """The mean next-token cross-entropy of ``input_ids`` ``[B, T]`` against ``labels`` (default: the inputs;
        shifted inside, ``-100`` ignored), the LM head fused into it chunk by chunk: no ``[B, T, vocab]`` logits
        are kept. With ``cu_seqlens``, no document's last token is trained to predict the next one's first.
        ``aux_loss`` as in :meth:`forward`.

        Example::

            out = model.loss(input_ids)
            (out.loss + model.config.router_aux_loss_coef * out.aux_loss).backward()
        """
        labels = input_ids if labels is None else labels
        hidden, aux_loss = self._hidden(input_ids, None, cu_seqlens, router_stats)
        targets = next_token_targets(labels, cu_seqlens).flatten()
        loss = linear_cross_entropy(hidden[:, :-1].flatten(0, 1), self.lm_head.weight, targets)
        return CausalLMOutput(logits=None, aux_loss=aux_loss, loss=loss)

    def _hidden(
        self, input_ids: Tensor, cache: Cache | None, cu_seqlens: Tensor | None, router_stats: bool | None
    ) -> tuple[Tensor, Tensor | None]:
        """The final hidden states ``[B, T, hidden]`` and, if asked, the load-balancing loss."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
        if cu_seqlens is not None and (cache is not None or input_ids.shape[0] != 1):
            raise ValueError("cu_seqlens packs documents into one row of input_ids, without a cache")
        router_stats = self.training if router_stats is None else router_stats
        hidden, stats = self.model(input_ids, cache, cu_seqlens, router_stats)
        aux_loss = load_balancing_loss(stats, input_ids.numel() * len(self.model.layers)) if router_stats else None
        return hidden, aux_loss
