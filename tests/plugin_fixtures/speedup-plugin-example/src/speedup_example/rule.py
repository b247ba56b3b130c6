"""The rule for :class:`~speedup_example.modules.ScaledLinear`, modelled on core's ``LinearRule``.

``y[..., o] = (sum_i x[..., i] * W[o, i] + b[o]) * scale[o]``

* **couple**: the leading dimensions of ``x`` and ``y`` correspond one to one; input feature ``i``
  is column ``i`` of ``W``; output feature ``o`` is row ``o`` of ``W``, entry ``o`` of ``b`` and
  entry ``o`` of ``scale``, so all four are kept or removed together.
* **forward**: output feature ``o`` is a constant when ``scale[o] == 0`` (it is 0), or when row
  ``o`` of ``W`` reads only constant inputs (it is ``(b[o] + W[o, c] @ v_c) * scale[o]``).
* **backward**: input feature ``i`` is needed when some needed output with a non-zero scale reads
  it through a non-zero weight, unless it is a constant the layer can fold into its bias.
* **replace**: slice ``W``, ``b`` and ``scale`` to the kept entries and fold the removed constant
  inputs into ``b`` (before the scale, which multiplies the bias too).
"""

from __future__ import annotations

import torch
from torch import nn

from speedup.graph import Node
from speedup.propagation import Analysis
from speedup.replacement import ModulePlan
from speedup.rule import DimConst, ModuleRule

# Helpers shared by core's module rules: a safe shallow copy of a module, the first tensor input
# of a node, and which constant input entries every call of the module can fold.
from speedup.rules.toolkit import clone_module, first_input, foldable

from .modules import ScaledLinear


class ScaledLinearRule(ModuleRule):
    """Shrinks :class:`ScaledLinear` along its input and output features.

    ``subclasses`` stays ``False`` (the default): a subclass of ``ScaledLinear`` is not claimed by
    this rule unless it is registered itself.
    """

    name = "ScaledLinear"

    def couple(self, node: Node, ctx: Analysis) -> None:
        x, out = first_input(node), node.outputs[0]
        weight, bias, scale = node.params["weight"], node.params.get("bias"), node.params["scale"]
        for d in range(x.ndim - 1):
            ctx.link(x, d, out, d)
        ctx.link(x, -1, weight, 1)
        ctx.link(out, -1, weight, 0)
        ctx.link(scale, 0, weight, 0)
        if bias is not None:
            ctx.link(bias, 0, weight, 0)

    def forward(self, node: Node, ctx: Analysis) -> None:
        x, out = first_input(node), node.outputs[0]
        weight = node.params["weight"].data.detach()
        scale = _scale(node)
        bias = node.params.get("bias")
        consts = ctx.const(x, -1)
        nonzero = _nonzero(ctx, node)
        reads_variable = nonzero.any(1) if consts is None else nonzero[:, ~consts.mask].any(1)
        reads_variable &= scale != 0
        value = bias.data.detach().to(torch.float64) if bias is not None else torch.zeros(weight.shape[0], dtype=torch.float64)
        if consts is not None and bool(consts.nonzero_const.any()):
            used = consts.nonzero_const
            value = value + weight[:, used].to(torch.float64) @ consts.value[used]
        ctx.set_const(out, -1, DimConst.where(~reads_variable, value * scale.to(torch.float64)))

    def backward(self, node: Node, ctx: Analysis) -> None:
        x, out = first_input(node), node.outputs[0]
        if not ctx.is_demanded(out):
            return
        rows = ctx.demanded(out, -1) & (_scale(node) != 0)
        read = _nonzero(ctx, node)[rows].any(0)
        masks = {d: ctx.demanded(out, d) for d in range(x.ndim - 1)}
        masks[x.ndim - 1] = read & ~foldable(ctx, node, x, -1)
        ctx.demand(x, masks)

    def replace(self, module: ScaledLinear, plan: ModulePlan) -> nn.Module:
        weight, bias, scale = plan.param("weight"), plan.param("bias"), plan.param("scale")
        new = clone_module(module)  # never modify ``module`` itself: the engine may roll back
        new.weight, new.scale = weight, scale
        new.bias = _fold_into_bias(plan, module, bias)
        new.in_features, new.out_features = weight.shape[1], weight.shape[0]
        return new


def _scale(node: Node) -> torch.Tensor:
    return node.params["scale"].data.detach()


def _nonzero(ctx: Analysis, node: Node) -> torch.Tensor:
    """Where ``W`` is non-zero; computed once per analysis and shared by the passes."""
    weight = node.params["weight"]
    return ctx.memo(("scaled-linear-nonzero", weight.index), lambda: weight.data.detach() != 0)


def _fold_into_bias(plan: ModulePlan, module: ScaledLinear, bias):
    """The (sliced) bias plus ``W[:, c] * v_c`` for every removed input feature ``c`` holding constant ``v_c``."""
    removed, values = plan.removed_input_constants(-1)
    used = values != 0
    if not bool(used.any()):
        return bias
    full = module.weight.detach()
    kept_out = plan.kept(plan.output(), -1)
    rows = full if kept_out is None else full[kept_out]
    extra = rows[:, removed[used]].to(torch.float64) @ values[used]
    base = bias.detach().to(torch.float64) if bias is not None else torch.zeros_like(extra)
    return nn.Parameter((base + extra).to(full.dtype), requires_grad=module.weight.requires_grad)
