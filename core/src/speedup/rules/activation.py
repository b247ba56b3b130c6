"""Leaky ReLUs whose slope is not a plain number: ``nn.PReLU`` (one learned slope per channel, or one
shared slope) and ``nn.RReLU`` (a random slope in training mode, its mean in eval mode)."""

from __future__ import annotations

import torch
from torch import nn

from ..graph import Node
from ..propagation import Analysis
from ..replacement import ModulePlan
from ..rule import DimConst, ModuleRule, bind
from .elementwise import Elementwise
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


class RandomizedLeakyReLU(Elementwise):
    """``rrelu_with_noise`` (``nn.RReLU``, ``F.rrelu``): each entry of ``self`` where it is non-negative,
    else times a slope: the mean of ``lower`` and ``upper`` in eval mode, one drawn per entry in training
    mode (written to ``noise``, a scratch tensor of the input's shape). Elementwise but for its constants,
    which the operator cannot be run on (it would draw slopes): a zero stays zero either way, another
    constant stays constant in eval mode only."""

    def forward(self, node: Node, ctx: Analysis) -> None:
        a = bind(node)
        x, out = a["self"], node.outputs[0]
        slope = None if a["training"] else (float(a["lower"]) + float(a["upper"])) / 2
        for d in range(x.ndim):
            consts = ctx.const(x, d)
            if consts is None:
                continue
            if slope is None:
                ctx.set_const(out, d, consts.only_zeros())
            else:
                ctx.set_const(out, d, DimConst.where(consts.mask, torch.where(consts.value < 0, consts.value * slope,
                                                                              consts.value)))


def register(registry) -> None:
    registry.add_module(nn.PReLU, PReLURule())
    registry.add_ops(["aten.rrelu_with_noise", "aten.rrelu_with_noise_"], RandomizedLeakyReLU())
