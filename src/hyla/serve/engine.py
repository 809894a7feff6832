"""The continuous-batching engine: requests in, one scheduled forward per step, tokens and text out.

:class:`LLMEngine` owns the model, the cache pools, the scheduler and the runner; :meth:`LLMEngine.step`
schedules, executes, samples and turns new tokens into text deltas (stop strings, stop tokens, lengths).
:class:`LLM` is the offline API on top: ``LLM(model_dir).generate(prompts, params)``.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer, pre_tokenizers

from hyla.data.tokenizer import END_OF_TEXT
from hyla.errors import ConfigError, RequestError, check_fields
from hyla.model import HylaForCausalLM
from hyla.ops.precision import DTYPES
from hyla.serve.cache import CacheManager
from hyla.serve.runner import COMPILED_MAX_BATCH, ModelRunner, kv_bytes_per_token, snapshot_bytes
from hyla.serve.sampling import SampleInput, SamplingParams, sample
from hyla.serve.scheduler import Request, Scheduler, Status

# The default KV pool's tokens (and the default context of models whose own is longer, MiniMax-Text-01's 10M).
DEFAULT_KV_TOKENS = 2**16


QUANTIZE = (None, "int8")


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

    ``quantize="int8"`` runs the linear layers (attention projections, router, LM head; not the experts) with int8
    weights on the CPU (:func:`~hyla.ops.linear.quantize_int8`; float32 models only). ``compile=True`` runs the
    decode steps of up to :data:`~hyla.serve.runner.COMPILED_MAX_BATCH` requests through a forward compiled when
    the engine starts (CPU; see :mod:`hyla.serve.runner`)."""

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
            "int8: the linear layers (not the experts) with int8 weights, CPU float32 only (measured in RESULTS.md)"
        ),
    )
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
                            ("max_num_seqs", "max_num_batched_tokens", "block_size", "snapshot_every")])  # fmt: skip
        check_fields(self, [("prefix_cache_gb", self.prefix_cache_gb >= 0, "must be >= 0"),
                            ("kv_cache_gb", self.kv_cache_gb is None or self.kv_cache_gb > 0, "must be > 0"),
                            ("num_blocks", self.num_blocks is None or self.num_blocks >= 1, "must be >= 1"),
                            ("quantize", self.quantize in QUANTIZE, f"must be one of {QUANTIZE}")])  # fmt: skip
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


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely tokens and their logprobs, most likely first


@dataclass
class RequestOutput:
    """What one step added to one sequence. ``text`` is the new text (held back while it could still turn
    out to be the start of a stop string); ``finish_reason`` is set on the last: "stop" or "length"."""

    request_id: str
    index: int
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob]
    num_prompt_tokens: int
    num_output_tokens: int
    finish_reason: str | None = None
    num_cached_tokens: int = 0  # prompt tokens read from the prefix cache instead of computed

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class _Detokenized:
    """A request's output text so far and how much of it (and of its tokens) went out already.

    The text is decoded incrementally (:meth:`update`): ``settled`` is the text of the first ``read`` output
    tokens, which ends with a whole character; each new token decodes only the window from ``prefix`` (the
    tokens before ``read`` that the tokenizer's decoder sees as context) instead of the whole output."""

    text: str = ""
    sent_chars: int = 0
    sent_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    settled: str = ""
    prefix: int = 0
    read: int = 0

    def update(self, tokenizer: Tokenizer, ids: list[int]) -> None:
        """Set ``text`` to the decoding of ``ids`` (the output so far), decoding the last few tokens only."""
        before = tokenizer.decode(ids[self.prefix : self.read])
        window = tokenizer.decode(ids[self.prefix :])
        if window.startswith(before):
            self.text = self.settled + window[len(before) :]
        else:  # a decoder that rewrites earlier text given more: decode it all, take it as context
            self.text, self.settled, self.prefix, self.read = tokenizer.decode(ids), "", 0, 0
        if not self.text.endswith("\ufffd"):  # whole characters: the next window starts here
            self.settled, self.prefix, self.read = self.text, self.read, len(ids)


class LLMEngine:
    """The continuous-batching engine. It takes ownership of ``model`` (see :class:`ModelRunner`)."""

    def __init__(self, model: HylaForCausalLM, tokenizer: Tokenizer, config: EngineConfig | None = None) -> None:
        self.tokenizer = tokenizer
        dtype = next(model.parameters()).dtype
        kv_bytes = kv_bytes_per_token(model.config, dtype)
        available = available_memory(next(model.parameters()).device)
        self.config = c = (config or EngineConfig()).resolve(model.config.max_position_embeddings, kv_bytes, available)
        num_snapshots = c.num_snapshots(snapshot_bytes(model.config, dtype))
        self.cache = CacheManager(c.max_num_seqs, c.num_blocks, c.block_size, num_snapshots)
        self.scheduler = Scheduler(self.cache, c.max_num_seqs, c.max_num_batched_tokens, c.snapshot_every)
        if tokenizer.get_vocab_size() > model.config.vocab_size:
            raise ConfigError(
                f"the tokenizer has {tokenizer.get_vocab_size()} ids but the model only {model.config.vocab_size}: "
                "they were not trained together (give the model's own tokenizer with --tokenizer)"
            )
        self.vocab_size = tokenizer.get_vocab_size()
        self.runner = ModelRunner(model, c.max_num_seqs, c.num_blocks, c.block_size, num_snapshots, self.vocab_size,
                                  c.quantize, c.compile)  # fmt: skip
        self.model = self.runner.model
        eos = model.config.eos_token_id
        self.eos_token_id = eos if eos is not None and eos < self.vocab_size else tokenizer.token_to_id(END_OF_TEXT)
        self._max_token_bytes = _max_token_bytes(tokenizer)
        self.requests: dict[str, list[Request]] = {}
        self._text: dict[tuple[str, int], _Detokenized] = {}  # the output processor's state, per sequence
        self.num_prompt_tokens = 0  # counters for metrics
        self.num_output_tokens = 0

    # -- requests ------------------------------------------------------------------------------------------

    def encode(self, prompt: str | list[int], param: str = "prompt") -> list[int]:
        """Token ids of a prompt, text or ids, checked against the vocabulary and the context; errors name
        ``param``.

        A text known to be over the context (more bytes than its longest possible tokenization covers) is
        refused without being tokenized; a text that is not valid Unicode (a lone surrogate, which JSON can
        carry) is refused before the tokenizer sees it."""
        context = self.config.max_model_len
        if isinstance(prompt, str) and not prompt.isascii():
            try:
                prompt.encode()
            except UnicodeEncodeError as e:
                raise RequestError(param, f"the text is not valid Unicode: {e.reason} at character {e.start}") from None
        if isinstance(prompt, str):
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

    def check(self, prompt_ids: list[int], params: SamplingParams) -> int:
        """The most tokens a sequence of this prompt may generate; :class:`RequestError` for parameters this model
        cannot take: ``max_tokens`` past the context, stop token ids outside the vocabulary."""
        room = self.config.max_model_len - len(prompt_ids)
        if params.max_tokens is not None and params.max_tokens > room:
            raise RequestError(
                "max_tokens",
                f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds this model's "
                f"context of {self.config.max_model_len} tokens",
            )
        for name, ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", list(params.logit_bias))):
            bad = [t for t in ids if t >= self.vocab_size]
            if bad:
                raise RequestError(name, f"{bad[:8]} are not token ids of this model (ids are < {self.vocab_size})")
        return params.max_tokens or room

    def add_request(self, request_id: str, prompts: list[list[int]], params: SamplingParams) -> None:
        """Queue ``n`` sequences for each prompt (already encoded); sequence ``i * n + j`` is prompt ``i``'s
        ``j``-th. Raises :class:`RequestError` for a prompt or ``max_tokens`` that does not fit."""
        if request_id in self.requests:
            raise RequestError("request_id", f"{request_id!r} is already running")
        stop_ids = sorted(set(params.stop_token_ids) | ({self.eos_token_id} if not params.ignore_eos else set()))
        stop_ids = [t for t in stop_ids if t is not None]
        now = time.monotonic()
        sequences = []
        limits = [self.check(ids, params) for ids in prompts]  # every prompt checked before any is queued
        for i, (ids, max_tokens) in enumerate(zip(prompts, limits, strict=True)):
            for j in range(params.n):
                seed = params.seed + j if params.seed is not None else random.getrandbits(62)
                generator = torch.Generator(device=self.runner.device).manual_seed(seed)
                sequences.append(Request(request_id, i * params.n + j, ids, params, max_tokens, stop_ids,
                                         generator, now))  # fmt: skip
        self.requests[request_id] = sequences
        for request in sequences:
            self._text[request.key] = _Detokenized()
            self.scheduler.add(request)

    def abort(self, request_id: str) -> None:
        """Stop a request now (a client went away): its slots and blocks are free before the next step."""
        for request in self.requests.pop(request_id, []):
            if request.status is not Status.FINISHED:
                self.scheduler.finish(request, "abort")
            self._text.pop(request.key, None)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # -- a step --------------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule, run one forward, sample; returns the outputs of the sequences that produced a token."""
        out = self.scheduler.schedule()
        if not out.seqs:
            return []
        logits = self.runner.execute(out)
        for seq, key in zip(out.seqs, out.keys, strict=True):
            request = self.scheduler.requests[key]
            if seq.num_computed == request.num_cached_tokens and not request.num_preemptions:  # its first chunk
                self.num_prompt_tokens += len(request.prompt_ids) - request.num_cached_tokens
        to_sample = [self.scheduler.requests[k] for k, s in zip(out.keys, out.seqs, strict=True) if s.sample]
        if not to_sample:  # only prompt chunks this step
            self.scheduler.update(out, [])
            return []
        rows = [SampleInput(r.params, r.prompt_ids, r.output_ids, r.generator, r.stop_ids) for r in to_sample]
        sampled = sample(logits, rows)
        updates = self.scheduler.update(out, sampled.tokens.tolist())
        return [self._process(request, token, row, sampled) for row, (request, token) in enumerate(updates)]

    def _process(self, request: Request, token: int, row: int, sampled) -> RequestOutput:
        """Turn a sampled token into text: logprobs, stop strings (which finish the request), the delta to send."""
        self.num_output_tokens += 1
        state = self._text[request.key]
        if request.params.logprobs is not None:
            k = request.params.logprobs
            top = list(zip(sampled.top[1][row, :k].tolist(), sampled.top[0][row, :k].tolist(), strict=True))
            state.logprobs.append(TokenLogprob(token, float(sampled.logprobs[row]), top))
        reason = request.finish_reason
        if reason != "stop" or token not in request.stop_ids:  # a stop token adds no text
            state.update(self.tokenizer, request.output_ids)
            if self._check_stop_strings(request, state):
                reason = "stop"
                if request.status is not Status.FINISHED:
                    self.scheduler.finish(request, reason)
        return self._delta(request, state, reason)

    def _check_stop_strings(self, request: Request, state: _Detokenized) -> str | None:
        """Cut the text before the first stop string; "stop" if there was one."""
        stops = request.params.stop
        if not stops or len(request.output_ids) < request.params.min_tokens:
            return None
        start = max(state.sent_chars - max(map(len, stops)), 0)
        found = [i for i in (state.text.find(s, start) for s in stops) if i >= 0]
        if not found:
            return None
        state.text = state.text[: min(found)]
        return "stop"

    def _delta(self, request: Request, state: _Detokenized, reason: str | None) -> RequestOutput:
        end = len(state.text)
        if reason is None:
            # Hold back what could be the start of a stop string, or an incomplete UTF-8 character.
            end -= max(map(len, request.params.stop), default=1) - 1
            while end > state.sent_chars and state.text[end - 1] == "\ufffd":
                end -= 1
        end = max(end, state.sent_chars)
        text, state.sent_chars = state.text[state.sent_chars : end], end
        new_tokens = request.output_ids[state.sent_tokens :]
        new_logprobs = state.logprobs[state.sent_tokens :]
        state.sent_tokens = len(request.output_ids)
        if reason is not None:
            self._text.pop(request.key)
            group = self.requests.get(request.request_id, [])
            if all(r.status is Status.FINISHED for r in group):
                self.requests.pop(request.request_id, None)
        return RequestOutput(request.request_id, request.index, new_tokens, text, new_logprobs,
                             len(request.prompt_ids), len(request.output_ids), reason,
                             request.num_cached_tokens)  # fmt: skip


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


def _max_token_bytes(tokenizer: Tokenizer) -> int:
    """An upper bound on the UTF-8 bytes of text one token covers, or 0 when none is known.

    Known for byte-level BPE without a normalizer (hyla's own tokenizers, GPT-2's): every byte of the text is
    in some token, spelled as one or two bytes of the token's string. Elsewhere a normalizer, an unknown-token
    id or dropped characters can make a long text a few tokens, and only the body-size limit applies."""
    if tokenizer.normalizer is not None or not isinstance(tokenizer.pre_tokenizer, pre_tokenizers.ByteLevel):
        return 0
    return max((len(t.encode()) for t in tokenizer.get_vocab(with_added_tokens=True)), default=0)


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
            self.engine.add_request(str(self._next_id), [self.engine.encode(prompt)], params)
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
