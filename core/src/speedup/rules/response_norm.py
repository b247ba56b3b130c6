"""Global response normalisation (ConvNeXt V2's GRN), recognised by what it computes.

``y = weight * (x * r) + bias + x``, where ``g`` is the L2 norm of each sample's channel over its
positions and ``r = g / (mean of g over the channels + eps)``. Each channel passes through on its
own, but every channel's norm counts in the mean: a channel holding a varying value is always needed,
one holding a constant may go where the mean still counts it, as the replacement
(:class:`~speedup.modules.ConstantAwareResponseNorm`) does. Kept whole, a GRN would keep the hidden
channels of every ConvNeXt V2 block. timm's ``GlobalResponseNorm`` and Hugging Face's ``ConvNextV2GRN``
compute it, laid out channels last (timm also channels first).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..graph import Node
from ..modules import ConstantAwareResponseNorm, global_response_norm
from ..propagation import Analysis
from ..replacement import ModulePlan
from ..rule import DimConst, ModuleRule
from .norm_vectors import TORCH_LAYOUT, NormVectors, readings, run_with
from .toolkit import clone_module, first_input, foldable


_TORCH_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, nn.LocalResponseNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


class ResponseNormRule(ModuleRule):
    """A global response norm over dimension ``dim`` (-1: channels last, 1: channels first)."""

    def __init__(self, dim: int, eps: float, vectors: NormVectors = TORCH_LAYOUT):
        self.dim, self.eps, self.vectors = dim, eps, vectors

    def couple(self, node: Node, ctx: Analysis) -> None:
        x, out = first_input(node), node.outputs[0]
        channels = self.dim % x.ndim
        for d in range(x.ndim):
            ctx.link(x, d, out, d)
            if d not in (0, channels):
                ctx.pin(x, d)  # every position counts in the norms
        self.vectors.link(node, lambda vector, axis: ctx.link(vector, axis, out, channels))

    def forward(self, node: Node, ctx: Analysis) -> None:
        """A channel that is zero, or whose scale is zero, comes out as ``bias + x``."""
        x, out = first_input(node), node.outputs[0]
        consts = ctx.const(x, self.dim)
        weight, bias = self.vectors.values(node)
        if consts is None or weight is None or bias is None:
            return
        value = bias.to(torch.float64) + consts.value
        passes = consts.mask & ((consts.value == 0) | (weight == 0)) & torch.isfinite(value)
        ctx.set_const(out, self.dim, DimConst.where(passes, value))

    def backward(self, node: Node, ctx: Analysis) -> None:
        x, out = first_input(node), node.outputs[0]
        if not ctx.is_demanded(out):
            return
        channels = self.dim % x.ndim
        masks = {d: ctx.demanded(out, d) for d in range(x.ndim)}
        # Every varying channel feeds the mean; a constant one is counted without being read.
        masks[channels] = masks[channels] | ~foldable(ctx, node, x, channels)
        ctx.demand(x, masks)

    def replace(self, module: nn.Module, plan: ModulePlan) -> nn.Module:
        removed, values = plan.removed_input_constants(self.dim)
        weight, bias = plan.param(self.vectors.scale), plan.param(self.vectors.shift)
        if removed.numel() == 0:
            new = clone_module(module)
            setattr(new, self.vectors.scale, weight)
            setattr(new, self.vectors.shift, bias)
            return new
        return ConstantAwareResponseNorm(weight, bias, self.dim, self.eps, plan.input().shape[self.dim], values)


def recognise_response_norm(module: nn.Module) -> Optional[ModuleRule]:
    """A module holding two channel vectors of one shape (``(C,)`` or ``(1, 1, 1, C)``: a scale and a
    shift, whatever their names: timm's ``weight``/``bias``, ConvNeXt V2's ``gamma``/``beta``) and
    nothing else, that computes a global response norm over its positions, laid out channels last or
    first. Its epsilon is its float attribute ``eps``, else ConvNeXt V2's 1e-6.

    A probe whose norms are small against that epsilon, with random vectors, tells the layouts,
    the vectors' roles and epsilons apart (the module itself is not touched)."""
    if isinstance(module, _TORCH_NORMS):  # a subclass of torch's norms is one of them (a layer norm written out)
        return None
    eps = module.__dict__.get("eps", 1e-6)
    if not isinstance(eps, float):
        return None
    for vectors in readings(module, shift=True):
        for dim in (-1, 1):
            if vectors.shift is not None and _computes_response_norm(module, vectors, dim, eps):
                return ResponseNormRule(dim, eps, vectors)
    return None


def _computes_response_norm(module: nn.Module, vectors: NormVectors, dim: int, eps: float) -> bool:
    channels = getattr(module, vectors.scale).numel()
    generator = torch.Generator().manual_seed(0)
    scale = eps * 25  # each channel's norm over 15 positions is about 100 eps: eps counts
    probe = torch.randn((2, 3, 5, channels) if dim == -1 else (2, channels, 3, 5), generator=generator) * scale
    weight = torch.rand(channels, generator=generator) + 0.5
    bias = (torch.rand(channels, generator=generator) - 0.5) * scale
    result = run_with(module, {vectors.scale: weight, vectors.shift: bias}, probe)
    if result is None or result.shape != probe.shape:
        return False
    expected = global_response_norm(probe, weight, bias, dim, eps).to(result)
    return bool(torch.allclose(result, expected, rtol=1e-4, atol=scale * 1e-5))


def register(registry) -> None:
    registry.add_recogniser(recognise_response_norm)
