"""Tensors made like another: ``zeros_like``, ``ones_like``, ``full_like``, ``empty_like``,
``rand_like``, ``randn_like``, ``randint_like``; and ``new_zeros``, ``new_ones``, ``new_full``,
``new_empty``.

The ``*_like`` ones take the other tensor's shape and nothing of its values: every dimension follows
that tensor's (the sped-up call makes the smaller shape). The ``new_*`` ones take only its dtype and
device: their shape is the code's, and the other tensor's dimensions are free to shrink. No entry of
the other tensor is needed, and the filled ones are constants.
"""

from __future__ import annotations

import torch

from ..graph import Node
from ..propagation import Analysis
from ..rule import DimConst, OpRule, bind

_FILLS = {"zeros_like": lambda node: 0.0, "ones_like": lambda node: 1.0,
          "full_like": lambda node: float(bind(node)["fill_value"]), "new_zeros": lambda node: 0.0,
          "new_ones": lambda node: 1.0, "new_full": lambda node: float(bind(node)["fill_value"])}


class MadeLike(OpRule):
    def couple(self, node: Node, ctx: Analysis) -> None:
        x, out = node.args[0], node.outputs[0]
        if node.target._opname.startswith("new_"):
            for d in range(x.ndim):
                ctx.accept(x, d)
        else:
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
                                                   "randn_like", "randint_like", "new_zeros", "new_ones", "new_full",
                                                   "new_empty")], MadeLike())
