"""Tensors made like another: ``zeros_like``, ``ones_like``, ``full_like``, ``empty_like``,
``rand_like``, ``randn_like``, ``randint_like``, ``fill`` (``x[:, :2] = 0`` fills a view in place);
and ``new_zeros``, ``new_ones``, ``new_full``, ``new_empty``.

The ``*_like`` ones take the other tensor's shape and nothing of its values: every dimension follows
that tensor's (the sped-up call makes the smaller shape). The ``new_*`` ones take only its dtype and
device: their shape is the code's, and the other tensor's dimensions are free to shrink. No entry of
the other tensor is needed, and the filled ones are constants.

Made from nothing (``zeros``, ``ones``, ``full``, ``empty``, and ``new_*``), a tensor has the sizes the
code passes, often read from another tensor (a recurrent state started as
``torch.zeros(u.shape[0], u.shape[2])``): its dimensions are free to shrink with what it meets. A size
written in the code does not follow; the verification finds the call making another shape than
planned and keeps its sizes.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..graph import Node, NodeKind, TensorValue
from ..propagation import Analysis
from ..rule import DimConst, OpRule, bind

_FILLS = {"zeros": lambda node: 0.0, "ones": lambda node: 1.0, "full": lambda node: float(bind(node)["fill_value"]),
          "zeros_like": lambda node: 0.0, "ones_like": lambda node: 1.0,
          "full_like": lambda node: float(bind(node)["fill_value"]), "new_zeros": lambda node: 0.0,
          "new_ones": lambda node: 1.0, "new_full": lambda node: float(bind(node)["fill_value"]),
          "fill": lambda node: _scalar(bind(node)["value"])}


def _scalar(value) -> Optional[float]:
    """A fill value given as a number or as a tensor of one element (None where computed in the call)."""
    if isinstance(value, TensorValue):
        data = value.host()
        return float(data.reshape(-1)[0]) if data is not None and data.numel() == 1 else None
    return float(value)


class MadeLike(OpRule):
    def couple(self, node: Node, ctx: Analysis) -> None:
        x, out = node.args[0], node.outputs[0]
        if node.target._opname.startswith("new_"):
            for d in range(x.ndim):
                ctx.accept(x, d)
            _free(ctx, out)
        else:
            ctx.link_all(x, out)

    def forward(self, node: Node, ctx: Analysis) -> None:
        fill = _FILLS.get(node.target._opname.rstrip("_"))
        value = fill(node) if fill is not None else None
        if value is None:
            return  # uninitialised, random, or a value computed in the call
        out = node.outputs[0]
        for d, size in enumerate(out.shape):
            ctx.set_const(out, d, DimConst.where(torch.ones(size, dtype=torch.bool), torch.full((size,), value)))

    def backward(self, node: Node, ctx: Analysis) -> None:
        """Reads no entry of its argument."""


class MadeFromNothing(MadeLike):
    """``zeros``, ``ones``, ``full``, ``empty``: a shape the code passes (see the module docstring)."""

    def couple(self, node: Node, ctx: Analysis) -> None:
        _free(ctx, node.outputs[0])


def _free(ctx: Analysis, out: TensorValue) -> None:
    """Dimensions whose sizes the code passed: they may shrink with what they meet, where operators
    meet them (a module given such a tensor, as a recurrent layer its initial state, is given it whole:
    the code makes it whole)."""
    if not _reaches_a_module(out):
        for d in range(out.ndim):
            ctx.atoms(out, d)


_PASSING = {"detach", "alias", "clone", "_to_copy", "expand", "view", "reshape", "unsqueeze", "contiguous"}
"""Operators a tensor passes through unchanged on its way to where it is read."""


def _reaches_a_module(value: TensorValue, depth: int = 4) -> bool:
    """Whether a claimed module reads the value, through at most ``depth`` operators that pass it on."""
    for consumer in value.consumers:
        if consumer.kind is not NodeKind.OP:
            return True
        if depth and consumer.target._opname in _PASSING and any(
                _reaches_a_module(out, depth - 1) for out in consumer.outputs):
            return True
    return False


def register(registry) -> None:
    registry.add_ops([f"aten.{name}" for name in ("zeros_like", "ones_like", "full_like", "empty_like", "rand_like",
                                                   "randn_like", "randint_like", "new_zeros", "new_ones", "new_full",
                                                   "new_empty", "fill")], MadeLike())
    registry.add_ops(["aten.zeros", "aten.ones", "aten.full", "aten.empty"], MadeFromNothing())
