"""What module rules, core's and plugins', build on: copying a module safely, which constant inputs a
module can fold and adding them to its bias, and which entries of a weight are non-zero.

Public for plugins (``from speedup.rules.toolkit import clone_module, foldable, ...``); multi-head
modules also have :mod:`speedup.rules.heads`.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from ..boolean import any_along
from ..cloning import clone_module
from ..graph import Node, Origin, TensorValue
from ..propagation import Analysis
from ..rule import DimConst

__all__ = ["NonzeroPattern", "added_to_bias", "clone_module", "demand_computed", "equal_parts", "first_input",
           "foldable", "param_data"]


def first_input(node: Node) -> TensorValue:
    for arg in list(node.args) + list(node.kwargs.values()):
        if isinstance(arg, TensorValue):
            return arg
    raise ValueError(f"{node.describe()} was called without a tensor input")


def demand_computed(ctx: Analysis, operand: object, masks: Optional[dict[int, torch.Tensor]] = None) -> None:
    """Needs the entries ``masks`` selects (unnamed dimensions whole) of a weight-like operand the model
    computes during the call (a modulated scale, a standardised filter, a table made from the input):
    what computed it must keep them. An operand the model holds (a parameter, kept by its links) or no
    tensor at all needs nothing."""
    if isinstance(operand, TensorValue) and operand.origin is not Origin.PARAMETER:
        ctx.demand(operand, masks)


def foldable(ctx: Analysis, node: Node, x: TensorValue, dim: int) -> torch.Tensor:
    """Entries of ``x`` along ``dim`` that are constant in every call of this module, with equal values.

    A module can absorb such an input entry into its bias, so it does not need it. A module called
    twice with different constants there could not fold both, so those entries stay.
    """
    consts = ctx.const(x, dim)
    if consts is None:
        return torch.zeros(x.shape[x.dim(dim)], dtype=torch.bool)
    if node.scope in ctx.no_fold:
        return consts.zero
    mask = consts.mask.clone()
    position = node.inputs.index(x)  # the tensors of its arguments in order (a packed sequence's too)
    for other in ctx.graph.module_calls.get(node.scope, []):
        if other is node:
            continue
        others = other.inputs
        if position >= len(others) or others[position].shape != x.shape:
            return torch.zeros_like(mask)
        theirs: Optional[DimConst] = ctx.const(others[position], dim)
        if theirs is None:
            return torch.zeros_like(mask)
        mask &= theirs.mask & (theirs.value == consts.value)
    return mask


def param_data(node: Node, name: str) -> Optional[torch.Tensor]:
    value = node.params.get(name)
    return value.host() if value is not None else None


class NonzeroPattern:
    """Which entries of an ``(out, in)`` weight (or ``(out, in, *kernel)``: any tap) are not zero,
    answering "which rows read these columns" and "which columns do these rows read".

    Masks usually remove whole rows or columns; then the non-zeros are exactly the rows with a
    non-zero times the columns with one, and every question costs two vector operations instead of
    a pass over the weight. Otherwise the full boolean matrix answers.
    """

    def __init__(self, nonzero: torch.Tensor):
        self.rows = any_along(nonzero, 1)
        self.cols = any_along(nonzero, 0)
        outer = int(torch.count_nonzero(self.rows)) * int(torch.count_nonzero(self.cols))
        self.full: Optional[torch.Tensor] = None if int(torch.count_nonzero(nonzero)) == outer else nonzero

    @classmethod
    def of(cls, ctx: Analysis, weight: TensorValue, out_dim: int = 0) -> "NonzeroPattern":
        """The pattern of a weight with output rows along ``out_dim`` (0 or 1); from its mask when it has one."""
        return ctx.memo(("nonzero-pattern", weight.index, out_dim), lambda: cls._build(ctx, weight, out_dim))

    @classmethod
    def _build(cls, ctx: Analysis, weight: TensorValue, out_dim: int) -> "NonzeroPattern":
        pattern = ctx.mask_pattern(weight)
        if pattern is None:
            nonzero = weight.host() != 0
            if nonzero.dim() > 2:  # a kernel: is any of its taps not zero
                nonzero = any_along(nonzero.flatten(2), 2)
            return cls(nonzero if out_dim == 0 else nonzero.t())
        built = cls.__new__(cls)
        built.rows, built.cols = pattern.kept(out_dim), pattern.kept(1 - out_dim)
        built.full = None if pattern.separable else (pattern.pair if out_dim == 0 else pattern.pair.t())
        return built

    def rows_reading(self, columns: torch.Tensor) -> torch.Tensor:
        """Rows with a non-zero weight in one of ``columns`` (boolean over the input)."""
        if self.full is None:
            return self.rows & bool((self.cols & columns).any())
        return any_along(self.full & columns, 1)

    def columns_read_by(self, rows: torch.Tensor) -> torch.Tensor:
        """Columns with a non-zero weight in one of ``rows`` (boolean over the output)."""
        if self.full is None:
            return self.cols & bool((self.rows & rows).any())
        return any_along(self.full & rows[:, None], 0)


def added_to_bias(bias: Optional[torch.Tensor], extra: Optional[torch.Tensor], like: torch.Tensor):
    """``bias + extra``: constants folded into a layer's bias (summed in float64, cast like ``like``).

    ``extra`` None returns ``bias`` as it is; a layer without a bias gets one holding ``extra``.
    The result lives on ``like``'s device, whatever device ``extra`` was computed on.
    """
    if extra is None:
        return bias
    extra = extra.to(device=like.device, dtype=torch.float64)
    base = bias.detach().to(torch.float64) if bias is not None else torch.zeros_like(extra)
    return nn.Parameter((base + extra).to(like.dtype), requires_grad=like.requires_grad)


def equal_parts(ctx: Analysis, x: TensorValue, dim: int, size: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """Cuts ``x``'s dimension into equal parts of ``size`` entries: entry ``e`` exists when part
    ``e // size`` and position ``e % size`` both do. Returns the atoms of the parts and of the
    positions (the caller pins what its code cannot lose: a split its parts, a group norm its
    positions); None where the dimension keeps its size."""
    atoms = ctx.atoms(x, dim)
    if atoms is None:
        return None
    ctx.accept(x, dim)
    parts, positions = ctx.fresh(x.shape[dim] // size), ctx.fresh(size)
    entries = torch.arange(x.shape[dim])
    ctx.define(atoms, torch.stack([parts[entries // size], positions[entries % size]], 1))
    return parts, positions


def same_along(tensor: torch.Tensor, dims: Iterable[int]) -> bool:
    """Whether ``tensor`` holds the same values, up to round-off, at every index of one of ``dims`` (of
    two entries or more): compared on its first two slices first, and read whole only where those agree.

    Up to round-off: a matrix product may round equal rows of its input differently (its kernel blocks
    them; torch 2.13 on an AMD EPYC does), and what matters is whether the dummy made them equal."""
    for d in dims:
        if tensor.shape[d] < 2:
            continue
        first = tensor.narrow(d, 0, 1)
        if _equal_to(first, tensor.narrow(d, 1, 1)) and _equal_to(first, tensor):
            return True
    return False


_ROUND_OFF = 64
"""Units in the last place, of the largest entry, within which two entries count as equal."""


def _equal_to(reference: torch.Tensor, tensor: torch.Tensor) -> bool:
    """Whether every entry of ``tensor`` equals ``reference`` (broadcast), floats up to round-off."""
    if not tensor.is_floating_point():
        return bool((tensor == reference).all())
    scale = float(reference.abs().amax()) if reference.numel() else 0.0
    return bool(((tensor - reference).abs() <= torch.finfo(tensor.dtype).eps * _ROUND_OFF * scale).all())
