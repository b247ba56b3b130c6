"""Norms written by hand followed, inside their module, by an activation: timm's ``RmsNormAct2d``
(MobileNetV5, Gemma 3n's vision tower) normalises, then runs its ``drop`` and ``act`` children.

A recogniser of :mod:`.written_norms` looks at leaves only, so such a module was traced through: its
mean square over the channels read every channel, and every layer around it kept its width (2/3 of
MobileNetV5's layers). Here the module is probed with its children replaced by ``nn.Identity``; where
that is a norm the written-norm recognisers know, and the module's result is its children applied in
order to that norm's, each child being the same function of every entry (a permutation of the entries
commutes with it), the module is claimed with the norm's rule, its constants passed through the
children.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..cloning import clone_module
from ..graph import Node
from ..modules import GatheredNorm
from ..propagation import Analysis
from ..replacement import ModulePlan
from ..rule import DimConst, ModuleRule
from .norm_vectors import probe_matches
from .written_norms import recognise_layer_norm, recognise_rms_norm


class ActivatedNormRule(ModuleRule):
    """The rule of the norm a module computes (``norm``), followed by the module's entry-by-entry
    children (``after``, in order): constants of the norm's outputs go through them, and a replacement
    that is no longer the module's own class is followed by copies of them."""

    def __init__(self, norm: ModuleRule, after: list[nn.Module]):
        self.norm, self.after = norm, after
        for name in ("name", "rechecks_shapes", "varies_with_input_sizes", "subclasses", "lazy_masks",
                     "unrecorded_forward"):
            setattr(self, name, getattr(norm, name))

    def couple(self, node: Node, ctx: Analysis) -> None:
        self.norm.couple(node, ctx)

    def forward(self, node: Node, ctx: Analysis) -> None:
        self.norm.forward(node, _ConstantsThrough(ctx, self._activated))

    def backward(self, node: Node, ctx: Analysis) -> None:
        self.norm.backward(node, ctx)

    def masked_forward(self, module: nn.Module, masks: dict) -> Any:
        return self.norm.masked_forward(module, masks)

    def replace(self, module: nn.Module, plan: ModulePlan) -> nn.Module:
        new = self.norm.replace(module, plan)
        norm = new.norm if isinstance(new, GatheredNorm) else new
        if type(norm) is type(module):
            return new  # its own forward runs the children
        return nn.Sequential(new, *(clone_module(child) for child in self.after))

    def __getattr__(self, name: str) -> Any:  # what else the engine asks a norm's rule (normalized_dim...)
        if name in ("norm", "after"):
            raise AttributeError(name)
        return getattr(self.norm, name)

    def _activated(self, values: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            for child in self.after:
                values = child(values)
        return values


class _ConstantsThrough:
    """An analysis whose constants set are first passed through ``apply`` (entry by entry)."""

    def __init__(self, ctx: Analysis, apply):
        self._ctx, self._apply = ctx, apply

    def set_const(self, value, dim: int, const: Optional[DimConst]) -> None:
        if const is not None:
            const = DimConst.where(const.mask, self._apply(const.value.float()).to(torch.float64))
        self._ctx.set_const(value, dim, const)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ctx, name)


def recognise_activated_norm(module: nn.Module) -> Optional[ModuleRule]:
    """A written norm (see :mod:`.written_norms`) whose children, all applied entry by entry after it,
    make the module's result (see the module's docstring)."""
    children = list(module._modules.items())
    if not children or all(type(child) is nn.Identity for _, child in children):
        return None  # a leaf, for the written-norm recognisers themselves
    own = [t for t in list(module._parameters.values()) + list(module._buffers.values()) if t is not None]
    if not 1 <= len(own) <= 2 or not all(_holds_nothing(child) for _, child in children):
        return None  # checked before any probe: every module no type claims is asked
    if not all(_entry_by_entry(child) for _, child in children):
        return None
    bare = clone_module(module)
    bare._modules = {name: nn.Identity() for name, _ in children}
    norm = recognise_rms_norm(bare) or recognise_layer_norm(bare)
    if norm is None:
        return None
    after = [clone_module(child).eval() for _, child in children]
    probe = torch.randn(2, own[0].numel(), 3, 5, generator=torch.Generator().manual_seed(0))
    rule, whole, bare = ActivatedNormRule(norm, after), clone_module(module).eval(), bare.eval()
    for layout in (probe, probe.movedim(1, -1).contiguous()):
        try:
            with torch.no_grad():
                expected, result = rule._activated(bare(layout)), whole(layout)
        except Exception:  # noqa: BLE001 - a layout the module does not take
            continue
        if isinstance(result, torch.Tensor) and probe_matches(result, expected):
            return rule
    return None


def _holds_nothing(child: nn.Module) -> bool:
    """Whether ``child`` has no parts and holds no tensor (an activation, a dropout)."""
    held = list(child._parameters.values()) + list(child._buffers.values())
    return not child._modules and all(t is None for t in held)


def _entry_by_entry(child: nn.Module) -> bool:
    """Whether ``child`` computes the same function of every entry: its result on a random tensor is
    its input's shape, and permuting the input's entries permutes its result alike."""
    probe = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(1))
    order = torch.randperm(probe.numel(), generator=torch.Generator().manual_seed(2))
    copy_ = clone_module(child).eval()
    try:
        with torch.no_grad():
            result = copy_(probe)
            permuted = copy_(probe.reshape(-1)[order].reshape(probe.shape))
    except Exception:  # noqa: BLE001 - not a function of one tensor
        return False
    return (isinstance(result, torch.Tensor) and result.shape == probe.shape  # vector and scalar loops may round apart
            and torch.allclose(result.reshape(-1)[order], permuted.reshape(-1), rtol=1e-6, atol=1e-7))


def register(registry) -> None:
    registry.add_recogniser(recognise_activated_norm)
