"""Linear layers prepared for CPU inference: modules that own a packed (oneDNN) or int8 (fbgemm) copy of their
weight, swapped in for ``nn.Linear`` by :func:`prepare_for_cpu_inference`.

The parameters stay the same tensors (``state_dict`` and saving are unchanged). The copy costs the dense weight's
memory once more, is made again when the weight changes (in place or replaced), and is not used where autograd
needs the weight's gradient. The serving engine prepares its model this way; measurements in RESULTS.md.
"""

from __future__ import annotations

import itertools
import weakref
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hyla.ops.linear import can_pack, int8_linear, pack, packed_linear, quantize_int8

QUANTIZE = (None, "int8")


class _Copies(dict):
    """A layer's prepared copy of its weight, keyed by ``(data_ptr, version)`` of the weight it was made from. A
    deep-copied layer starts with none (its weight is another tensor; it prepares its own on first use)."""

    def __deepcopy__(self, memo: dict) -> _Copies:
        return _Copies()


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` (the same parameters) computing through a oneDNN-packed copy of its weight
    (:func:`~hyla.ops.linear.packed_linear`): faster small-batch products on the CPU. One row, as in a decode step
    of one request, runs through the plain (transposed) weight, which is as fast."""

    def __init__(self, linear: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self._copies = _Copies()
        # What a compiled graph reads (no data pointers inside one): the copy made by prepare_for_compile().
        self.compiled: Tensor | None = None

    def prepared(self) -> Tensor | object:
        """The prepared copy of the weight as it is now, made if the weight changed."""
        key = (self.weight.data_ptr(), self.weight._version)  # which tensor, and how often changed in place
        if key not in self._copies:  # changed or replaced (an optimizer step, a load), or a deep copy
            self._copies.clear()
            self._copies[key] = self._prepare()
        return self._copies[key]

    def _prepare(self) -> Tensor | object:
        return pack(self.weight)

    def prepare_for_compile(self) -> None:
        """Fix the copy a ``torch.compile`` graph of this layer reads."""
        self.compiled = self.prepared()

    def forward(self, x: Tensor) -> Tensor:
        one_row = x.numel() <= x.shape[-1]
        if torch.compiler.is_compiling():
            if one_row or self.compiled is None:
                return F.linear(x, self.weight, self.bias)
            return packed_linear(x, self.compiled, self.bias)
        if one_row or (torch.is_grad_enabled() and self.weight.requires_grad):  # autograd needs the plain product
            return F.linear(x, self.weight, self.bias)
        return packed_linear(x, self.prepared(), self.bias)


class Int8Linear(PackedLinear):
    """An ``nn.Linear`` (the same parameters) computing through an int8 copy of its weight with one scale per
    output row (:func:`~hyla.ops.linear.int8_linear`), for every row count; within ~1-2% of the float product."""

    # Layers by token, for compiled graphs: fbgemm's packed weight cannot be a graph input, so the graph's opaque
    # op carries the layer's token and finds the layer (weakly held: a collected layer leaves no entry).
    _by_token: ClassVar[weakref.WeakValueDictionary[int, Int8Linear]] = weakref.WeakValueDictionary()
    _tokens: ClassVar[itertools.count] = itertools.count()

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear)
        self.token = next(Int8Linear._tokens)
        Int8Linear._by_token[self.token] = self

    def __deepcopy__(self, memo: dict) -> Int8Linear:
        twin = Int8Linear(self)  # a token of its own
        memo[id(self)] = twin
        twin.weight = nn.Parameter(self.weight.detach().clone(), requires_grad=self.weight.requires_grad)
        if self.bias is not None:
            twin.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=self.bias.requires_grad)
        return twin

    def _prepare(self) -> object:
        return quantize_int8(self.weight, self.bias)

    def forward(self, x: Tensor) -> Tensor:
        if torch.compiler.is_compiling():
            if self.compiled is None:
                return F.linear(x, self.weight, self.bias)
            out = _int8_mm(x.reshape(-1, x.shape[-1]).float(), self.token, self.out_features)
            return out.view(*x.shape[:-1], self.out_features)
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return F.linear(x, self.weight, self.bias)
        return int8_linear(x, self.prepared())


@torch.library.custom_op("hyla::int8_mm", mutates_args=())
def _int8_mm(x: Tensor, token: int, out_features: int) -> Tensor:
    """The int8 product of the :class:`Int8Linear` with ``token``, one opaque operation inside ``torch.compile``."""
    return torch.ops.quantized.linear_dynamic(x, Int8Linear._by_token[token].compiled, True)


@_int8_mm.register_fake
def _(x: Tensor, token: int, out_features: int) -> Tensor:
    return x.new_empty(x.shape[0], out_features)


def prepare_for_cpu_inference(model: nn.Module, quantize: str | None = None) -> nn.Module:
    """``model`` for small-batch CPU inference, in place: every matrix stored transposed
    (:func:`transpose_weights`), and every ``nn.Linear`` whose weight oneDNN takes swapped for a
    :class:`PackedLinear` (``quantize="int8"``: :class:`Int8Linear`). Returns the model (a new module if ``model``
    itself is an ``nn.Linear``)."""
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {QUANTIZE}, got {quantize!r}")
    kind = Int8Linear if quantize == "int8" else PackedLinear
    transpose_weights(model)
    if type(model) is nn.Linear:
        return kind(model) if can_pack(model.weight) else model
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and can_pack(child.weight):
                setattr(parent, name, kind(child))
    return model


def prepare_copies(model: nn.Module) -> None:
    """Make every prepared layer's copy now (an engine that batches does it at start: made on first use instead,
    the LM head's copy stalled the first step in which two sequences sample together; measured in RESULTS.md)."""
    for module in model.modules():
        if isinstance(module, PackedLinear):
            module.prepared()


def prepare_for_compile(model: nn.Module) -> None:
    """Fix the prepared copies that a ``torch.compile`` graph of ``model`` reads."""
    for module in model.modules():
        if isinstance(module, PackedLinear):
            module.prepare_for_compile()


def transpose_weights(model: nn.Module) -> None:
    """Store every weight matrix transposed (same values and shape, column-major strides), in place.

    ``linear(x, W)`` multiplies by ``W.t()``; with ``W.t()`` contiguous, the CPU's small-batch matmuls of a
    decode step run faster (measured in RESULTS.md). Embedding tables keep their rows.
    """
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            continue
        for p in module.parameters(recurse=False):
            if p.dim() >= 2 and p.stride(-1) == 1:
                p.data = p.data.transpose(-1, -2).contiguous().transpose(-1, -2)
