"""``nn.Embedding``, ``aten.embedding`` and ``nn.EmbeddingBag``: lookups whose last output dimension is
the table's columns.

The vocabulary dimension is indexed by token ids, literal positions: it keeps its size. A table with
``max_norm`` renormalises the rows it looks up by their norm over every column, in place: only its
zero columns may go. A bag sums, averages or takes the largest of the rows it looks up, so a column is
constant in its output only where it is zero (a sum of a constant grows with the bag; an empty bag
gives zeros).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..graph import Node, Origin, TensorValue
from ..propagation import Analysis
from ..replacement import ModulePlan
from ..rule import ModuleRule, OpRule
from .toolkit import clone_module, demand_computed, first_input


def _couple(ctx: Analysis, weight: TensorValue, indices: TensorValue, out: TensorValue) -> None:
    for d in range(indices.ndim):
        ctx.link(indices, d, out, d)
    ctx.link(weight, 1, out, -1)


def _forward(ctx: Analysis, weight: TensorValue, out: TensorValue) -> None:
    ctx.set_const(out, -1, ctx.const(weight, 1))


def _backward(ctx: Analysis, indices: TensorValue, out: TensorValue) -> None:
    if ctx.is_demanded(out):
        ctx.demand(indices, {d: ctx.demanded(out, d) for d in range(indices.ndim)})


class EmbeddingRule(ModuleRule):
    lazy_masks = True  # reads parameters through the node's values and the plan only
    subclasses = True

    def couple(self, node: Node, ctx: Analysis) -> None:
        _couple(ctx, node.params["weight"], first_input(node), node.outputs[0])

    def forward(self, node: Node, ctx: Analysis) -> None:
        _forward(ctx, node.params["weight"], node.outputs[0])

    def backward(self, node: Node, ctx: Analysis) -> None:
        _backward(ctx, first_input(node), node.outputs[0])
        if node.module.max_norm is not None:
            _keep_nonzero_columns(ctx, node.params["weight"])

    def masked_forward(self, module: nn.Module, masks: dict) -> Optional[Callable[..., torch.Tensor]]:
        """``embedding(ids, W) * kept_columns * kept_rows[ids]`` for a table losing rows times columns:
        the masked lookup without a masked copy of the table (94 MB for BERT's vocabulary)."""
        pattern = masks.get("weight")
        if (set(masks) != {"weight"} or not pattern.separable or module.max_norm is not None
                or type(module).forward is not nn.Embedding.forward):
            return None
        rows, columns = pattern.kept(0), pattern.kept(1)
        every_row = bool(rows.all())

        def forward(input: torch.Tensor) -> torch.Tensor:
            out = F.embedding(input, module.weight, module.padding_idx, None, module.norm_type,
                              module.scale_grad_by_freq, module.sparse) * columns.to(module.weight)
            return out if every_row else out * rows.to(out.device)[input].unsqueeze(-1).to(out)

        return forward

    def replace(self, module: nn.Embedding, plan: ModulePlan) -> nn.Module:
        new = clone_module(module)
        new.weight = plan.param("weight")
        new.embedding_dim = new.weight.shape[1]
        return new


def _keep_nonzero_columns(ctx: Analysis, weight: TensorValue) -> None:
    """Rows looked up are renormalised by their norm over every column (``max_norm``): one not zero counts."""
    consts = ctx.const(weight, 1)
    zero = consts.zero if consts is not None else torch.zeros(weight.shape[1], dtype=torch.bool)
    ctx.keep(weight, 1, ~zero)


class EmbeddingBagRule(ModuleRule):
    subclasses = True

    def couple(self, node: Node, ctx: Analysis) -> None:
        ctx.link(node.params["weight"], 1, node.outputs[0], -1)

    def forward(self, node: Node, ctx: Analysis) -> None:
        consts = ctx.const(node.params["weight"], 1)
        if consts is not None:
            ctx.set_const(node.outputs[0], -1, consts.only_zeros())

    def backward(self, node: Node, ctx: Analysis) -> None:
        if ctx.is_demanded(node.outputs[0]):
            for value in node.inputs:  # the ids, offsets and per-sample weights: every one
                if value.origin is not Origin.PARAMETER:
                    ctx.demand_all(value)
        if node.module.max_norm is not None:
            _keep_nonzero_columns(ctx, node.params["weight"])

    def replace(self, module: nn.EmbeddingBag, plan: ModulePlan) -> nn.Module:
        new = clone_module(module)
        new.weight = plan.param("weight")
        new.embedding_dim = new.weight.shape[1]
        return new


class EmbeddingOpRule(OpRule):
    def couple(self, node: Node, ctx: Analysis) -> None:
        _couple(ctx, node.args[0], node.args[1], node.outputs[0])

    def forward(self, node: Node, ctx: Analysis) -> None:
        _forward(ctx, node.args[0], node.outputs[0])

    def backward(self, node: Node, ctx: Analysis) -> None:
        _backward(ctx, node.args[1], node.outputs[0])
        if ctx.is_demanded(node.outputs[0]):  # a table the model computes: the columns looked up
            demand_computed(ctx, node.args[0], {1: ctx.demanded(node.outputs[0], -1)})


def register(registry) -> None:
    registry.add_module(nn.Embedding, EmbeddingRule())
    registry.add_module(nn.EmbeddingBag, EmbeddingBagRule())
    registry.add_op("aten.embedding", EmbeddingOpRule())
