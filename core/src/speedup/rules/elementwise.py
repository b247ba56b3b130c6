"""Elementwise operators: activations, arithmetic, comparisons, with broadcasting.

Every output dimension corresponds to the same dimension of each input that is not broadcast
along it. An output entry is constant when every input is constant there, and its value is the
operator itself applied to the input constants (so ``sigmoid(0) = 0.5`` and ``gelu``'s exact
formula come from torch, not from a table here). Multiplication by a zero annihilates whatever
the other operand holds.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.utils._pytree as pytree

from ..graph import Node, Origin, TensorValue
from ..propagation import Analysis
from ..rule import DimConst, OpRule

UNARY = [
    "abs", "neg", "relu", "gelu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid", "hardtanh",
    "leaky_relu", "elu", "selu", "celu", "softplus", "mish", "exp", "exp2", "expm1", "log", "log2", "log1p",
    "sqrt", "rsqrt", "reciprocal", "sin", "cos", "erf", "erfc", "erfinv", "sign", "sgn", "floor", "ceil",
    "round", "trunc", "frac", "clamp", "clamp_min", "clamp_max", "square", "logical_not", "bitwise_not",
    "nan_to_num", "threshold", "hardshrink", "softshrink", "isnan", "isinf", "isfinite", "logit", "_to_copy",
    "lift_fresh_copy", "positive", "signbit", "relu6", "log_sigmoid_forward", "angle", "tan", "asin", "acos",
    "atan", "sinh", "cosh", "asinh", "acosh", "atanh", "sinc", "i0", "lgamma", "digamma", "deg2rad", "rad2deg",
    "special_erfcx", "special_i0e", "special_i1", "special_i1e", "special_ndtr", "special_ndtri", "special_log_ndtr",
    "special_entr",
]
BINARY = [
    "add", "sub", "rsub", "mul", "div", "maximum", "minimum", "fmax", "fmin", "fmod", "remainder", "pow",
    "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or", "logical_xor", "bitwise_and",
    "bitwise_or", "bitwise_xor", "atan2", "floor_divide", "copysign", "hypot", "where", "masked_fill",
    "lerp", "addcmul", "addcdiv", "xlogy", "true_divide", "copy", "polar", "complex", "heaviside", "logaddexp",
    "logaddexp2", "nextafter", "float_power", "bitwise_left_shift", "bitwise_right_shift", "igamma", "igammac",
    "special_xlog1py", "special_zeta", "gcd", "lcm", "_prelu_kernel",
]
_ANNIHILATORS = {"mul": (0, 1), "div": (0,), "true_divide": (0,), "logical_and": (0, 1), "bitwise_and": (0, 1)}


class Elementwise(OpRule):
    """Any operator computing each output element from the same element of its broadcast inputs."""

    def couple(self, node: Node, ctx: Analysis) -> None:
        for out in node.outputs:
            for x in _tensor_args(node):
                for d, xd in _aligned_dims(x, out):
                    if x.shape[xd] == out.shape[d]:
                        ctx.link(x, xd, out, d)

    def forward(self, node: Node, ctx: Analysis) -> None:
        inputs = _tensor_args(node)
        annihilators = [x for i, x in enumerate(node.args) if isinstance(x, TensorValue)
                        and i in _ANNIHILATORS.get(node.target._opname.rstrip("_"), ())]
        for out in node.outputs:
            for d in range(out.ndim):
                if out.shape[d] > 1 and out.atoms[d] is None:
                    continue  # nothing can be removed along it; its constants would serve no one
                consts = self._output_const(node, ctx, inputs, annihilators, out, d)
                ctx.set_const(out, d, consts)

    def _output_const(self, node, ctx, inputs, annihilators, out, d) -> Optional[DimConst]:
        n = out.shape[d]
        if len(inputs) == 1 and inputs[0].shape == out.shape:
            # One input, same shape (activations): the constants map through the operator itself.
            consts = ctx.const(inputs[0], d)
            if consts is None:
                return None
            if not bool(consts.value.any()) and _keeps_zero(node, inputs[0]):
                return consts  # zeros stay zeros: the usual case (removed channels), without evaluating
            value = _evaluate(node, inputs, [consts], out, n)
            return DimConst.where(consts.mask & torch.isfinite(value), value)
        per_input: list[Optional[DimConst]] = []
        for x in inputs:
            per_input.append(_input_const(ctx, x, out, d))
        if any(c is None for c in per_input) and all(per_input[inputs.index(x)] is None for x in annihilators):
            return None  # an input varies everywhere and no zero annihilates it: the usual case, decided early
        zero = torch.zeros(n, dtype=torch.bool)
        for x in annihilators:
            c = per_input[inputs.index(x)]
            if c is not None:
                zero |= c.zero
        known = [c for c in per_input if c is not None]
        mask = torch.ones(n, dtype=torch.bool)
        for c in per_input:
            mask &= c.mask if c is not None else torch.zeros(n, dtype=torch.bool)
        if not bool(mask.any()) and not bool(zero.any()):
            return None
        value = torch.zeros(n, dtype=torch.float64)
        if bool(mask.any()) and known:
            value = _evaluate(node, inputs, per_input, out, n)
            mask &= torch.isfinite(value)
        value = torch.where(zero, 0.0, value)
        return DimConst.where(mask | zero, value)

    def backward(self, node: Node, ctx: Analysis) -> None:
        out = node.outputs[0]
        if not ctx.is_demanded(out):
            return
        inputs = _tensor_args(node)
        opname = node.target._opname.rstrip("_")
        annihilating = [x for i, x in enumerate(node.args) if isinstance(x, TensorValue) and i in _ANNIHILATORS.get(opname, ())]
        for x in inputs:
            masks = {}
            for d, xd in _aligned_dims(x, out):
                if x.shape[xd] != out.shape[d]:
                    continue
                need = ctx.demanded(out, d)
                for other in annihilating:
                    if other is not x:
                        c = _input_const(ctx, other, out, d)
                        if c is not None:
                            need = need & ~c.zero
                masks[xd] = need
            ctx.demand(x, masks)


    def picks_by_rank(self, node: Node) -> bool:
        """An exact comparison of two values the input computes (``max_pool(h) == h``)."""
        inputs = _tensor_args(node)
        return (node.target._opname in _COMPARISONS and len(inputs) == 2
                and all(x.dtype.is_floating_point and x.origin is Origin.COMPUTED for x in inputs))


_COMPARISONS = {"eq", "ne", "lt", "le", "gt", "ge"}


def _tensor_args(node: Node) -> list[TensorValue]:
    seen: list[TensorValue] = []
    for arg in list(node.args) + list(node.kwargs.values()):
        if isinstance(arg, TensorValue) and arg not in seen:
            seen.append(arg)
    return seen


def _aligned_dims(x: TensorValue, out: TensorValue) -> list[tuple[int, int]]:
    """(output dim, input dim) pairs under right-aligned broadcasting."""
    offset = out.ndim - x.ndim
    return [(d, d - offset) for d in range(max(offset, 0), out.ndim)]


def _input_const(ctx: Analysis, x: TensorValue, out: TensorValue, d: int) -> Optional[DimConst]:
    """Constants of input ``x`` as seen along output dimension ``d`` (broadcast inputs are uniform)."""
    n = out.shape[d]
    xd = d - (out.ndim - x.ndim)
    if xd >= 0 and x.shape[xd] == n:
        return ctx.const(x, xd)
    uniform = ctx.uniform(x)
    if uniform is None:
        uniform = _infinite_number(x)
    if uniform is None:
        return None
    return DimConst(torch.ones(n, dtype=torch.bool), torch.full((n,), uniform, dtype=torch.float64))


def _infinite_number(x: TensorValue) -> Optional[float]:
    """The value of a one-entry tensor known before the call that holds an infinity (``clamp(x, low,
    high)`` with bounds of ±inf held as buffers): the analysis takes no infinity for a constant (a fold
    would multiply it), but here only the operator's result is taken, where it is finite."""
    if x.data is None or x.follows_sizes or math.prod(x.shape) != 1 or not x.dtype.is_floating_point:
        return None
    value = float(x.host().reshape(-1)[0])
    return value if math.isinf(value) else None


def _evaluate(node: Node, inputs: list[TensorValue], consts: list[Optional[DimConst]], out: TensorValue, n: int) -> torch.Tensor:
    """Runs the operator itself on the constant entries, one element per entry.

    An integer the code passes as an operand may be a size it read from the input
    (``h.mean(1) * h.shape[1]``), another on other inputs: an entry whose result changes with it is
    not a constant (NaN here). 0 and 1 are taken for what the code wrote (``1 - gate``)."""
    stand_ins = {}
    for x, c in zip(inputs, consts):
        values = c.value if c is not None else torch.zeros(n, dtype=torch.float64)
        stand_ins[x.index] = values.to(x.dtype)

    args = _substituted(node.args, stand_ins)
    kwargs = {k: _substituted(v, stand_ins) for k, v in node.kwargs.items()}
    result = _run(node, args, kwargs, n)
    for position in _size_like_operands(node):
        bumped = args[:position] + (args[position] + 1,) + args[position + 1:]
        result = torch.where(_run(node, bumped, kwargs, n) == result, result, float("nan"))
    return result


def _run(node: Node, args: tuple, kwargs: dict, n: int) -> torch.Tensor:
    if node.target._opname.endswith("_"):
        args = (args[0].clone(),) + tuple(args[1:])
    try:
        result = node.target(*args, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.full((n,), float("nan"), dtype=torch.float64)
    if isinstance(result, (tuple, list)):
        result = result[0]
    if result.is_complex():  # constants are real numbers: a complex one is known only where it is zero
        result = torch.where(result == 0, 0.0, float("nan"))
    result = result.to(torch.float64).reshape(-1)
    return result if result.numel() == n else torch.full((n,), float("nan"), dtype=torch.float64)


def _size_like_operands(node: Node) -> list[int]:
    """Positions of the integers other than 0 and ±1 the call takes for a tensor operand (see
    :meth:`~speedup.graph.Node.integer_operands`), where it computes with a tensor depending on the
    input (whose sizes may depend on it too)."""
    if not any(x.origin is Origin.COMPUTED for x in _tensor_args(node)):
        return []
    return [i for i in node.integer_operands() if abs(node.args[i]) > 1]


_KEEPS_ZERO: dict[tuple, bool] = {}
"""Whether a one-input operator, with given other arguments and dtype, maps zero to zero."""


def _keeps_zero(node: Node, x: TensorValue) -> bool:
    """Whether the operator maps zero to zero (``relu``: yes; ``sigmoid``: no), found by running it
    once on a zero for each operator, dtype and other arguments."""
    rest = node.args[1:] + tuple(node.kwargs.items())
    if any(isinstance(a, TensorValue) for a in pytree.tree_leaves(rest)):
        return False  # the same tensor twice (``mul(x, x)``): evaluated as usual
    key = (node.target, x.dtype, rest)
    try:
        known = _KEEPS_ZERO.get(key)
    except TypeError:  # an unhashable argument
        return False
    if known is None:
        zero = DimConst(torch.ones(1, dtype=torch.bool), torch.zeros(1, dtype=torch.float64))
        known = _KEEPS_ZERO[key] = bool(_evaluate(node, [x], [zero], x, 1)[0] == 0)
    return known


def _substituted(arg, stand_ins: dict[int, torch.Tensor]):
    """An argument with every value replaced by its stand-in (a module-level function: a nested
    recursive one would be a reference cycle left to the garbage collector)."""
    if isinstance(arg, TensorValue):
        return stand_ins[arg.index]
    if isinstance(arg, (list, tuple)):
        return type(arg)(_substituted(a, stand_ins) for a in arg)
    return arg


def register(registry) -> None:
    rule = Elementwise()
    for name in UNARY + BINARY:
        registry.add_op(f"aten.{name}", rule)
