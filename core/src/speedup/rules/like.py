"""Tensors made like another: ``zeros_like``, ``ones_like``, ``full_like``, ``empty_like``,
``rand_like``, ``randn_like``, ``randint_like``.

They take the other tensor's shape and nothing of its values: every dimension follows that tensor's
(the sped-up call makes the smaller shape), no entry of it is needed, and the filled ones are
constants.
"""

from __future__ import annotations

import torch

from ..graph import Node
from ..propagation import Analysis
from ..rule import DimConst, OpRule, bind

_FILLS = {"zeros_like": lambda node: 0.0, "ones_like": lambda node: 1.0,
          "full_like": lambda node: float(bind(node)["fill_value"])}


class MadeLike(OpRule):
    def couple(self, node: Node, ctx: Analysis) -> None:
        x, out = node.args[0], node.outputs[0]
        ctx.link_all(x, out)

    def forward(self, node: Node, ctx: Analysis) -> None:
        fill = _FILLS.get(node.target._opname)
        if fill is None:
            return  # uninitialised or random
        out, value = node.outputs[0], fill(node)
        for d, size in enumerate(out.shape):
            ctx.set_const(out, d, DimConst.where(torch.ones(size, dtype=torch.bool), torch.full((size,), value)))

    def backward(self, node: Node, ctx: Analysis) -> None:
        """Reads no entry of its argument."""


def register(registry) -> None:
    registry.add_ops([f"aten.{name}" for name in ("zeros_like", "ones_like", "full_like", "empty_like", "rand_like",
                                                   "randn_like", "randint_like")], MadeLike())
