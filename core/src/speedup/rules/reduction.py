"""Reductions and softmax.

A reduction over a dimension reads every entry of it. Only ``sum`` (and norms) ignore zero entries,
so only there may zero entries of the reduced dimension go; a mean would divide by a different
count and a max might lose its argument, so their reduced dimensions keep their size. Reduced
dimensions that are not prunable (spatial, sequence) are the common case and cost nothing.

A constant slice stays a constant where its result does not depend on how many entries were reduced
(a mean, a maximum): those dimensions may have other sizes on other inputs, so a sum of a non-zero
constant, or a softmax's ``1 / n``, is not folded as one.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch

from ..graph import Node, TensorValue
from ..propagation import Analysis
from ..rule import DimConst, OpRule, bind
from .toolkit import same_along

# How a constant slice ``v`` over ``n`` reduced elements reduces, per operator.
_CONSTANT_RESULT: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "sum": lambda v, n: v * n,
    "nansum": lambda v, n: v * n,
    "mean": lambda v, n: v,
    "nanmean": lambda v, n: v,
    "amax": lambda v, n: v,
    "amin": lambda v, n: v,
    "max": lambda v, n: v,
    "min": lambda v, n: v,
    "var": lambda v, n: torch.zeros_like(v),
    "std": lambda v, n: torch.zeros_like(v),
    "prod": lambda v, n: v ** n,
    "logsumexp": lambda v, n: v + math.log(n),
    "var_mean": lambda v, n: torch.zeros_like(v),  # of its first result, the variance
    "std_mean": lambda v, n: torch.zeros_like(v),
    "median": lambda v, n: v,
    "nanmedian": lambda v, n: v,
    "kthvalue": lambda v, n: v,
    "mode": lambda v, n: v,
    "aminmax": lambda v, n: v,  # of both results, the minimum and the maximum
    "count_nonzero": lambda v, n: (v != 0).to(torch.float64) * n,
}
_NORMS = {"linalg_vector_norm", "norm"}
_WITH_MEAN = {"var_mean", "std_mean"}
"""Reductions returning the mean besides their first result."""


class Reduction(OpRule):
    """``sum``, ``mean``, ``amax``, ``var``, ``argmax``... over some dimensions, with or without ``keepdim``."""

    def _layout(self, node: Node) -> tuple[TensorValue, list[int], dict[int, int]]:
        x = node.args[0]
        a = bind(node)
        dims = a.get("dim")
        if dims is None or dims == []:
            reduced = list(range(x.ndim))
        else:
            reduced = sorted({d % x.ndim for d in (dims if isinstance(dims, (list, tuple)) else [dims])})
        keep = bool(a.get("keepdim", False))
        kept, position = {}, 0
        for d in range(x.ndim):
            if d in reduced:
                position += keep
            else:
                kept[d] = position
                position += 1
        return x, reduced, kept

    def couple(self, node: Node, ctx: Analysis) -> None:
        x, reduced, kept = self._layout(node)
        for out in node.outputs:
            for d, od in kept.items():
                ctx.link(x, d, out, od)
        if _ignores_zeros(node):
            for d in reduced:
                ctx.accept(x, d)

    def picks_by_rank(self, node: Node) -> bool:
        name = node.target._opname
        if name in ("argmax", "argmin"):
            return True
        return (name in ("max", "min", "median", "nanmedian", "kthvalue", "mode") and len(node.outputs) == 2
                and bool(node.outputs[1].consumers))  # the positions picked, read

    def forward(self, node: Node, ctx: Analysis) -> None:
        x, reduced, kept = self._layout(node)
        result = _constant_result(node)
        out = node.outputs[0]
        count = math.prod(x.shape[d] for d in reduced)
        for d, od in kept.items():
            consts = ctx.const(x, d)
            if consts is not None and result is not None:
                value = result(consts.value, count)
                # The reduced dimensions may have other sizes on other inputs (tokens, pixels, the
                # batch): a constant that the count changes (a sum of a non-zero constant) is not one.
                ctx.set_const(out, od, DimConst.where(consts.mask & (value == result(consts.value, count + 1)), value))
                if len(node.outputs) > 1 and node.target._opname in _WITH_MEAN:  # the mean of a constant is it
                    ctx.set_const(node.outputs[1], od, consts)
                if node.target._opname == "aminmax":
                    ctx.set_const(node.outputs[1], od, ctx.const(out, od))

    def backward(self, node: Node, ctx: Analysis) -> None:
        x, reduced, kept = self._layout(node)
        demanded = [out for out in node.outputs if ctx.is_demanded(out)]
        if not demanded:
            return
        masks = {d: torch.stack([ctx.demanded(out, od) for out in demanded]).any(0) for d, od in kept.items()}
        if _ignores_zeros(node):
            for d in reduced:
                consts = ctx.const(x, d)
                if consts is not None:
                    masks[d] = ~consts.zero
        ctx.demand(x, masks)


def _order(node: Node) -> float:
    """The order of a norm: ``ord`` of ``linalg_vector_norm``, ``p`` of ``norm`` (2 where it is None)."""
    args = bind(node)
    order = args.get("ord", args.get("p"))
    return 2.0 if order is None else float(order)


def _ignores_zeros(node: Node) -> bool:
    """Whether zero entries of the reduced dimensions leave the result as it is: a sum's, a count of the
    entries that are not zero, and a norm's of an order that is not negative (``ord=-1`` or ``-inf`` is
    zero where one entry is)."""
    name = node.target._opname
    return name in ("sum", "nansum", "count_nonzero") or name in _NORMS and _order(node) >= 0


def _constant_result(node: Node) -> Optional[Callable[[torch.Tensor, int], torch.Tensor]]:
    """How a constant slice over ``n`` reduced entries reduces for this call; None where unknown."""
    name = node.target._opname
    if name not in _NORMS:
        return _CONSTANT_RESULT.get(name)
    order = _order(node)
    if math.isinf(order):
        return lambda v, n: v.abs()
    if order == 0:  # counts the entries that are not zero
        return lambda v, n: (v != 0).to(torch.float64) * n
    return lambda v, n: v.abs() * n ** (1 / order)


class AlongOneDim(Reduction):
    """An operator along one dimension ``dim`` that reads all of it (kept whole) and treats every
    slice across the others alike, which pass through: ``topk``, ``sort``, the scans ``cumsum``,
    ``cumprod``, ``cummax``, ``cummin``, ``logcumsumexp``.

    Along a passing dimension, a slice of zeros gives zeros (but ``logcumsumexp``'s), and a constant
    slice stays that constant where the values are picked, not accumulated (``topk``, ``sort``,
    ``cummax``, ``cummin``); positions (``indices``) are never constant.
    """

    _PICKS = {"topk", "sort", "cummax", "cummin"}
    _ZERO_TO_ZERO = _PICKS | {"cumsum", "cumprod"}

    def _layout(self, node: Node) -> tuple[TensorValue, list[int], dict[int, int]]:
        x = node.args[0]
        dim = bind(node).get("dim", -1) % max(x.ndim, 1)
        return x, [dim], {d: d for d in range(x.ndim) if d != dim}

    def picks_by_rank(self, node: Node) -> bool:
        return node.target._opname in ("topk", "sort") and bool(node.outputs[1].consumers)

    def forward(self, node: Node, ctx: Analysis) -> None:
        name = node.target._opname.rstrip("_")
        if name not in self._ZERO_TO_ZERO:
            return
        x, _, kept = self._layout(node)
        for d in kept:
            consts = ctx.const(x, d)
            if consts is not None:
                ctx.set_const(node.outputs[0], d, consts if name in self._PICKS else consts.only_zeros())


class Softmax(OpRule):
    """``softmax`` / ``log_softmax`` (and ``_safe_softmax``, which scaled dot-product attention uses
    with a mask) over one dimension; every other dimension passes through."""

    def couple(self, node: Node, ctx: Analysis) -> None:
        x, out = node.args[0], node.outputs[0]
        dim = node.args[1] % x.ndim
        for d in range(x.ndim):
            if d != dim:
                ctx.link(x, d, out, d)

    def note(self, args: tuple, kwargs: dict, out: Any) -> bool:
        """Whether the probabilities are the same along another dimension (heads, queries): a dummy of
        one token repeated, or a mask leaving each query one key, gives every head the same weights."""
        dim = args[1] % out.dim() if out.dim() else 0
        return same_along(out, [d for d in range(out.dim()) if d != dim])

    def hides_layout(self, node: Node) -> bool:
        x = node.args[0]
        return x.ndim > 0 and (x.shape[node.args[1] % x.ndim] == 1 or bool(node.note))

    def forward(self, node: Node, ctx: Analysis) -> None:
        """A constant slice gives ``1 / n`` for its ``n`` entries, which other inputs may change (tokens,
        pixels): not a constant. A slice of ``-inf`` only gives zeros whatever ``n`` (``_safe_softmax``,
        where a mask hides every key)."""
        if node.target._opname != "_safe_softmax":
            return
        x, out = node.args[0], node.outputs[0]
        dim = node.args[1] % x.ndim
        for d in range(x.ndim):
            consts: Optional[DimConst] = ctx.const(x, d) if d != dim else None
            if consts is not None:
                hidden = consts.mask & (consts.value == -math.inf)
                ctx.set_const(out, d, DimConst.where(hidden, torch.zeros_like(consts.value)))

    def backward(self, node: Node, ctx: Analysis) -> None:
        x, out = node.args[0], node.outputs[0]
        dim = node.args[1] % x.ndim
        if ctx.is_demanded(out):
            ctx.demand(x, {d: ctx.demanded(out, d) for d in range(x.ndim) if d != dim})


def register(registry) -> None:
    registry.add_ops(
        ["aten.sum", "aten.nansum", "aten.mean", "aten.nanmean", "aten.amax", "aten.amin", "aten.max.dim",
         "aten.min.dim", "aten.var", "aten.std", "aten.prod", "aten.logsumexp", "aten.linalg_vector_norm",
         "aten.norm.ScalarOpt_dim", "aten.norm.Scalar", "aten.norm.ScalarOpt_dim_dtype", "aten.norm.ScalarOpt_dtype",
         "aten.any", "aten.all", "aten.argmax", "aten.argmin", "aten.var_mean", "aten.std_mean", "aten.median",
         "aten.nanmedian", "aten.kthvalue", "aten.mode", "aten.aminmax", "aten.count_nonzero"],
        Reduction(),
    )
    registry.add_ops(["aten.topk", "aten.sort", "aten.cumsum", "aten.cumprod", "aten.cummax", "aten.cummin",
                      "aten.logcumsumexp"], AlongOneDim())
    registry.add_ops(["aten._softmax", "aten._log_softmax", "aten.softmax.int", "aten.log_softmax.int",
                      "aten._safe_softmax"], Softmax())
