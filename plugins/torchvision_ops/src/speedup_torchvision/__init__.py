"""speedup rules for torchvision layers, registered through the ``speedup`` entry-point group.

Types are registered by qualified name, so loading the plugin does not import torchvision; a rule
applies when a model contains such a module. What torchvision models run beyond plain torch
modules and operators: ``FrozenBatchNorm2d``, ConvNeXt's ``LayerNorm2d``, Swin's and MaxViT's
attention, the hidden size ViT keeps in an attribute, and ShuffleNetV2's block in an equivalent
form whose channel split and shuffle are gathers (so any channel can go). Everything else they
use (``Permute``, ``StochasticDepth``, ``SqueezeExcitation``, window partitions) is recorded as
the torch operators it calls, which core's rules follow.
"""

from __future__ import annotations

from speedup import hookimpl
from speedup.plugins.pruning_registry import ChannelLayout, PruningRegistry
from speedup.plugins.registry import RuleRegistry
from speedup.rules.norm import ChannelNormRule

from . import convnext, maxvit, shufflenet, swin, vision_transformer

__version__ = "0.1.0"


@hookimpl
def speedup_register_rules(registry: RuleRegistry) -> None:
    # FrozenBatchNorm2d is a per-channel affine map held in buffers: BatchNorm in eval mode.
    registry.add_module("torchvision.ops.misc.FrozenBatchNorm2d", ChannelNormRule())
    convnext.register(registry)
    maxvit.register(registry)
    shufflenet.register(registry)
    swin.register(registry)
    vision_transformer.register(registry)


@hookimpl
def speedup_register_pruning(registry: PruningRegistry) -> None:
    # ConvNeXt's LayerNorm2d normalizes the channels of an (N, C, H, W) tensor: they are dimension 1.
    registry.add_channels("torchvision.models.convnext.LayerNorm2d", ChannelLayout(weight_out=0, weight_in=None, output=1))
