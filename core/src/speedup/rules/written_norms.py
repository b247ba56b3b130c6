"""Layer norms and RMS norms written by hand, claimed by what they compute.

Model code writes its norms out (``(x - mean) / sqrt(var + eps)``, ``F.layer_norm`` in a forward of
its own, ``x * rsqrt(mean(x^2) + eps)``) under names no plugin lists, calls their vectors what it likes
(:mod:`.norm_vectors`) and keeps the epsilon in an attribute or writes it in the code. Traced through,
such a norm reads every channel for its statistics and keeps the residual stream it normalises whole;
claimed as a norm, the stream's channels go and the norm counts the removed constants.

A candidate is a leaf holding one or two channel vectors and nothing else. It is run with random
vectors on probes laid out channels first and channels last, and claimed where its results are the
norm's. An epsilon attribute is any float attribute whose name says ``eps``; without one, the usual
epsilons are tried on probes small enough that the epsilon weighs, so that only the right one matches.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..graph import Node
from ..modules import ConstantAwareChannelsFirstLayerNorm, ConstantAwareLayerNorm
from ..propagation import Analysis
from ..replacement import ModulePlan
from ..rule import ModuleRule
from .norm import LayerNormRule, _passing_kept_outputs, _rms_norm_zeros
from .norm_vectors import TORCH_LAYOUT, NormVectors, probe_matches, readings, run_with
from .toolkit import clone_module

_USUAL_EPS = (1e-5, 1e-6, 1e-12, 1e-8, 1e-3, 1e-4, 1e-7, 1e-10)
"""Epsilons code writes in: a norm holding no epsilon attribute is tried with each."""
_SMALL_PROBES = (1e-2, 1e-4)
"""Scales of further probes, whose mean squares are near such epsilons, so that only the right one matches."""


class RecognisedLayerNormRule(LayerNormRule):
    """A module found to compute a LayerNorm over dimension ``dim`` (1 or -1) with epsilon ``eps`` by
    :func:`recognise_layer_norm`, its scale and shift read as ``vectors`` says. It keeps its own
    ``forward`` on fewer entries; where removed entries held constants it becomes an ``nn.LayerNorm``
    counting them (:class:`~speedup.modules.ConstantAwareLayerNorm`, over dimension 1
    :class:`~speedup.modules.ConstantAwareChannelsFirstLayerNorm`)."""

    def __init__(self, dim: int, eps: float = 1e-5, vectors: NormVectors = TORCH_LAYOUT):
        self.dim, self.eps, self.vectors = dim, eps, vectors

    def normalized_dim(self, node: Node) -> Optional[int]:
        return self.dim

    def constant_aware(self, new: nn.Module, full_size: int, values: torch.Tensor) -> nn.Module:
        scale = getattr(new, self.vectors.scale)
        norm = nn.LayerNorm(scale.numel(), self.eps, elementwise_affine=False, device=scale.device, dtype=scale.dtype)
        _hold_vector(norm, "weight", scale)
        if self.vectors.shift is not None:
            _hold_vector(norm, "bias", getattr(new, self.vectors.shift))
        norm.elementwise_affine = True
        kind = ConstantAwareLayerNorm if self.dim == -1 else ConstantAwareChannelsFirstLayerNorm
        return kind.convert(norm, full_size, values)


def _hold_vector(norm: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Gives a torch norm the vector ``name`` holding ``tensor``'s entries: a parameter where ``tensor``
    is one (itself where it is a vector), else a buffer."""
    if isinstance(tensor, nn.Parameter):
        setattr(norm, name, tensor if tensor.dim() == 1 else
                nn.Parameter(tensor.detach().reshape(-1), requires_grad=tensor.requires_grad))
    else:
        del norm._parameters[name]
        norm.register_buffer(name, tensor.reshape(-1))


def recognise_layer_norm(module: nn.Module) -> Optional[ModuleRule]:
    """A LayerNorm over one dimension written without being a type the rules claim: timm's
    ``LayerNorm`` and ``LayerNorm2d`` (``F.layer_norm`` in a ``forward`` of their own), Hugging Face's
    ``ConvNextLayerNorm`` and Cohere's ``CohereLayerNorm`` (the statistics written out), SqueezeBERT's
    ``nn.LayerNorm`` subclass permuting ``(N, C, L)`` around its parent's ``forward``, ConvNeXt's and
    x-transformers' (``gamma`` with a ``beta`` buffer), and the like."""
    for vectors in readings(module, shift=True):
        for dim in (1, -1):
            rule = _layer_norm_epsilon(module, vectors, dim)
            if rule is not None:
                return rule
    return None


def _layer_norm_epsilon(module: nn.Module, vectors: NormVectors, dim: int) -> Optional[RecognisedLayerNormRule]:
    def norm(eps: float) -> Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]:
        return lambda probe, scale, shift: F.layer_norm(probe.movedim(dim, -1), scale.shape, scale, shift,
                                                        eps).movedim(-1, dim)

    if not _computes(module, vectors, dim, norm(1e-6), (1.0,)):
        return None  # not a layer norm over ``dim``, whatever its epsilon
    attributes = _epsilon_attributes(module)
    for eps in [module.__dict__[name] for name in attributes] or _USUAL_EPS:
        if attributes or _computes(module, vectors, dim, norm(eps), _SMALL_PROBES):
            return RecognisedLayerNormRule(dim, eps, vectors)
    return None


def _epsilon_attributes(module: nn.Module) -> list[str]:
    """The module's float attributes named for an epsilon (``eps``, ``variance_epsilon``, ``norm_eps``...)."""
    return [name for name, value in module.__dict__.items() if isinstance(value, float) and "eps" in name.lower()]


def _computes(module: nn.Module, vectors: NormVectors, dim: int,
              norm: Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor],
              scales: tuple[float, ...], attributes: Optional[dict] = None) -> bool:
    """Whether ``module``, holding random vectors, gives ``norm(probe, scale, shift)`` on random probes
    of each of ``scales`` laid out with the channels along ``dim`` (1: images or sequences; a module
    may take either only), with ``attributes`` set on it."""
    reference = getattr(module, vectors.scale)
    channels = reference.numel()
    generator = torch.Generator().manual_seed(0)
    scale = torch.rand(channels, generator=generator).add_(0.5)
    shift = torch.rand(channels, generator=generator).sub_(0.5) if vectors.shift is not None else None
    given = {vectors.scale: scale} if shift is None else {vectors.scale: scale, vectors.shift: shift}

    def matches(shape: tuple, size: float) -> bool:
        probe = torch.randn(shape, generator=generator).mul_(size)
        expected = norm(probe, scale, shift).to(reference)
        return probe_matches(run_with(module, given, probe, attributes), expected, size)

    shapes = ((2, channels, 3, 5), (2, channels, 5)) if dim == 1 else ((2, 3, channels),)
    return any(all(matches(shape, size) for size in scales) for shape in shapes)


class ScaledRMSNormRule(LayerNormRule):
    """An RMS norm written in Python: ``(offset + scale) * x * rsqrt(mean(x^2, dim) + eps)``, its epsilon
    in the attribute ``eps_attribute`` (Llama's ``LlamaRMSNorm``: offset 0, ``variance_epsilon``;
    Gemma's: offset 1, ``eps``; timm's ``RmsNorm2d``: dimension 1, channels first) or written in its
    code (``eps_attribute`` None, the epsilon ``eps``).

    A hidden entry may go where it holds a constant, which must still count in the mean square. With an
    epsilon attribute the replacement stays an instance of the module's own class, so a saved model
    needs no new code: with ``N`` entries before, ``n`` kept and ``s`` the sum of squares of the removed
    constants,
    ``g * x * rsqrt((sum x^2 + s) / N + eps) == (g * sqrt(N / n)) * x * rsqrt(sum x^2 / n + (eps * N + s) / n)``,
    so the scale ``g = offset + scale`` grows by ``sqrt(N / n)`` and the epsilon becomes
    ``(eps * N + s) / n``. An epsilon in the code cannot change: the replacement is then torch's RMS
    norm counting the removed constants (:class:`~speedup.modules.ConstantAwareRMSNorm`).
    """

    subclasses = False

    def __init__(self, offset: float = 0.0, eps_attribute: Optional[str] = "variance_epsilon", dim: int = -1,
                 vectors: NormVectors = TORCH_LAYOUT, eps: Optional[float] = None):
        self.offset, self.eps_attribute, self.dim, self.vectors, self.eps = offset, eps_attribute, dim, vectors, eps

    def normalized_dim(self, node: Node) -> Optional[int]:
        return self.dim

    def forward(self, node: Node, ctx: Analysis) -> None:
        weight, _ = self.vectors.values(node)
        _rms_norm_zeros(node, ctx, weight.to(torch.float64) + self.offset if weight is not None else None, self.dim)

    def replace(self, module: nn.Module, plan: ModulePlan) -> nn.Module:
        new, name = clone_module(module), self.vectors.scale
        weight = plan.param(name)
        full, kept = plan.input().shape[self.dim], plan.count(plan.input(), self.dim)
        _, removed_values = plan.removed_input_constants(self.dim)
        if isinstance(getattr(module, "normalized_shape", None), (tuple, list)):  # timm's RmsNorm2d checks it
            new.normalized_shape = type(module.normalized_shape)([kept])
        setattr(new, name, weight)
        if kept != full and kept != 0:
            if self.eps_attribute is None:
                new = _counting_rms_norm(weight.detach() + self.offset, weight.requires_grad, self.eps, self.dim,
                                         full, removed_values)
            else:
                scaled = (weight.detach() + self.offset) * math.sqrt(full / kept) - self.offset
                setattr(new, name, nn.Parameter(scaled, requires_grad=weight.requires_grad)
                        if isinstance(weight, nn.Parameter) else scaled)
                eps = getattr(module, self.eps_attribute)
                setattr(new, self.eps_attribute, (eps * full + float(removed_values.pow(2).sum())) / kept)
        return _passing_kept_outputs(new, plan, self.dim)


def _counting_rms_norm(weight: torch.Tensor, trains: bool, eps: float, dim: int, full_size: int,
                       removed_values: torch.Tensor) -> nn.Module:
    """Torch's RMS norm scaled by ``weight`` over dimension ``dim`` (-1, or 1 channels first), counting the
    removed constants in its mean square."""
    from ..modules import ConstantAwareChannelsFirstRMSNorm, ConstantAwareRMSNorm

    norm = nn.RMSNorm(weight.numel(), eps, elementwise_affine=False, device=weight.device, dtype=weight.dtype)
    norm.weight = nn.Parameter(weight.reshape(-1), requires_grad=trains)
    norm.elementwise_affine = True
    kind = ConstantAwareRMSNorm if dim == -1 else ConstantAwareChannelsFirstRMSNorm
    return kind.convert(norm, full_size, removed_values)


def recognise_rms_norm(module: nn.Module) -> Optional[ModuleRule]:
    """An RMS norm written in Python under a name no plugin lists (over the last dimension, or over
    channels first as timm's ``RmsNorm2d``): every Hugging Face model family copies ``LlamaRMSNorm`` as
    its own class (``MixtralRMSNorm``, ``Qwen3RMSNorm``...), Gemma's scales by ``1 + weight``; research
    code writes ``F.rms_norm`` with its epsilon in the call.

    Candidates hold one vector and nothing else. An epsilon attribute is set to a large value on the
    probed copy, so that its forward must read it; the module is claimed where the result is
    ``(offset + scale) * x * rsqrt(mean(x^2) + eps)`` for an offset of 0 or 1.
    """
    for vectors in readings(module, shift=False):
        for dim in (-1, 1):
            for offset in (0.0, 1.0):
                rule = _rms_norm_epsilon(module, vectors, dim, offset)
                if rule is not None:
                    return rule
    return None


def _rms_norm_epsilon(module: nn.Module, vectors: NormVectors, dim: int, offset: float) -> Optional[ScaledRMSNormRule]:
    def norm(eps: float) -> Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]:
        def rms_norm(probe: torch.Tensor, scale: torch.Tensor, _: Optional[torch.Tensor]) -> torch.Tensor:
            scale = (offset + scale).reshape((-1,) + (1,) * (probe.dim() - 2)) if dim == 1 else offset + scale
            return scale * probe * torch.rsqrt(probe.pow(2).mean(dim, keepdim=True) + eps)
        return rms_norm

    for attribute in _epsilon_attributes(module):
        if _computes(module, vectors, dim, norm(0.5), (0.1,), {attribute: 0.5}):
            return ScaledRMSNormRule(offset, attribute, dim, vectors)
    if not hasattr(nn, "RMSNorm") or not _computes(module, vectors, dim, norm(1e-6), (1.0,)):
        return None  # (torch < 2.4 has no RMS norm to count removed constants with an epsilon in the code)
    for eps in _USUAL_EPS:
        if _computes(module, vectors, dim, norm(eps), _SMALL_PROBES):
            return ScaledRMSNormRule(offset, None, dim, vectors, eps)
    return None


def register(registry) -> None:
    registry.add_recogniser(recognise_layer_norm)
    registry.add_recogniser(recognise_rms_norm)
