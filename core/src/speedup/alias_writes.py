"""The value of a tensor after a write through another view of its storage (``x[:, 1:] += y``).

The recorder gives such a tensor a new value made from its old value and every view of its storage
written since (see :data:`~speedup.graph.ALIAS_WRITE`). Along the dimensions each written view covers
whole, laid out as the tensor (slicing only cut the others), entry ``i`` of the new value is made of
entry ``i`` of the old value and of each written view: those dimensions pass through, constants
included where all of them hold the same one. The others keep their size: literal bounds cut them.
Without such dimensions (another layout, a transposed view written), the node is a barrier, unless it
writes integer constants (an index built in place): those keep every dimension without being reported.
"""

from __future__ import annotations

from .graph import ALIAS_WRITE, Node, NodeKind, Origin
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
INDEX_WRITES = OpRule()
"""An index built in place from constants (BEiT's relative position index): every dimension keeps its
size, as at a barrier, but nothing the model computes from its input stops there, so none is reported."""


def alias_write_rule(node: Node) -> "OpRule | None":
    """The rule of a recorder's alias-write node that has dimensions to pass, or that writes integer
    constants; None otherwise (a barrier)."""
    if node.kind is not NodeKind.OPAQUE or node.target != ALIAS_WRITE:
        return None
    if node.kwargs.get("aligned"):
        return ALIAS_WRITES
    if all(v.origin is Origin.CONSTANT and not v.dtype.is_floating_point for v in node.outputs):
        return INDEX_WRITES
    return None
