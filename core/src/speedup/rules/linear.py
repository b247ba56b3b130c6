"""``nn.Linear``: ``y = x W^T + b`` over the last dimension.

An output feature whose weight row touches only zero or constant inputs is a constant
(``b[o]``, plus the folded constants). An input feature is needed only where some needed output
reads it through a non-zero weight and it is not a constant the layer can fold into its bias.
"""

from __future__ import annotations

import torch
from torch import nn

from ..graph import Node
from ..propagation import Analysis
from ..replacement import ModulePlan
from ..rule import DimConst, ModuleRule
from ._modules import clone_module, first_input, foldable, param_data


class LinearRule(ModuleRule):
    subclasses = True

    def couple(self, node: Node, ctx: Analysis) -> None:
        x, out = first_input(node), node.outputs[0]
        weight, bias = node.params["weight"], node.params.get("bias")
        for d in range(x.ndim - 1):
            ctx.link(x, d, out, d)
        ctx.link(x, -1, weight, 1)
        ctx.link(out, -1, weight, 0)
        if bias is not None:
            ctx.link(bias, 0, weight, 0)

    def forward(self, node: Node, ctx: Analysis) -> None:
        x, out = first_input(node), node.outputs[0]
        weight = param_data(node, "weight")
        bias = param_data(node, "bias")
        consts = ctx.const(x, -1)
        nonzero = _nonzero(ctx, node)
        if consts is None:
            reads_variable = nonzero.any(1)
        else:
            reads_variable = nonzero[:, ~consts.mask].any(1)
        value = bias.to(torch.float64) if bias is not None else torch.zeros(weight.shape[0], dtype=torch.float64)
        if consts is not None and bool(consts.nonzero_const.any()):
            used = consts.nonzero_const
            value = value + weight[:, used].to(torch.float64) @ consts.value[used]
        ctx.set_const(out, -1, DimConst.where(~reads_variable, value))

    def backward(self, node: Node, ctx: Analysis) -> None:
        x, out = first_input(node), node.outputs[0]
        if not ctx.is_demanded(out):
            return
        need_out = ctx.demanded(out, -1)
        nonzero = _nonzero(ctx, node)
        read = nonzero.any(0) if bool(need_out.all()) else nonzero[need_out].any(0)
        need_in = read & ~foldable(ctx, node, x, -1)
        masks = {d: ctx.demanded(out, d) for d in range(x.ndim - 1)}
        masks[x.ndim - 1] = need_in
        ctx.demand(x, masks)

    def replace(self, module: nn.Linear, plan: ModulePlan) -> nn.Module:
        weight, bias = plan.param("weight"), plan.param("bias")
        folded = fold_into_bias(plan, module.weight, bias, plan.kept(plan.output(), -1))
        new = clone_module(module)
        new.weight = weight
        new.bias = folded
        new.in_features, new.out_features = weight.shape[1], weight.shape[0]
        return new


def _nonzero(ctx: Analysis, node: Node) -> torch.Tensor:
    weight = node.params["weight"]
    return ctx.memo(("nonzero", weight.index), lambda: weight.data.detach() != 0)


def fold_into_bias(plan: ModulePlan, full_weight: torch.Tensor, bias, kept_out):
    """The bias after adding ``W[:, c] * v_c`` for every removed constant input feature ``c``."""
    removed, values = plan.removed_input_constants(-1)
    used = values != 0
    if not bool(used.any()):
        return bias
    rows = full_weight.detach() if kept_out is None else full_weight.detach()[kept_out]
    extra = rows[:, removed[used]].to(torch.float64) @ values[used]
    base = bias.detach().to(torch.float64) if bias is not None else torch.zeros_like(extra)
    result = (base + extra).to(full_weight.dtype)
    return nn.Parameter(result, requires_grad=full_weight.requires_grad)


def register(registry) -> None:
    registry.add_module(nn.Linear, LinearRule())
