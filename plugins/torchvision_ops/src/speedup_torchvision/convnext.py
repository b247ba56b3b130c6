"""ConvNeXt's ``LayerNorm2d``: a ``LayerNorm`` over the channels of an ``(N, C, H, W)`` tensor.

It subclasses ``nn.LayerNorm`` but overrides ``forward`` (permute, normalise the last dimension,
permute back), so core's LayerNorm rule does not claim it. The same analysis applies with the
channel dimension normalised instead of the last one; a removed channel holding a constant still
counts in the mean and variance, which :class:`ConstantAwareLayerNorm2d` adds back.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from speedup.graph import Node
from speedup.modules import ConstantAwareLayerNorm
from speedup.plugins.registry import RuleRegistry
from speedup.rules.norm import LayerNormRule

CHANNELS = 1


class ConstantAwareLayerNorm2d(ConstantAwareLayerNorm):
    """``LayerNorm2d`` over the kept channels whose statistics also count removed constant channels."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return super().forward(input.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class LayerNorm2dRule(LayerNormRule):
    subclasses = False

    def normalized_dim(self, node: Node) -> Optional[int]:
        return CHANNELS

    def constant_aware(self, new: nn.Module, full_size: int, values: torch.Tensor) -> nn.Module:
        return ConstantAwareLayerNorm2d.convert(new, full_size, values)


def register(registry: RuleRegistry) -> None:
    registry.add_module("torchvision.models.convnext.LayerNorm2d", LayerNorm2dRule())
