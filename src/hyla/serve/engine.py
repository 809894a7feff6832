"""The continuous-batching engine: requests in, one scheduled forward per step, tokens and text out.

:class:`LLMEngine` wires the input processor, the scheduler, the runner and the output processor (see its
docstring); :meth:`LLMEngine.step` schedules, executes, samples and turns new tokens into text deltas.
:class:`~hyla.serve.llm.LLM` is the offline API on top.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer

from hyla.data.tokenizer import END_OF_TEXT, check_tokenizer_fits
from hyla.errors import ConfigError, RequestError, check_fields
from hyla.model import HylaForCausalLM
from hyla.serve.cache import CacheManager
from hyla.serve.inputs import InputProcessor
from hyla.serve.outputs import OutputProcessor, RequestOutput, TokenLogprob
from hyla.serve.runner import COMPILED_MAX_BATCH, ModelRunner, kv_bytes_per_token, snapshot_bytes
from hyla.serve.sampling import SampleInput, SamplingParams, sample
from hyla.serve.scheduler import Request, ScheduledSeq, Scheduler, SchedulerOutput, Status, StepStats
from hyla.serve.speculative import NgramProposer

# The default KV pool's tokens (and the default context of models whose own is longer, MiniMax-Text-01's 10M).
DEFAULT_KV_TOKENS = 2**16


QUANTIZE = (None, "int8")
SPECULATIVE = (None, "ngram")


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class EngineConfig:
    """The engine's limits. ``max_model_len=None`` is the model's ``max_position_embeddings``, at most
    :data:`DEFAULT_KV_TOKENS`. The KV pool holds ``num_blocks`` blocks; ``num_blocks=None`` gives it
    ``kv_cache_gb`` of memory or, without that, room for ``max_num_seqs`` full-length requests at once but at
    most :data:`DEFAULT_KV_TOKENS` tokens (and at least one full-length request); past it, requests are
    preempted. A pool that cannot hold one full-length request, or larger than the memory available, is refused
    with the limits to change.

    Prefix caching (``enable_prefix_caching``) keeps finished requests' KV blocks and snapshots of their lightning
    states for later requests that share a prefix: ``prefix_cache_gb`` is the snapshot pool's budget, and inside
    long prompts a snapshot is taken every ``snapshot_every`` tokens (rounded up to whole blocks).

    ``quantize="int8"`` runs the linear layers (attention projections, router, LM head) and the experts with int8
    weights on the CPU (:func:`~hyla.ops.linear.quantize_int8`; float32 models only). ``compile=True`` runs the
    decode steps of up to :data:`~hyla.serve.runner.COMPILED_MAX_BATCH` requests through a forward compiled when
    the engine starts (CPU; see :mod:`hyla.serve.runner`).

    ``speculative="ngram"`` drafts up to ``num_draft_tokens`` tokens per decode by prompt lookup
    (:mod:`hyla.serve.speculative`) and verifies them in the same step: the outputs keep the model's distribution
    (greedy: the same tokens as without it)."""

    max_num_seqs: int = field(default=32, metadata=_help("requests generated at once"))
    max_num_batched_tokens: int = field(default=512, metadata=_help("tokens in one step"))
    block_size: int = field(default=16, metadata=_help("tokens per KV-cache block"))
    num_blocks: int | None = field(default=None, metadata=_help(
        "KV-cache blocks (default: from --kv-cache-gb, else room for max-num-seqs full requests, at most "
        f"{DEFAULT_KV_TOKENS} tokens)"))  # fmt: skip
    max_model_len: int | None = field(
        default=None,
        metadata=_help(
            f"longest prompt + output, in tokens (default: the model's context, at most {DEFAULT_KV_TOKENS})"
        ),
    )
    kv_cache_gb: float | None = field(default=None, metadata=_help(
        "memory for the KV cache, GB (default: see --num-blocks)"))  # fmt: skip
    enable_prefix_caching: bool = field(
        default=True,
        metadata=_help("reuse the KV blocks and lightning states of earlier requests' shared prefixes (exact)"),
    )
    prefix_cache_gb: float = field(default=0.25, metadata=_help("memory for lightning-state snapshots, GB"))
    snapshot_every: int = field(default=256, metadata=_help(
        "inside long prompts, a snapshot every this many tokens"))  # fmt: skip
    quantize: str | None = field(
        default=None,
        metadata=_help(
            "int8: the linear layers and the experts with int8 weights, CPU float32 only (measured in RESULTS.md)"
        ),
    )
    speculative: str | None = field(default=None, metadata=_help(
        "ngram: speculative decoding with drafts from the request's own context (prompt lookup); exact"))  # fmt: skip
    num_draft_tokens: int = field(default=32, metadata=_help(
        "speculative: tokens drafted per decode, at most (a request starts at 4, doubling while all are kept; "
        f"compiled, a step's drafts fit its {COMPILED_MAX_BATCH}-token verify graph)"))  # fmt: skip
    compile: bool = field(default=False, metadata=_help(
        f"CPU: run decode steps of up to {COMPILED_MAX_BATCH} requests through a torch.compile'd forward (needs a "
        "C++ compiler; compiles at start, cached on disk; measured in RESULTS.md)"))  # fmt: skip

    def resolve(
        self, max_position_embeddings: int, kv_bytes_per_token: int = 0, available: int | None = None
    ) -> EngineConfig:
        """A copy with the defaults filled in; raises :class:`ConfigError` naming a limit that cannot work.
        ``kv_bytes_per_token``: the model's KV cache per token (0 for a model without softmax layers);
        ``available``: bytes of memory the pool may take at most (None: unchecked)."""
        check_fields(self, [(name, getattr(self, name) >= 1, "must be >= 1") for name in
                            ("max_num_seqs", "max_num_batched_tokens", "block_size", "snapshot_every",
                             "num_draft_tokens")])  # fmt: skip
        check_fields(self, [("prefix_cache_gb", self.prefix_cache_gb >= 0, "must be >= 0"),
                            ("kv_cache_gb", self.kv_cache_gb is None or self.kv_cache_gb > 0, "must be > 0"),
                            ("num_blocks", self.num_blocks is None or self.num_blocks >= 1, "must be >= 1"),
                            ("quantize", self.quantize in QUANTIZE, f"must be one of {QUANTIZE}"),
                            ("speculative", self.speculative in SPECULATIVE,
                             f"must be one of {SPECULATIVE}")])  # fmt: skip
        max_model_len = self.max_model_len or min(max_position_embeddings, DEFAULT_KV_TOKENS)
        if max_model_len > max_position_embeddings:
            raise ConfigError(f"max_model_len {max_model_len} exceeds the model's context {max_position_embeddings}")
        block_bytes = self.block_size * max(kv_bytes_per_token, 1)
        num_blocks = self.num_blocks
        if num_blocks is None and self.kv_cache_gb is not None:
            num_blocks = max(int(self.kv_cache_gb * 2**30 // block_bytes), 1)
        if num_blocks is None:
            tokens = max(max_model_len, min(self.max_num_seqs * max_model_len, DEFAULT_KV_TOKENS))
            num_blocks = -(-tokens // self.block_size)
        if num_blocks * self.block_size < max_model_len:
            raise ConfigError(
                f"{num_blocks} KV blocks of {self.block_size} tokens cannot hold one {max_model_len}-token request; "
                f"give at least {-(-max_model_len // self.block_size)} blocks (--num-blocks), more memory "
                "(--kv-cache-gb) or a smaller --max-model-len"
            )
        pool = num_blocks * block_bytes * (kv_bytes_per_token > 0)
        if available is not None and pool > 0.9 * available:
            raise ConfigError(
                f"the KV cache of {num_blocks * self.block_size:,} tokens needs {pool / 2**30:.1f} GiB, more than "
                f"the {available / 2**30:.1f} GiB of memory available; give a smaller --max-model-len, "
                "--num-blocks or --kv-cache-gb"
            )
        snapshot_every = -(-self.snapshot_every // self.block_size) * self.block_size
        return dataclasses.replace(self, num_blocks=num_blocks, max_model_len=max_model_len,
                                   snapshot_every=snapshot_every)  # fmt: skip

    def num_snapshots(self, snapshot_bytes: int) -> int:
        """Snapshots in ``prefix_cache_gb`` (0 without prefix caching; a model without lightning layers needs
        no memory for them: one per block)."""
        if not self.enable_prefix_caching:
            return 0
        if snapshot_bytes == 0:
            return self.num_blocks or 0
        return max(int(self.prefix_cache_gb * 2**30 // snapshot_bytes), 0)


class LLMEngine:
    """The continuous-batching engine. It takes ownership of ``model`` (see :class:`ModelRunner`).

    Four parts, each the only owner of its state: the :class:`InputProcessor` checks requests before anything is
    queued, the :class:`Scheduler` decides each step (and is the only writer of the sequences' scheduling state),
    the :class:`ModelRunner` owns every tensor and runs the step, and the :class:`OutputProcessor` turns sampled
    tokens into text deltas and owns the requests' output state. ``stats`` adds up the steps' :class:`StepStats`."""

    def __init__(self, model: HylaForCausalLM, tokenizer: Tokenizer, config: EngineConfig | None = None) -> None:
        self.tokenizer = tokenizer
        dtype = next(model.parameters()).dtype
        kv_bytes = kv_bytes_per_token(model.config, dtype)
        available = available_memory(next(model.parameters()).device)
        self.config = c = (config or EngineConfig()).resolve(model.config.max_position_embeddings, kv_bytes, available)
        check_tokenizer_fits(tokenizer.get_vocab_size(), model.config.vocab_size)
        self.vocab_size = tokenizer.get_vocab_size()
        num_snapshots = c.num_snapshots(snapshot_bytes(model.config, dtype))
        self.cache = CacheManager(c.max_num_seqs, c.num_blocks, c.block_size, num_snapshots)
        if c.speculative and model.config.lightning_qk_conv:
            raise ConfigError("speculative decoding does not rewind a lightning q/k convolution (lightning_qk_conv, "
                              "a study option): serve this model without --speculative")  # fmt: skip
        proposer = NgramProposer(c.num_draft_tokens) if c.speculative else None
        self.scheduler = Scheduler(self.cache, c.max_num_seqs, c.max_num_batched_tokens, c.snapshot_every, proposer,
                                   COMPILED_MAX_BATCH if c.compile else None)  # fmt: skip
        self.runner = ModelRunner(model, c.max_num_seqs, c.num_blocks, c.block_size, num_snapshots, self.vocab_size,
                                  c.quantize, c.compile, c.num_draft_tokens if c.speculative else 0)  # fmt: skip
        self.model = self.runner.model
        eos = model.config.eos_token_id
        eos = eos if eos is not None and eos < self.vocab_size else tokenizer.token_to_id(END_OF_TEXT)
        self.inputs = InputProcessor(tokenizer, self.vocab_size, c.max_model_len, eos)
        self.outputs = OutputProcessor(tokenizer)
        self.stats = StepStats()  # every step's, added up
        self.last_stats = StepStats()  # the last step's

    # -- requests ------------------------------------------------------------------------------------------

    @property
    def requests(self) -> dict[str, list[Request]]:
        """The requests not finished yet: id -> sequences (the output processor's)."""
        return self.outputs.requests

    def add_request(
        self, request_id: str, prompts: list[list[int]], params: SamplingParams, limits: list[int] | None = None
    ) -> None:
        """Queue ``n`` sequences for each prompt (already encoded); sequence ``i * n + j`` is prompt ``i``'s
        ``j``-th. Raises :class:`RequestError` for a prompt or ``max_tokens`` that does not fit, unless ``limits``
        (from ``inputs.check``: the caller checked them already) are given."""
        if request_id in self.outputs.requests:
            raise RequestError("request_id", f"{request_id!r} is already running")
        limits = self.inputs.check(prompts, params) if limits is None else limits
        sequences = self.inputs.sequences(request_id, prompts, params, limits, self.runner.device)
        self.outputs.add(request_id, sequences)
        for sequence in sequences:
            self.scheduler.add(sequence)

    def abort(self, request_id: str) -> None:
        """Stop a request now (a client went away): its slots and blocks are free before the next step."""
        for sequence in self.outputs.abort(request_id):
            if sequence.status is not Status.FINISHED:
                self.scheduler.finish(sequence, "abort")

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # -- a step --------------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule, run one forward, sample; returns the outputs of the sequences that produced a token."""
        start = time.perf_counter()
        out = self.scheduler.schedule()
        if not out.seqs:
            return []
        results = self._run(out)
        proposer = self.scheduler.proposer
        if proposer is not None and all(s.sample and s.num_tokens == 1 + len(s.draft) for s in out.seqs):
            # A decode step (no prompt chunk): its time tells the proposer what verifying drafts costs.
            proposer.record_step(len(out.seqs), sum(s.num_tokens for s in out.seqs), time.perf_counter() - start)
        return results

    def _run(self, out: SchedulerOutput) -> list[RequestOutput]:
        """Run the scheduled step ``out``: the forward, sampling, the outputs."""
        logits = self.runner.execute(out)
        to_sample = [(self.scheduler.requests[k], s) for k, s in zip(out.keys, out.seqs, strict=True) if s.sample]
        if not to_sample:  # only prompt chunks this step
            self._count(self.scheduler.update(out, [])[1])
            return []
        # A row per sampled position: a drafted position sees the drafts before it as outputs (penalties, stops).
        rows = [SampleInput(r.params, r.prompt_ids, r.output_ids + s.draft[:j] if j else r.output_ids, r.generator,
                            r.stop_ids) for r, s in to_sample for j in range(s.num_samples)]  # fmt: skip
        sampled = sample(logits, rows)
        runs, starts = self._accept(sampled.tokens.tolist(), to_sample)
        updates, stats = self.scheduler.update(out, runs)
        self._count(stats)
        results, emitted = [], dict.fromkeys(starts, 0)
        for request, token in updates:
            (row, before), i = starts[request.key], emitted[request.key]
            emitted[request.key] += 1
            if before + i >= len(request.output_ids):  # a stop string ended its run of accepted tokens before
                continue
            logprob = None
            if request.params.logprobs is not None:
                k = request.params.logprobs
                top = list(zip(sampled.top[1][row + i, :k].tolist(), sampled.top[0][row + i, :k].tolist(),
                               strict=True))  # fmt: skip
                logprob = TokenLogprob(token, float(sampled.logprobs[row + i]), top)
            output = self.outputs.process(request, token, logprob, before + i + 1)
            if output.finished and (request.status is not Status.FINISHED or before + i + 1 < len(request.output_ids)):
                self.scheduler.finish(request, output.finish_reason, before + i + 1)  # a stop string
            results.append(output)
        return results

    def _accept(
        self, tokens: list[int], to_sample: list[tuple[Request, ScheduledSeq]]
    ) -> tuple[list[list[int]], dict[tuple[str, int], tuple[int, int]]]:
        """The tokens each sampled sequence emits: its drawn token, or with a draft the drafts up to the first
        position whose drawn token differs, then that drawn token (all drafts agreed: the token after them). A
        drafted token is kept exactly when the model drew it, so the outputs follow the model's distribution
        (rejection sampling with a draft of probability one). Rewinds the lightning states past the rejected
        drafts. Also returns, per request, its first sampled row and its outputs before this step."""
        runs, starts, accepted, row = [], {}, [], 0
        for request, seq in to_sample:
            drawn = tokens[row : row + seq.num_samples]
            agree = next((j for j, d in enumerate(seq.draft) if drawn[j] != d), len(seq.draft))
            runs.append(drawn[: agree + 1])
            starts[request.key] = (row, len(request.output_ids))
            if seq.draft:
                accepted.append(agree)
            row += seq.num_samples
        if accepted:
            self.runner.rewind(accepted)
        return runs, starts

    def _count(self, stats: StepStats) -> None:
        self.last_stats = stats
        self.stats.add(stats)


def available_memory(device: torch.device) -> int | None:
    """Bytes of memory ``device`` can still give (a GPU's free memory, Linux's ``MemAvailable``), or None where
    unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
