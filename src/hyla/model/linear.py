"""Linear layers and experts prepared for CPU inference: modules that own a packed (oneDNN) or int8 (fbgemm) copy
of their weights, swapped in for ``nn.Linear`` and for the experts of a ``SparseMoE`` by
:func:`prepare_for_cpu_inference`.

The parameters stay the same tensors (``state_dict`` and saving are unchanged). A float32 copy costs the weights'
memory once more, is made again when the weight changes (in place or replaced), and is not used where autograd
needs the weight's gradient. The serving engine prepares its model this way; measurements in RESULTS.md.
"""

from __future__ import annotations

import copy
import itertools
import weakref
from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hyla.model.moe import SparseMoE
from hyla.ops.gemv import available as gemv_available
from hyla.ops.gemv import experts_q8, gemv, gemv_q8
from hyla.ops.linear import Int8Weight, can_pack, int8_linear, pack, packed_linear, q8_max_rows, quantize_int8
from hyla.ops.moe import Q8Experts, prepare_experts, prepared_swiglu_experts, q8_experts, swiglu_experts

QUANTIZE = (None, "int8")


class _Copies(dict):
    """A layer's prepared copy of its weights, keyed by ``(data_ptr, version)`` of each weight it was made from. A
    deep-copied layer starts with none (its weights are other tensors; it prepares its own on first use)."""

    def __deepcopy__(self, memo: dict) -> _Copies:
        return _Copies()

    def current(self, weights: tuple[Tensor, ...], make: Callable[[], object]) -> object:
        """The copy of ``weights`` as they are now: ``make()``'s, made again when one changed (in place or
        replaced: an optimizer step, a load) or on first use."""
        key = tuple((w.data_ptr(), w._version) for w in weights)  # which tensors, and how often changed in place
        if key not in self:
            self.clear()
            self[key] = make()
        return self[key]


PACKED_ONE_ROW_MIN_WEIGHTS = 2**20
# Without the gemv kernel, one row (a decode step of one request) runs through the packed copy only from this many
# weights: below, the plain (transposed) weight is as fast; above, the packed one wins (a whole decode step of
# `medium` measured in RESULTS.md, "Reading the 2026-12-03 measurements").


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` (the same parameters) computing through a oneDNN-packed copy of its weight
    (:func:`~hyla.ops.linear.packed_linear`): faster small-batch products on the CPU. One row, as in a decode step
    of one request, runs through :func:`~hyla.ops.gemv.gemv` on the plain (transposed) weight where the kernel was
    built (``use_gemv``, set by :func:`prepare_for_cpu_inference`), else through ``F.linear`` on it when the weight
    is small (:data:`PACKED_ONE_ROW_MIN_WEIGHTS`) and the packed copy when it is large."""

    def __init__(self, linear: nn.Linear, use_gemv: bool = False) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.use_gemv = use_gemv
        self._copies = _Copies()

    def prepared(self) -> Tensor | object:
        """The prepared copy of the weight as it is now, made if the weight changed."""
        return self._copies.current((self.weight,), self._prepare)

    def _prepare(self) -> Tensor | object:
        return pack(self.weight)

    def prepare_for_compile(self) -> None:
        """Fix what a ``torch.compile`` graph of this layer reads: nothing here (a graph multiplies by the plain,
        transposed weight)."""

    def forward(self, x: Tensor) -> Tensor:
        compiling = torch.compiler.is_compiling()
        if not compiling and torch.is_grad_enabled() and self.weight.requires_grad:  # autograd: the plain product
            return F.linear(x, self.weight, self.bias)
        one_row = x.numel() == x.shape[-1]  # (none: the packed path takes an empty input)
        if one_row and self.use_gemv and self.weight.t().is_contiguous():
            return gemv(x, self.weight, self.bias)
        # In a compiled graph, several rows take the graph's own product (inductor's GEMM on the transposed weight,
        # no Python between: decode steps of 8 requests 1.07-1.17x faster than the packed copy behind a Python
        # custom operator, RESULTS.md).
        if compiling or (one_row and self.weight.numel() < PACKED_ONE_ROW_MIN_WEIGHTS):
            return F.linear(x, self.weight, self.bias)
        return packed_linear(x, self.prepared(), self.bias)


class _Tokened:
    """A module that compiled graphs find by an integer token: fbgemm's packed weights cannot be graph inputs, so
    the graph's opaque op carries the module's token and looks the module up (weakly held: a collected module
    leaves no entry). Every instance, a deep copy included, has its own token."""

    _by_token: ClassVar[weakref.WeakValueDictionary[int, nn.Module]] = weakref.WeakValueDictionary()
    _tokens: ClassVar[itertools.count] = itertools.count()

    def _register(self) -> None:
        self.token = next(_Tokened._tokens)
        _Tokened._by_token[self.token] = self

    def _twin(self) -> nn.Module:
        """A module like this one: the same parameters, a token of its own, no copies yet."""
        return type(self)(self)

    def __deepcopy__(self, memo: dict) -> nn.Module:
        twin = self._twin()
        memo[id(self)] = twin
        for name, p in self.named_parameters(recurse=False):
            setattr(twin, name, nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
        for name, child in self.named_children():
            setattr(twin, name, copy.deepcopy(child, memo))
        return twin


class Int8Linear(_Tokened, PackedLinear):
    """An ``nn.Linear`` (the same parameters) computing through an int8 copy of its weight with one scale per
    output row (:func:`~hyla.ops.linear.int8_linear`), for every row count; within ~1-2% of the float product."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear)
        # What a compiled graph reads (no data pointers inside one): the int8 copy made by prepare_for_compile(),
        # and of it what the graph's products of up to compiled_q8_rows rows read (the q8 kernel's weight, scales,
        # bias).
        self.compiled: Int8Weight | None = None
        self.compiled_q8: tuple[Tensor, Tensor, Tensor | None] | None = None
        self.compiled_q8_rows = 0
        self._register()

    def _prepare(self) -> object:
        return quantize_int8(self.weight, self.bias)

    def prepare_for_compile(self) -> None:
        self.compiled = w = self.prepared()
        self.compiled_q8, self.compiled_q8_rows = (w.layout, w.scale, w.bias), q8_max_rows(w.layout.numel())

    def forward(self, x: Tensor) -> Tensor:
        if torch.compiler.is_compiling():
            if self.compiled is None:
                return F.linear(x, self.weight, self.bias)
            if x.numel() <= self.compiled_q8_rows * x.shape[-1]:  # a decode step's rows: a C++ operator, as int8_linear
                return gemv_q8(x.float(), *self.compiled_q8)
            out = _int8_mm(x.reshape(-1, x.shape[-1]).float(), self.token, self.out_features)
            return out.view(*x.shape[:-1], self.out_features)
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return F.linear(x, self.weight, self.bias)
        return int8_linear(x, self.prepared())


@torch.library.custom_op("hyla::int8_mm", mutates_args=())
def _int8_mm(x: Tensor, token: int, out_features: int) -> Tensor:
    """The int8 product of the :class:`Int8Linear` with ``token``, one opaque operation inside ``torch.compile``."""
    return int8_linear(x, _Tokened._by_token[token].compiled)


@_int8_mm.register_fake
def _(x: Tensor, token: int, out_features: int) -> Tensor:
    return x.new_empty(x.shape[0], out_features)


PACKED_COMPILED_MIN_WEIGHTS = 2**20
# Compiled graphs of several tokens run the experts through the packed copies (one opaque op) when an expert's
# gate/up matrix has this many weights: the graph's own products gather one copy of an expert's matrices per
# (token, expert) pair. `medium` (2^21 weights), a decode step of 2 / 8 requests: 68.9 / 126.4 ms in the graph,
# 50.1 / 68.7 ms with the copies; `small` (2^18): 9.7 / 15.9 ms in the graph, 12.2 / 16.6 with the copies
# (`benchmarks/compiled_experts.py`, RESULTS.md).


class PreparedSparseMoE(_Tokened, SparseMoE):
    """A :class:`~hyla.model.moe.SparseMoE` (the same parameters and router) whose experts compute through prepared
    copies of their matrices (:func:`~hyla.ops.moe.prepared_swiglu_experts`) where no gradient is needed:
    ``kind="packed"`` (oneDNN's layout, float32: the same values) or ``"int8"``. The copies are made again when the
    expert weights change, as :class:`PackedLinear`'s. Packed, the copies serve eager steps of two tokens and more
    and compiled ones of large experts (:data:`PACKED_COMPILED_MIN_WEIGHTS`) past
    :data:`~hyla.ops.moe.COMPILED_GEMV_MAX_TOKENS` tokens (one token, and in a compiled graph up to that many, run
    through the gemv kernel on the plain, transposed weights where it was built: ``use_gemv``) and cost the
    experts' memory once more."""

    def __init__(self, moe: SparseMoE, kind: str, use_gemv: bool = False) -> None:
        nn.Module.__init__(self)
        self.top_k, self.gate = moe.top_k, moe.gate
        self.gate_up_proj, self.down_proj = moe.gate_up_proj, moe.down_proj
        self.kind, self.use_gemv = kind, use_gemv
        # Whether compiled graphs of several tokens compute through the copies (int8: always).
        self.compiled_copies = kind == "int8" or self.gate_up_proj[0].numel() >= PACKED_COMPILED_MIN_WEIGHTS
        self._copies = _Copies()
        self.compiled: list[tuple[object, object]] | None = None
        # A decode step's int8 experts in a compiled graph: every expert's q8 weights (q8_experts) where the kernel
        # takes them.
        self.compiled_q8: Q8Experts | None = None
        self._register()

    def _twin(self) -> nn.Module:
        return PreparedSparseMoE(self, self.kind, self.use_gemv)

    def prepared(self) -> list[tuple[object, object]]:
        """The copies of the experts as they are now, made if a weight changed."""
        return self._current()[0]

    def _current(self) -> tuple[list[tuple[object, object]], Q8Experts | None]:
        """The copies as they are now and, made with them, what a decode step's int8 products read
        (:func:`q8_experts`; None for packed copies or where the q8 kernel does not take them)."""
        weights = (self.gate_up_proj, self.down_proj)

        def make() -> tuple[list[tuple[object, object]], Q8Experts | None]:
            copies = prepare_experts(*weights, self.kind)
            return copies, q8_experts(copies) if self.kind == "int8" else None

        return self._copies.current(weights, make)

    def prepare_for_compile(self) -> None:
        """Fix the copies a ``torch.compile`` graph of this block reads."""
        self.compiled, self.compiled_q8 = self._current()

    def experts(self, x: Tensor, weights: Tensor, experts: Tensor) -> Tensor:
        compiling = torch.compiler.is_compiling()
        if not compiling and torch.is_grad_enabled() and self.gate_up_proj.requires_grad:
            return swiglu_experts(x, weights, experts, self.gate_up_proj, self.down_proj)
        if self.kind == "packed" and (
            x.shape[0] == 1 or (compiling and (self.gemv_takes(x) or not self.compiled_copies))
        ):
            # One token: gemv on the plain weights. In a compiled graph, a few tokens too (each chosen expert read
            # once for all of them), and small experts keep the graph's own products for more.
            return super().experts(x, weights, experts)
        copies, q8 = (self.compiled, self.compiled_q8) if compiling else self._current()
        if q8 is not None and x.shape[0] <= q8.max_rows:  # a decode step's int8 tokens: one call (a C++ operator)
            return experts_q8(x.float(), weights.float(), experts, q8.gate_up, q8.down).to(x.dtype)
        if compiling:
            if copies is None:
                return swiglu_experts(x, weights, experts, self.gate_up_proj, self.down_proj)
            return _prepared_experts(x.float(), weights.float(), experts, self.token).to(x.dtype)
        return prepared_swiglu_experts(x, weights, experts, copies, self.kind).to(x.dtype)


@torch.library.custom_op("hyla::prepared_experts", mutates_args=())
def _prepared_experts(x: Tensor, weights: Tensor, experts: Tensor, token: int) -> Tensor:
    """The experts of the :class:`PreparedSparseMoE` with ``token``, one opaque operation inside
    ``torch.compile``."""
    moe = _Tokened._by_token[token]
    return prepared_swiglu_experts(x, weights, experts, moe.compiled, moe.kind)


@_prepared_experts.register_fake
def _(x: Tensor, weights: Tensor, experts: Tensor, token: int) -> Tensor:
    return torch.empty_like(x)


def prepare_for_cpu_inference(model: nn.Module, quantize: str | None = None) -> nn.Module:
    """``model`` for small-batch CPU inference, in place: every matrix stored transposed (:func:`transpose_weights`),
    every ``nn.Linear`` whose weight oneDNN takes swapped for a :class:`PackedLinear` and every ``SparseMoE`` for a
    :class:`PreparedSparseMoE` with packed experts (``quantize="int8"``: :class:`Int8Linear`, int8 experts). Where
    the gemv kernel builds (:func:`hyla.ops.gemv.available`), the layers and the experts run their one-row
    products through it (float32 on the plain weights, ``use_gemv``; int8 inside
    :func:`~hyla.ops.linear.int8_linear`). Returns the model (a new module if ``model`` itself is an
    ``nn.Linear``)."""
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {QUANTIZE}, got {quantize!r}")
    transpose_weights(model)
    packable = any(type(m) is nn.Linear and can_pack(m.weight) for m in model.modules())
    use_gemv = quantize is None and packable and gemv_available()  # (builds the kernel once)

    def swap(linear: nn.Linear) -> nn.Linear:
        return Int8Linear(linear) if quantize == "int8" else PackedLinear(linear, use_gemv)

    if type(model) is nn.Linear:
        return swap(model) if can_pack(model.weight) else model
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is SparseMoE and can_pack(child.gate_up_proj[0]):
                setattr(parent, name, PreparedSparseMoE(child, quantize or "packed", use_gemv))
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and can_pack(child.weight):
                setattr(parent, name, swap(child))
    return model


PREPARED = (PackedLinear, PreparedSparseMoE)  # the modules that own prepared copies of their weights


def prepare_copies(model: nn.Module) -> None:
    """Make every prepared layer's copy now (an engine that batches does it at start: made on first use instead,
    the LM head's copy stalled the first step in which two sequences sample together; measured in RESULTS.md)."""
    for module in model.modules():
        if isinstance(module, PREPARED):
            module.prepared()


def prepare_for_compile(model: nn.Module) -> None:
    """Fix the prepared copies that a ``torch.compile`` graph of ``model`` reads."""
    for module in model.modules():
        if isinstance(module, PREPARED):
            module.prepare_for_compile()


def transpose_weights(model: nn.Module) -> None:
    """Store every weight matrix transposed (same values and shape, column-major strides), in place.

    ``linear(x, W)`` multiplies by ``W.t()``; with ``W.t()`` contiguous, the CPU's small-batch matmuls of a
    decode step run faster (measured in RESULTS.md), and :func:`hyla.ops.gemv.gemv` reads it in long runs.
    Embedding tables keep their rows.
    """
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            continue
        for p in module.parameters(recurse=False):
            if p.dim() >= 2 and p.stride(-1) == 1:
                p.data = p.data.transpose(-1, -2).contiguous().transpose(-1, -2)
