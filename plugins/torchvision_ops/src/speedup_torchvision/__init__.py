"""speedup rules for torchvision layers, registered through the ``speedup`` entry-point group."""

from __future__ import annotations

from speedup import hookimpl
from speedup.plugins.registry import RuleRegistry
from speedup.rules.norm import ChannelNormRule
from torchvision.ops.misc import FrozenBatchNorm2d

__version__ = "0.1.0"


@hookimpl
def speedup_register_rules(registry: RuleRegistry) -> None:
    # FrozenBatchNorm2d is a per-channel affine map held in buffers: BatchNorm in eval mode.
    registry.add_module(FrozenBatchNorm2d, ChannelNormRule())
