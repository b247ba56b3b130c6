"""Helpers for module rules: copying a module safely, and which constant inputs it can fold."""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from ..graph import Node, TensorValue
from ..propagation import Analysis
from ..rule import DimConst


def clone_module(module: nn.Module) -> nn.Module:
    """A shallow copy that owns its parameter, buffer and submodule tables.

    Keeps the module's class, hooks and every attribute (``copy.copy`` alone would share the
    tables, and setting a parameter on the copy would change the original).
    """
    new = copy.copy(module)
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new._modules = dict(module._modules)
    new._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    return new


def first_input(node: Node) -> TensorValue:
    for arg in list(node.args) + list(node.kwargs.values()):
        if isinstance(arg, TensorValue):
            return arg
    raise ValueError(f"{node.describe()} was called without a tensor input")


def foldable(ctx: Analysis, node: Node, x: TensorValue, dim: int) -> torch.Tensor:
    """Entries of ``x`` along ``dim`` that are constant in every call of this module, with equal values.

    A module can absorb such an input entry into its bias, so it does not need it. A module called
    twice with different constants there could not fold both, so those entries stay.
    """
    consts = ctx.const(x, dim)
    if consts is None:
        return torch.zeros(x.shape[x.dim(dim)], dtype=torch.bool)
    if node.scope in ctx.no_fold:
        return consts.zero
    mask = consts.mask.clone()
    position = [a for a in list(node.args) + list(node.kwargs.values()) if isinstance(a, TensorValue)].index(x)
    for other in ctx.graph.module_calls.get(node.scope, []):
        if other is node:
            continue
        others = [a for a in list(other.args) + list(other.kwargs.values()) if isinstance(a, TensorValue)]
        if position >= len(others) or others[position].shape != x.shape:
            return torch.zeros_like(mask)
        theirs: Optional[DimConst] = ctx.const(others[position], dim)
        if theirs is None:
            return torch.zeros_like(mask)
        mask &= theirs.mask & (theirs.value == consts.value)
    return mask


def param_data(node: Node, name: str) -> Optional[torch.Tensor]:
    value = node.params.get(name)
    return value.data.detach() if value is not None and value.data is not None else None


def nonzero_any(weight: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """``True`` where a slice of ``weight`` has a non-zero element, reducing over ``dims``."""
    return weight.detach().abs().amax(dim=dims) > 0 if dims else weight.detach() != 0
