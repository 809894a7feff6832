"""The runner owns every tensor of the engine — the model, the lightning-state slots, the snapshot pool and the
paged KV pools — and executes a :class:`~hyla.serve.scheduler.SchedulerOutput`: slot resets and snapshot
restores, one forward over every request's new tokens packed in one row, then the snapshots to keep (those
inside a prefill chunk taken during the forward, from the states before the step).

With ``compile=True``, steps of decodes only (one new token per request, at most :data:`COMPILED_MAX_BATCH`
requests) run the same forward captured by ``torch.compile`` (inductor's C++ kernels on the CPU): the hundreds of
small eager operations of a decode step (norms, gates, routing, rotary tables, state updates) fused into a few
dozen kernels. Three graphs are compiled when the runner is built — one request, 2-3 and 4 to
:data:`COMPILED_MAX_BATCH` requests (the experts indexed or dense, :mod:`hyla.ops.moe`), the batch and the
block-table width dynamic — so that no request waits for a compile; the eager forward is the reference they are
tested against and runs every other step. With speculative decoding, steps of decodes of which some carry drafts
(at most :data:`COMPILED_MAX_BATCH` tokens) run a second compiled forward (:class:`VerifyCache`: four graphs, one
and several requests, experts indexed or dense), and :meth:`ModelRunner.rewind` steps the kept states through
the accepted tokens.
"""

from __future__ import annotations

import functools
import itertools
import shutil
import time
import types
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from hyla.config import LIGHTNING, HylaConfig
from hyla.errors import ConfigError
from hyla.model import HylaForCausalLM
from hyla.model.linear import prepare_copies, prepare_for_compile, prepare_for_cpu_inference
from hyla.ops import gemv
from hyla.ops.attention import paged_attention
from hyla.ops.lightning import lightning_attention, lightning_decode, lightning_state
from hyla.ops.precision import compute_dtype
from hyla.ops.varlen import Varlen
from hyla.serve.scheduler import ScheduledSeq, SchedulerOutput
from hyla.serve.speculative import START_DRAFT_TOKENS

# The most requests a compiled decode step takes (see the module's docstring); larger steps run eager, where the
# compiled step stopped winning (RESULTS.md, "Same-process A/B measurements behind the compiled decode step").
COMPILED_MAX_BATCH = 32
_COMPILE_OPTIONS = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe, "cpp_wrapper": True}


def _longs(values: list, device: torch.device) -> Tensor:
    """``values`` (ints, or equal-length lists of them) as an int64 tensor on ``device``."""
    return torch.tensor(values, dtype=torch.long, device=device)


def snapshot_bytes(config: HylaConfig, dtype: torch.dtype) -> int:
    """Bytes of one snapshot: every lightning layer's ``[H, D, D]`` state (and, with ``lightning_qk_conv = K``,
    its last ``K - 1`` q/k inputs)."""
    layers = sum(t == LIGHTNING for t in config.layer_types)
    state = config.num_attention_heads * config.head_dim**2 * compute_dtype(dtype).itemsize
    return layers * (state + _conv_history(config) * dtype.itemsize)


def _conv_history(config: HylaConfig) -> int:
    """Values a lightning layer's q/k convolution keeps per sequence: its last ``K - 1`` inputs ``[K - 1, 2HD]``."""
    return max(config.lightning_qk_conv - 1, 0) * 2 * config.num_attention_heads * config.head_dim


def kv_bytes_per_token(config: HylaConfig, dtype: torch.dtype) -> int:
    """Bytes of one token's keys and values in every softmax layer's KV pool."""
    layers = sum(t != LIGHTNING for t in config.layer_types)
    return 2 * layers * config.num_key_value_heads * config.head_dim * dtype.itemsize


def compile_refusal(model: nn.Module) -> str | None:
    """Why the runner cannot compile ``model``'s decode steps here, or None where it can."""
    param = next(model.parameters())
    if param.device.type != "cpu" or param.dtype not in (torch.float32, torch.float64):
        return f"compile runs on the CPU with a float32 or float64 model, not {param.device} {param.dtype}"
    if model.config.lightning_qk_conv:
        return "compile does not take a model with lightning_qk_conv (a study option): serve it eager"
    return None


def compile_choice(model: nn.Module) -> tuple[bool, str]:
    """``hyla serve``'s default for ``compile``: on where the runner can compile ``model`` and a C++ compiler is
    found, with why."""
    if refusal := compile_refusal(model):
        return False, refusal
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        compiler = get_cpp_compiler()
    except Exception:  # inductor found none it takes
        compiler = None
    if not compiler or shutil.which(compiler) is None:
        return False, "no C++ compiler found (install g++ to compile the decode steps)"
    return True, f"C++ compiler {compiler} found"


class ModelRunner:
    """Preallocated pools for every layer: ``[S, H, D, D]`` states and ``[P, H, D, D]`` snapshots per lightning
    layer, ``[num_blocks, block_size, Hkv, D]`` keys and values per softmax layer.

    The engine takes ownership of the model: it is put in eval mode and, on the CPU, its weights are prepared for
    small batches (:func:`~hyla.model.linear.prepare_for_cpu_inference`: same values, same parameters)."""

    def __init__(
        self,
        model: HylaForCausalLM,
        num_slots: int,
        num_blocks: int,
        block_size: int,
        num_snapshots: int,
        vocab_limit: int,
        quantize: str | None = None,
        compile: bool = False,
        num_draft_tokens: int = 0,
    ) -> None:
        self.model = model.eval()
        self.vocab_limit = vocab_limit  # logits at or past it (padding past the tokenizer's ids) are dropped
        param = next(model.parameters())
        self.device, dtype = param.device, param.dtype
        if quantize and (self.device.type != "cpu" or dtype != torch.float32):
            raise ConfigError(f"quantize={quantize!r} runs on the CPU with a float32 model, not {self.device} {dtype}")
        if compile and (refusal := compile_refusal(model)):
            raise ConfigError(refusal)
        # A decode token's lightning step: on the CPU where the kernels build, one pass over each state in C++
        # (its reference, the torch step, elsewhere).
        self.lightning_decode = lightning_decode
        if self.device.type == "cpu":
            if dtype in (torch.float32, torch.float64) and gemv.available():
                self.lightning_decode = gemv.lightning_decode
            prepare_for_cpu_inference(model, quantize)
            if num_slots > 1:  # steps of several rows will come: no first step should pay for the copies
                prepare_copies(model)
        config = model.config
        self.block_size = block_size
        h, hkv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        kind = dict(dtype=compute_dtype(dtype), device=self.device)
        # Keyed by layer; a lightning q/k convolution's history by "conv{layer}" (slots and snapshots alike).
        self.states: dict[int | str, Tensor] = {}
        self.snapshots: dict[int | str, Tensor] = {}
        self.keys: dict[int, Tensor] = {}
        self.values: dict[int, Tensor] = {}
        for i, layer_type in enumerate(config.layer_types):
            if layer_type == LIGHTNING:
                self.states[i] = torch.zeros(num_slots, h, d, d, **kind)
                self.snapshots[i] = torch.zeros(num_snapshots, h, d, d, **kind)
                if config.lightning_qk_conv:
                    history = (config.lightning_qk_conv - 1, 2 * h * d)
                    self.states[f"conv{i}"] = torch.zeros(num_slots, *history, dtype=dtype, device=self.device)
                    self.snapshots[f"conv{i}"] = torch.zeros(num_snapshots, *history, dtype=dtype, device=self.device)
            else:
                self.keys[i] = torch.zeros(num_blocks, block_size, hkv, d, dtype=dtype, device=self.device)
                self.values[i] = torch.zeros_like(self.keys[i])
        self._compiled: Callable[[Tensor, DecodeCache, Tensor], Tensor] | None = None
        self._compiled_verify: Callable[[Tensor, VerifyCache, Tensor], Tensor] | None = None
        self._verified: StepCache | VerifyCache | None = None  # the last step, when it verified drafts (for rewind)
        self._draft_saves: list[tuple[int, int, int]] = []  # ... and its snapshots to write if accepted that far
        self.compile_seconds = 0.0
        if compile:
            self._compile(min(num_slots, COMPILED_MAX_BATCH), num_blocks, num_draft_tokens)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> Tensor:
        """Run one step; returns the ``[num sampled, vocab_limit]`` float32 logits of the sampled positions of
        each sequence with ``sample`` set (its last token; with a draft, the last ``1 + len(draft)``), in order.
        A step with drafts keeps what :meth:`rewind` needs until the next step."""
        self._copy_states(out)
        self._verified, self._draft_saves = None, out.draft_saves
        inside = [save for save in out.saves if save[1] < out.seqs[save[0]].num_tokens]
        ids = torch.tensor([t for s in out.seqs for t in s.token_ids], dtype=torch.long, device=self.device)
        ends = list(itertools.accumulate(s.num_tokens for s in out.seqs))
        rows = [e - j for e, s in zip(ends, out.seqs, strict=True) for j in range(s.num_samples, 0, -1)]
        rows = torch.tensor(rows, dtype=torch.long, device=self.device)
        compiled = len(ids) <= COMPILED_MAX_BATCH
        if self._compiled is not None and compiled and len(ids) == len(out.seqs):
            step = DecodeCache(self, out.seqs)
            step.mark_dynamic(ids, rows)
            logits = self._compiled(ids, step, rows)
        elif (self.lightning_decode is gemv.lightning_decode and any(s.draft for s in out.seqs)
              and all(s.sample and s.num_tokens == 1 + len(s.draft) for s in out.seqs)):  # fmt: skip
            step = VerifyCache(self, out.seqs)  # decodes, some with drafts
            if self._compiled_verify is not None and compiled:
                step.mark_dynamic(ids, rows)
                logits = self._compiled_verify(ids, step, rows)
            else:
                logits = self.forward(ids, step, rows)
            self._verified = step
        else:
            step = StepCache(self, out.seqs, inside)
            logits = self.forward(ids, step, rows)
            self._verified = step if step.verify else None
        after = [(out.seqs[i].slot, snapshot) for i, n, snapshot in out.saves if n == out.seqs[i].num_tokens]
        if after:  # the states after all of a sequence's new tokens: its slot's, now
            slots, snapshots = (torch.tensor(x, device=self.device) for x in zip(*after, strict=True))
            for layer, pool in self.states.items():
                self.snapshots[layer][snapshots] = pool[slots]
        return logits

    def forward(self, ids: Tensor, step: StepCache | DecodeCache, rows: Tensor) -> Tensor:
        """The model on one step's packed ``ids`` ``[ΣT]``: the float32 logits ``[len(rows), vocab_limit]`` of the
        packed positions ``rows``."""
        return self.model(ids[None], cache=step, logits_indices=rows).logits[:, : self.vocab_limit].float()

    def _compile_forward(self) -> Callable[[Tensor, DecodeCache, Tensor], Tensor]:
        """:meth:`forward` compiled, with a code object of its own (see :meth:`_compile`)."""
        forward = types.FunctionType(ModelRunner.forward.__code__.replace(), ModelRunner.forward.__globals__)
        # (a copy of the options: torch.compile takes guard_filter_fn out of the dict it is given, and every
        # compiled forward after the first in a process then checked each of the model's tensors: RESULTS.md,
        # "Reading: the compiled verify step")
        return torch.compile(types.MethodType(forward, self), options=dict(_COMPILE_OPTIONS))

    def _compile(self, max_batch: int, num_blocks: int, num_draft_tokens: int) -> None:
        """Compile :meth:`forward` for decode steps and run each graph once (on free slots and blocks, which a
        request zeroes or overwrites before it reads them), timing it."""
        start = time.perf_counter()
        prepare_for_compile(self.model)
        # Dynamo keeps compiled graphs per code object: this runner's forward gets a code object of its own, so no
        # other engine in the process shares (or counts against the recompile limit of) these graphs, and the
        # guards on the modules can go (the engine owns the model, whose structure does not change as it serves).
        # inductor's C++ wrapper calls the kernels (faster: RESULTS.md, the compiled decode step's A/B table).
        self._compiled = self._compile_forward()
        if num_draft_tokens and self.lightning_decode is gemv.lightning_decode:
            self._compiled_verify = self._compile_forward()  # a code object of its own: its own recompile limit
        try:
            # One request; two; the most (past the sizes at which the experts change path, where a step reaches
            # them: ops/moe.py).
            for batch in sorted({1, min(2, max_batch), max_batch}):
                # Block tables of 2 blocks (one request) or batch + 1 (several): no size the compiler would
                # specialise (0, 1) or take for the batch's.
                width = 2 if batch == 1 else batch + 1
                self.execute(SchedulerOutput([ScheduledSeq(i, [i % num_blocks] * width, 0, [0], True)
                                              for i in range(batch)]))  # fmt: skip
            if self._compiled_verify is not None:
                # Drafts per sequence: one request with one draft or as many as a compiled step takes; two
                # requests, one with a draft (3 tokens); as many requests as fit with a first round of drafts each
                # (COMPILED_MAX_BATCH tokens: past every size at which the experts change path, ops/moe.py's
                # COMPILED_GEMV_MAX_TOKENS and the q8 kernel's rows, where a step can reach it).
                k, most, room = min(num_draft_tokens, COMPILED_MAX_BATCH - 1), [], COMPILED_MAX_BATCH
                while len(most) < max_batch and room > 0:
                    most.append(min(k, START_DRAFT_TOKENS, room - 1))
                    room -= 1 + most[-1]
                for drafts in {(1,), (k,), *([(1, 0), tuple(most)] if max_batch > 1 else [])}:
                    width = len(drafts) + 1 + k
                    self.execute(SchedulerOutput([ScheduledSeq(i, [i % num_blocks] * width, 0, [0] * (1 + n), True,
                                                               [0] * n) for i, n in enumerate(drafts)]))  # fmt: skip
                self._verified = None
        except Exception as error:  # no C++ compiler, or an operation the compiler does not take
            raise ConfigError(
                f"compile: torch.compile failed ({type(error).__name__}: {str(error).strip().splitlines()[0][:300]}); "
                "serve without it (the eager forward), or install a C++ compiler (g++)"
            ) from error
        self.compile_seconds = time.perf_counter() - start

    @torch.inference_mode()
    def rewind(self, accepted: list[int]) -> None:
        """After a step with drafts: end each drafted sequence's lightning states after its last token and its
        first ``accepted[i]`` drafts (in the step's order of drafted sequences), recomputed from the states before
        the step and the keys and values the step kept: one state update instead of a forward. With the C++
        kernels the states step through those tokens as decode steps would (:func:`~hyla.ops.gemv.lightning_replay`,
        one call for all layers); elsewhere in closed form (:func:`~hyla.ops.lightning.lightning_state`). The
        step's ``draft_saves`` whose tokens were all kept are written the same way, into their snapshots."""
        step, self._verified = self._verified, None
        made = {i: 1 + a for a, (i, _) in zip(accepted, step.verify, strict=True)}  # the step's tokens each keeps
        redo = [(i, made[i]) for i, s in step.verify if made[i] < s.num_tokens]
        saves = [(i, n, snapshot) for i, n, snapshot in self._draft_saves if n <= made[i]]
        if not step.kept:  # (no lightning layers: nothing to rewind or save)
            return
        if redo:
            slots = step.kept_slots[_longs([step.kept_seqs.index(i) for i, _ in redo], self.device)]
            self._replay(step, [self.states[layer] for layer in step.kept], slots, redo)
        if saves:
            snapshots = _longs([snapshot for *_, snapshot in saves], self.device)
            self._replay(step, [self.snapshots[layer] for layer in step.kept], snapshots, [(i, n) for i, n, _ in saves])

    def _replay(self, step: StepCache | VerifyCache, pools: list[Tensor], where: Tensor, segments: list) -> None:
        """Write into ``pools`` (one per lightning layer the step kept) at ``where`` each ``(seq, n)`` of
        ``segments``'s states after its first ``n`` tokens of the step, from its states before the step."""
        kept_rows = _longs([step.kept_seqs.index(i) for i, _ in segments], self.device)
        spans = [(step.starts[i], n) for i, n in segments]
        starts, counts = (_longs(list(x), self.device) for x in zip(*spans, strict=True))
        if self.lightning_decode is gemv.lightning_decode:
            befores, ks, vs, slopes = (list(x) for x in zip(*step.kept.values(), strict=True))
            gemv.lightning_replay(pools, where, befores, kept_rows, ks, vs, slopes, starts, counts)
            return
        for pool, (before, k, v, slope) in zip(pools, step.kept.values(), strict=True):
            pool[where] = lightning_state(k, v, slope, before[kept_rows], spans)

    def _copy_states(self, out: SchedulerOutput) -> None:
        """Zero the slots of requests that start from nothing; copy snapshots into those that resume."""
        if out.zero_slots:
            zero = torch.tensor(out.zero_slots, device=self.device)
            for pool in self.states.values():
                pool[zero] = 0
        if out.restores:
            snapshots, slots = (torch.tensor(x, device=self.device) for x in zip(*out.restores, strict=True))
            for layer, pool in self.states.items():
                pool[slots] = self.snapshots[layer][snapshots]


class _PagedStep:
    """What every layer of one step reads about its ``N`` requests, built once: each new token's position
    (``[1, ΣT]``) and row in the flattened ``[num_blocks * block_size]`` KV pool (``slot_mapping``), and per request
    its state slot, its context length with the new tokens and its block table (``[N, W]``, zero-padded).
    ``inside``: the ``(seq, tokens, snapshot)`` saves of the step that fall inside a sequence's new tokens, whose
    states the layers write to the snapshot pool as they run."""

    KEEP_ALL = False  # whether a step with drafts keeps every sequence's states (see __init__)

    def __init__(
        self, runner: ModelRunner, seqs: list[ScheduledSeq], inside: Sequence[tuple[int, int, int]] = ()
    ) -> None:
        self.runner = runner
        bs = runner.block_size
        ints = functools.partial(_longs, device=runner.device)

        ranges = [range(s.num_computed, s.num_computed + s.num_tokens) for s in seqs]
        self._positions = ints([p for r in ranges for p in r])[None]
        self.slot_mapping = ints([s.block_table[p // bs] * bs + p % bs for s, r in zip(seqs, ranges, strict=True)
                                  for p in r])  # fmt: skip
        self.slots = ints([s.slot for s in seqs])
        self.lengths = [s.num_tokens for s in seqs]
        self._conv_rows: tuple[Tensor, Tensor] | None = None  # short_conv's gather rows, built once a step
        self.context_lens = ints([r.stop for r in ranges])
        width = max((len(s.block_table) for s in seqs), default=0)
        self.block_tables = ints([s.block_table + [0] * (width - len(s.block_table)) for s in seqs]).view(-1, width)
        self.inside = inside
        self.starts = list(itertools.accumulate(self.lengths, initial=0))[:-1]  # each sequence's first packed row
        if inside:
            self.inside_segments = [(self.starts[i], n) for i, n, _ in inside]  # (first packed row, tokens) of each
            self.inside_slots = ints([seqs[i].slot for i, _, _ in inside])
            self.inside_snapshots = ints([snapshot for _, _, snapshot in inside])
        # The sequences with drafts (index, sequence), and those whose states each lightning layer keeps from before
        # the step, with the step's keys and values (:meth:`_keep`), for ModelRunner.rewind: the drafted ones, or
        # with KEEP_ALL every one (a tensor the size of the batch, as a compiled graph's shapes want).
        self.verify = [(i, s) for i, s in enumerate(seqs) if s.draft]
        self.kept_seqs = list(range(len(seqs))) if self.KEEP_ALL else [i for i, _ in self.verify]
        self.kept_slots = None
        if self.verify:
            self.kept_slots = self.slots if self.KEEP_ALL else ints([seqs[i].slot for i in self.kept_seqs])
        self.kept: dict[int, tuple[Tensor, Tensor, Tensor, Tensor]] = {}

    def positions(self, num_tokens: int, device: torch.device) -> Tensor:
        return self._positions

    def _keep(self, layer_idx: int, k: Tensor, v: Tensor, slope: Tensor) -> None:
        """Before a lightning layer of a step with drafts updates its states: keep what rewinding it needs."""
        if self.kept_slots is not None:  # (not the list, whose contents a compiled graph would guard on)
            self.kept[layer_idx] = (self.runner.states[layer_idx][self.kept_slots], k[0], v[0], slope)

    def short_conv(self, layer_idx: int, x: Tensor, weight: Tensor) -> Tensor:
        """The q/k convolution of ``x`` ``[1, ΣT, C]`` continuing each request's last ``K - 1`` inputs (its slot's
        history, which it updates): every tap of every token gathered at once from ``[histories; x]``."""
        history = self.runner.states[f"conv{layer_idx}"]  # [S, K - 1, C]
        flat = torch.cat((history[self.slots].flatten(0, 1), x[0]))
        if self._conv_rows is None:  # the same for every layer of the step
            self._conv_rows = self._conv_index(len(weight))
        taps, keep, inside = self._conv_rows
        history[self.slots] = flat[keep]
        if self.inside:
            self.runner.snapshots[f"conv{layer_idx}"][self.inside_snapshots] = flat[inside]
        return (flat[taps] * weight).sum(1)[None]

    def _conv_index(self, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """Rows of ``[histories; x]`` (:meth:`short_conv`): each token's ``k`` taps ``[ΣT, k]`` (tap ``j``: ``j``
        tokens back), each request's new history ``[N, k - 1]`` and the history at each of :attr:`inside`
        ``[len(inside), k - 1]``. Request ``i`` reads its history then its new tokens: position ``v`` of that
        sequence is history row ``i (k - 1) + v`` or new token ``v - (k - 1)``."""
        base, start, taps, keep, rows = len(self.lengths) * (k - 1), 0, [], [], []
        for i, n in enumerate(self.lengths):

            def row(v: int, i: int = i, start: int = start) -> int:
                return i * (k - 1) + v if v < k - 1 else base + start + v - (k - 1)

            taps += [[row(k - 1 + o - j) for j in range(k)] for o in range(n)]
            keep.append([row(n + m) for m in range(k - 1)])
            rows.append(row)
            start += n
        inside = [[rows[i](n + m) for m in range(k - 1)] for i, n, _ in self.inside]
        device = self.runner.device

        def table(values: list[list[int]], width: int) -> Tensor:  # (an empty list keeps its width)
            return torch.tensor(values, dtype=torch.long, device=device).view(len(values), width)

        return table(taps, k), table(keep, k - 1), table(inside, k - 1)

    def _write_kv(self, layer_idx: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write the new keys and values ``[1, ΣT, Hkv, D]`` into layer ``layer_idx``'s pools at each token's
        row; returns the pools."""
        k_pool, v_pool = self.runner.keys[layer_idx], self.runner.values[layer_idx]
        k_pool.view(-1, *k_pool.shape[2:]).index_copy_(0, self.slot_mapping, k[0])
        v_pool.view(-1, *v_pool.shape[2:]).index_copy_(0, self.slot_mapping, v[0])
        return k_pool, v_pool


class StepCache(_PagedStep):
    """The cache as one engine step's forward sees it (the :class:`~hyla.model.Cache` protocol): ``N`` requests
    packed into one row ``[1, ΣT]``, their per-step metadata built once here and used by every layer.

    Requests with one new token (decodes) come first and take the in-place slot-decode kernel and a batched
    paged attention with one query each; the rest (prefill chunks) take the varlen blockwise kernel from
    their slots' states and a paged attention with padded queries. No loop over requests runs in a layer.
    """

    def __init__(self, runner: ModelRunner, seqs: list[ScheduledSeq], inside: list[tuple[int, int, int]]) -> None:
        first_prefill = next((i for i, s in enumerate(seqs) if s.num_tokens > 1), len(seqs))
        if any(s.num_tokens == 1 for s in seqs[first_prefill:]):
            raise ValueError("decodes (one new token) must come before prefill chunks in a step")
        super().__init__(runner, seqs, inside)
        device = runner.device
        lengths = [s.num_tokens for s in seqs]
        self.num_decodes = sum(1 for n in lengths if n == 1)
        self.query_lens = torch.tensor(lengths, dtype=torch.long, device=device)
        prefill = lengths[self.num_decodes :]
        self.varlen = Varlen.from_lengths(prefill, device)  # the prefill chunks, planned once for every layer
        self.cu_seqlens = self.varlen.cu_seqlens
        # Prefill queries padded to [P, Tmax]: the packed index of each (padding repeats the last real token).
        t_max = max(prefill, default=0)
        starts = self.cu_seqlens[:-1, None] + self.num_decodes
        offsets = torch.arange(t_max, device=device)[None]
        self.query_index = starts + torch.minimum(offsets, self.query_lens[self.num_decodes :, None] - 1)
        self.query_valid = offsets < self.query_lens[self.num_decodes :, None]

    def lightning(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, slope: Tensor) -> Tensor:
        pool = self.runner.states[layer_idx]
        self._keep(layer_idx, k, v, slope)
        if self.inside:  # the states at boundaries inside prefill chunks, from the states before the step
            before = pool[self.inside_slots]
            self.runner.snapshots[layer_idx][self.inside_snapshots] = lightning_state(
                k[0], v[0], slope, before, self.inside_segments
            )
        nd = self.num_decodes
        out = torch.empty_like(q)  # [1, ΣT, H, D]
        if nd:
            out[0, :nd] = self.runner.lightning_decode(q[0, :nd], k[0, :nd], v[0, :nd], slope, pool, self.slots[:nd])
        if nd < self.slots.numel():
            slots = self.slots[nd:]
            o, states = lightning_attention(q[:, nd:], k[:, nd:], v[:, nd:], slope, pool[slots], cu_seqlens=self.varlen)
            pool[slots] = states
            out[:, nd:] = o
        return out

    def attention(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        k_pool, v_pool = self._write_kv(layer_idx, k, v)
        nd = self.num_decodes
        out = torch.empty_like(q)  # [1, ΣT, H, D]
        if nd:
            o = paged_attention(
                q[0, :nd, None], k_pool, v_pool, self.block_tables[:nd], self.context_lens[:nd], self.query_lens[:nd]
            )
            out[0, :nd] = o[:, 0]
        if nd < self.slots.numel():
            o = paged_attention(
                q[0][self.query_index],
                k_pool,
                v_pool,
                self.block_tables[nd:],
                self.context_lens[nd:],
                self.query_lens[nd:],
            )
            out[0, nd:] = o[self.query_valid]
        return out


class DecodeCache(_PagedStep):
    """The cache of a step of ``B`` decodes only (one new token each), as tensors alone: what a compiled forward
    takes, one graph for every ``B`` from 2 and every block-table width (:meth:`mark_dynamic`). The same
    kernels as :class:`StepCache`'s decodes."""

    def mark_dynamic(self, *per_token: Tensor) -> None:
        """Let the compiler treat the block-table width, from two requests the batch and from two new tokens their
        number as any size: no recompilation as contexts grow or requests come and go. ``per_token``: more
        ``[ΣT]`` inputs."""
        torch._dynamo.maybe_mark_dynamic(self.block_tables, 1)
        if len(self.slots) > 1:
            for x in self._per_request():
                torch._dynamo.maybe_mark_dynamic(x, 0)
        if self._positions.shape[1] > 1:
            for x in (self.slot_mapping, *self._per_token(), *per_token):
                torch._dynamo.maybe_mark_dynamic(x, 0)
            torch._dynamo.maybe_mark_dynamic(self._positions, 1)

    def _per_request(self) -> tuple[Tensor, ...]:
        return self.slots, self.block_tables, self.context_lens

    def _per_token(self) -> tuple[Tensor, ...]:
        return ()

    def lightning(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, slope: Tensor) -> Tensor:
        return self.runner.lightning_decode(q[0], k[0], v[0], slope, self.runner.states[layer_idx], self.slots)[None]

    def attention(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        k_pool, v_pool = self._write_kv(layer_idx, k, v)
        ones = torch.ones_like(self.context_lens)
        return paged_attention(q[0, :, None], k_pool, v_pool, self.block_tables, self.context_lens, ones)[None, :, 0]


class VerifyCache(DecodeCache):
    """The cache of a step of decodes of which some carry drafts: each sequence's last token and its drafts, every
    one sampled — what the compiled verify step takes (the batch, the new tokens and the longest sequence's
    tokens of any size). A lightning layer runs each sequence's tokens in order through the decode kernel (rows of
    one slot consecutive, :func:`~hyla.ops.gemv.lightning_decode`), as that many decode steps would, keeping the
    states before the step for :meth:`ModelRunner.rewind`; a softmax layer attends with each sequence's queries
    padded to the longest. Only with the C++ decode kernel (the reference for other devices: :class:`StepCache`)."""

    KEEP_ALL = True

    def __init__(self, runner: ModelRunner, seqs: list[ScheduledSeq]) -> None:
        super().__init__(runner, seqs)
        ints = functools.partial(_longs, device=runner.device)
        lengths, t_max, starts = self.lengths, max(self.lengths), self.starts
        self.token_slots = ints([s.slot for s in seqs for _ in range(s.num_tokens)])  # [ΣT]
        self.query_lens = ints(lengths)
        # Each sequence's queries padded to [N, Tmax] (padding repeats its last token), and where each new token's
        # output lands in the flattened [N * Tmax] outputs.
        self.query_index = ints(
            [[start + min(j, n - 1) for j in range(t_max)] for start, n in zip(starts, lengths, strict=True)]
        )
        self.query_rows = ints([i * t_max + j for i, n in enumerate(lengths) for j in range(n)])

    def _per_request(self) -> tuple[Tensor, ...]:
        return *super()._per_request(), self.query_lens, self.query_index

    def _per_token(self) -> tuple[Tensor, ...]:
        return self.token_slots, self.query_rows

    def mark_dynamic(self, *per_token: Tensor) -> None:
        super().mark_dynamic(*per_token)
        torch._dynamo.maybe_mark_dynamic(self.query_index, 1)

    def lightning(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, slope: Tensor) -> Tensor:
        self._keep(layer_idx, k, v, slope)
        pool = self.runner.states[layer_idx]
        return self.runner.lightning_decode(q[0], k[0], v[0], slope, pool, self.token_slots)[None]

    def attention(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        k_pool, v_pool = self._write_kv(layer_idx, k, v)
        o = paged_attention(q[0][self.query_index], k_pool, v_pool, self.block_tables, self.context_lens,
                            self.query_lens)  # fmt: skip
        return o.flatten(0, 1)[self.query_rows][None]
