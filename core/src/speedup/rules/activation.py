"""``nn.PReLU``: a leaky ReLU with one learned slope per channel (dimension 1), or one shared slope."""

from __future__ import annotations

import torch
from torch import nn

from ..graph import Node
from ..propagation import Analysis
from ..replacement import ModulePlan
from ..rule import DimConst, ModuleRule
from .toolkit import clone_module, first_input, param_data


class PReLURule(ModuleRule):
    lazy_masks = True  # reads parameters through the node's values and the plan only
    subclasses = True

    def couple(self, node: Node, ctx: Analysis) -> None:
        x, out = first_input(node), node.outputs[0]
        for d in range(x.ndim):
            ctx.link(x, d, out, d)
        weight = node.params["weight"]
        if weight.shape[0] > 1:
            ctx.link(weight, 0, out, 1 if x.ndim > 1 else 0)

    def forward(self, node: Node, ctx: Analysis) -> None:
        x, out = first_input(node), node.outputs[0]
        slope = param_data(node, "weight").to(torch.float64)
        channel = 1 if x.ndim > 1 else 0
        for d in range(x.ndim):
            consts = ctx.const(x, d)
            if consts is None:
                continue
            if d == channel and slope.numel() > 1:
                a = slope
            elif slope.numel() == 1:
                a = slope.expand(consts.value.numel())
            else:
                continue
            v = consts.value
            ctx.set_const(out, d, DimConst.where(consts.mask, torch.where(v >= 0, v, a * v)))

    def backward(self, node: Node, ctx: Analysis) -> None:
        x, out = first_input(node), node.outputs[0]
        if ctx.is_demanded(out):
            ctx.demand(x, {d: ctx.demanded(out, d) for d in range(x.ndim)})

    def replace(self, module: nn.PReLU, plan: ModulePlan) -> nn.Module:
        new = clone_module(module)
        new.weight = plan.param("weight")
        new.num_parameters = new.weight.numel()
        return new


def register(registry) -> None:
    registry.add_module(nn.PReLU, PReLURule())
