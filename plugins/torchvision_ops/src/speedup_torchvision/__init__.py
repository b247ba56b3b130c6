"""speedup rules for torchvision layers, registered through the ``speedup`` entry-point group.

Types are registered by qualified name, so loading the plugin does not import torchvision; the rule
applies when a model contains such a module.
"""

from __future__ import annotations

from speedup import hookimpl
from speedup.plugins.registry import RuleRegistry
from speedup.rules.norm import ChannelNormRule

__version__ = "0.1.0"


@hookimpl
def speedup_register_rules(registry: RuleRegistry) -> None:
    # FrozenBatchNorm2d is a per-channel affine map held in buffers: BatchNorm in eval mode.
    registry.add_module("torchvision.ops.misc.FrozenBatchNorm2d", ChannelNormRule())
