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
from torch.func import functional_call

from ..graph import Node, TensorValue
from ..modules import ConstantAwareResponseNorm, global_response_norm
from ..propagation import Analysis
from ..replacement import ModulePlan
from ..rule import DimConst, ModuleRule
from .toolkit import clone_module, first_input, foldable, param_data


_TORCH_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, nn.LocalResponseNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


class ResponseNormRule(ModuleRule):
    """A global response norm over dimension ``dim`` (-1: channels last, 1: channels first)."""

    def __init__(self, dim: int, eps: float):
        self.dim, self.eps = dim, eps

    def couple(self, node: Node, ctx: Analysis) -> None:
        x, out = first_input(node), node.outputs[0]
        channels = self.dim % x.ndim
        for d in range(x.ndim):
            ctx.link(x, d, out, d)
            if d not in (0, channels):
                ctx.pin(x, d)  # every position counts in the norms
        for name in ("weight", "bias"):
            if name in node.params:
                ctx.link(node.params[name], _channel_axis(node.params[name]), out, channels)

    def forward(self, node: Node, ctx: Analysis) -> None:
        """A channel that is zero, or whose scale is zero, comes out as ``bias + x``."""
        x, out = first_input(node), node.outputs[0]
        consts = ctx.const(x, self.dim)
        weight, bias = param_data(node, "weight"), param_data(node, "bias")
        if consts is None or weight is None or bias is None:
            return
        value = bias.reshape(-1).to(torch.float64) + consts.value
        passes = consts.mask & ((consts.value == 0) | (weight.reshape(-1) == 0)) & torch.isfinite(value)
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
        weight, bias = plan.param("weight"), plan.param("bias")
        if removed.numel() == 0:
            new = clone_module(module)
            new.weight, new.bias = weight, bias
            return new
        return ConstantAwareResponseNorm(weight, bias, self.dim, self.eps, plan.input().shape[self.dim], values)


def _channel_axis(vector: TensorValue) -> int:
    """The one axis of a ``(C,)`` or ``(1, 1, 1, C)`` parameter that may be longer than one."""
    longer = [d for d, size in enumerate(vector.shape) if size != 1]
    return longer[0] if longer else vector.ndim - 1


def recognise_response_norm(module: nn.Module) -> Optional[ModuleRule]:
    """A module holding a ``weight`` and a ``bias`` of one shape, with at most one axis longer than
    one, and nothing else, that computes a global response norm over its positions, laid out channels
    last or first. Its epsilon is its float attribute ``eps``, else ConvNeXt V2's 1e-6.

    A probe whose norms are small against that epsilon, with random weights, tells the layouts and
    epsilons apart (the module itself is not touched)."""
    if isinstance(module, _TORCH_NORMS):  # a subclass of torch's norms is one of them (a layer norm written out)
        return None
    parameters = dict(module.named_parameters(recurse=False))
    weight, bias = parameters.get("weight"), parameters.get("bias")
    if (len(module._modules) or len(parameters) != 2 or next(module.buffers(recurse=False), None) is not None
            or weight is None or bias is None or weight.shape != bias.shape or not weight.is_floating_point()
            or sum(size != 1 for size in weight.shape) > 1):
        return None
    eps = module.__dict__.get("eps", 1e-6)
    if not isinstance(eps, float):
        return None
    for dim in (-1, 1):
        if _computes_response_norm(module, dim, eps):
            return ResponseNormRule(dim, eps)
    return None


def _computes_response_norm(module: nn.Module, dim: int, eps: float) -> bool:
    weight = module.weight
    channels = weight.numel()
    generator = torch.Generator().manual_seed(0)
    scale = eps * 25  # each channel's norm over 15 positions is about 100 eps: eps counts
    probe = torch.randn((2, 3, 5, channels) if dim == -1 else (2, channels, 3, 5), generator=generator) * scale
    vectors = {"weight": torch.rand(channels, generator=generator) + 0.5,
               "bias": (torch.rand(channels, generator=generator) - 0.5) * scale}
    vectors = {name: v.reshape(weight.shape).to(weight) for name, v in vectors.items()}
    probe = probe.to(weight)
    try:
        with torch.no_grad():
            result = functional_call(module, vectors, (probe,))
    except Exception:  # noqa: BLE001 - not this computation (or not runnable here: meta tensors)
        return False
    if not isinstance(result, torch.Tensor) or result.shape != probe.shape:
        return False
    expected = global_response_norm(probe, vectors["weight"], vectors["bias"], dim, eps)
    return bool(torch.allclose(result, expected, rtol=1e-4, atol=scale * 1e-5))


def register(registry) -> None:
    registry.add_recogniser(recognise_response_norm)
