"""GPT-2's ``Conv1D``: a linear layer whose weight is stored transposed, ``(in_features, out_features)``.

Its forward reshapes with ``self.nf`` (the output width), so the replacement updates ``nf`` and
``nx`` along with the sliced weight; the analysis is core's linear rule with the weight's
dimensions swapped.
"""

from __future__ import annotations

import torch
from torch import nn

from speedup.graph import Node
from speedup.propagation import Analysis
from speedup.replacement import ModulePlan
from speedup.rule import DimConst, ModuleRule
from speedup.rules._modules import clone_module, first_input, foldable


class Conv1DRule(ModuleRule):
    def couple(self, node: Node, ctx: Analysis) -> None:
        x, out = first_input(node), node.outputs[0]
        weight, bias = node.params["weight"], node.params.get("bias")
        for d in range(x.ndim - 1):
            ctx.link(x, d, out, d)
        ctx.link(x, -1, weight, 0)
        ctx.link(out, -1, weight, 1)
        if bias is not None:
            ctx.link(bias, 0, weight, 1)

    def _nonzero(self, node: Node, ctx: Analysis) -> torch.Tensor:
        weight = node.params["weight"]
        return ctx.memo(("conv1d-nonzero", weight.index), lambda: weight.data.detach() != 0)

    def forward(self, node: Node, ctx: Analysis) -> None:
        x, out = first_input(node), node.outputs[0]
        weight = node.params["weight"].data.detach()
        bias = node.params.get("bias")
        consts = ctx.const(x, -1)
        nonzero = self._nonzero(node, ctx)
        reads_variable = nonzero.any(0) if consts is None else nonzero[~consts.mask].any(0)
        value = bias.data.detach().to(torch.float64) if bias is not None else torch.zeros(weight.shape[1], dtype=torch.float64)
        if consts is not None and bool(consts.nonzero_const.any()):
            used = consts.nonzero_const
            value = value + consts.value[used] @ weight[used].to(torch.float64)
        ctx.set_const(out, -1, DimConst.where(~reads_variable, value))

    def backward(self, node: Node, ctx: Analysis) -> None:
        x, out = first_input(node), node.outputs[0]
        if not ctx.is_demanded(out):
            return
        need_out = ctx.demanded(out, -1)
        nonzero = self._nonzero(node, ctx)
        read = nonzero[:, need_out].any(1)
        masks = {d: ctx.demanded(out, d) for d in range(x.ndim - 1)}
        masks[x.ndim - 1] = read & ~foldable(ctx, node, x, -1)
        ctx.demand(x, masks)

    def replace(self, module: nn.Module, plan: ModulePlan) -> nn.Module:
        weight, bias = plan.param("weight"), plan.param("bias")
        removed, values = plan.removed_input_constants(-1)
        used = values != 0
        if bool(used.any()):
            kept_out = plan.kept(plan.output(), -1)
            full = module.weight.detach()
            rows = full[removed[used]] if kept_out is None else full[removed[used]][:, kept_out]
            extra = values[used] @ rows.to(torch.float64)
            base = bias.detach().to(torch.float64) if bias is not None else torch.zeros_like(extra)
            bias = nn.Parameter((base + extra).to(full.dtype), requires_grad=module.weight.requires_grad)
        new = clone_module(module)
        new.weight, new.bias = weight, bias
        new.nx, new.nf = weight.shape[0], weight.shape[1]
        return new
