"""``nn.Bilinear``: ``y[..., o] = x1[..., :] W[o] x2[..., :] + b[o]`` over the last dimensions.

An output feature is a constant (its bias) where its weight slice meets only inputs that are zero; an
input feature is needed where a needed output reads it through a non-zero weight and the other input is
not zero there. A constant input feature other than zero multiplies the other input, so it cannot be
folded into the bias: only zeros go (and features no needed output reads).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..graph import Node, TensorValue
from ..propagation import Analysis
from ..replacement import ModulePlan
from ..rule import DimConst, ModuleRule
from .toolkit import clone_module, param_data


class BilinearRule(ModuleRule):
    subclasses = True

    def couple(self, node: Node, ctx: Analysis) -> None:
        x1, x2, out = node.args[0], node.args[1], node.outputs[0]
        for d in range(out.ndim - 1):
            ctx.link(x1, d, out, d)
            ctx.link(x2, d, out, d)
        weight, bias = node.params["weight"], node.params.get("bias")
        ctx.link(out, -1, weight, 0)
        ctx.link(x1, -1, weight, 1)
        ctx.link(x2, -1, weight, 2)
        if bias is not None:
            ctx.link(bias, 0, weight, 0)

    def forward(self, node: Node, ctx: Analysis) -> None:
        x1, x2, out = node.args[0], node.args[1], node.outputs[0]
        live = self._reads(node, ctx, x1, x2).any((1, 2))
        if bool(live.all()):
            return
        bias = param_data(node, "bias")
        value = bias.to(torch.float64) if bias is not None else torch.zeros(live.numel(), dtype=torch.float64)
        ctx.set_const(out, -1, DimConst.where(~live, value))

    def backward(self, node: Node, ctx: Analysis) -> None:
        x1, x2, out = node.args[0], node.args[1], node.outputs[0]
        if not ctx.is_demanded(out):
            return
        reads = self._reads(node, ctx, x1, x2)[ctx.demanded(out, -1)]
        leading = {d: ctx.demanded(out, d) for d in range(out.ndim - 1)}
        ctx.demand(x1, {**leading, x1.ndim - 1: reads.any((0, 2))})
        ctx.demand(x2, {**leading, x2.ndim - 1: reads.any((0, 1))})

    @staticmethod
    def _reads(node: Node, ctx: Analysis, x1: TensorValue, x2: TensorValue) -> torch.Tensor:
        """``(out, in1, in2)``: where an output reads a pair of input features that are both not zero."""
        reads = param_data(node, "weight") != 0
        for x, d in ((x1, 1), (x2, 2)):
            zero = _zero(ctx.const(x, -1))
            if zero is not None:
                shape = [1, 1, 1]
                shape[d] = -1
                reads = reads & ~zero.reshape(shape)
        return reads

    def replace(self, module: nn.Module, plan: ModulePlan) -> nn.Module:
        new = clone_module(module)
        new.weight, new.bias = plan.param("weight"), plan.param("bias")
        new.out_features, new.in1_features, new.in2_features = new.weight.shape
        return new


def _zero(consts: Optional[DimConst]) -> Optional[torch.Tensor]:
    return consts.zero if consts is not None else None


def register(registry) -> None:
    registry.add_module(nn.Bilinear, BilinearRule())
