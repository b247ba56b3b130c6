"""The value of a tensor after a write through another view of its storage (``x[:, 1:] += y``).

The recorder gives such a tensor a new value made from its old value and every view of its storage
written since (see :data:`~speedup.graph.ALIAS_WRITE`). Along the dimensions each written view covers
whole, laid out as the tensor (slicing only cut the others), entry ``i`` of the new value is made of
entry ``i`` of the old value and of each written view: those dimensions pass through, constants
included where all of them hold the same one. The others keep their size: literal bounds cut them.
Without such dimensions (another layout, a transposed view written), the node is a barrier.
"""

from __future__ import annotations

from .graph import ALIAS_WRITE, Node, NodeKind
from .propagation import Analysis
from .rule import DimConst, OpRule


class AliasWriteRule(OpRule):
    def couple(self, node: Node, ctx: Analysis) -> None:
        out = node.outputs[0]
        for d in node.kwargs["aligned"]:
            for value in node.inputs:
                ctx.link(value, d, out, d)

    def forward(self, node: Node, ctx: Analysis) -> None:
        out = node.outputs[0]
        for d in node.kwargs["aligned"]:
            ctx.set_const(out, d, DimConst.agreeing([ctx.const(value, d) for value in node.inputs]))

    def backward(self, node: Node, ctx: Analysis) -> None:
        out = node.outputs[0]
        if ctx.is_demanded(out):
            needed = {d: ctx.demanded(out, d) for d in node.kwargs["aligned"]}
            for value in node.inputs:
                ctx.demand(value, needed)


ALIAS_WRITES = AliasWriteRule()


def alias_write_rule(node: Node) -> "AliasWriteRule | None":
    """The rule of a recorder's alias-write node that has dimensions to pass; None otherwise."""
    if node.kind is NodeKind.OPAQUE and node.target == ALIAS_WRITE and node.kwargs.get("aligned"):
        return ALIAS_WRITES
    return None
