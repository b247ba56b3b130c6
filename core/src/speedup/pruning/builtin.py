"""Core's pruning pieces for torch modules, registered as part of the ``torch`` plugin."""

from __future__ import annotations

from torch import nn

from . import metrics, scheduling, targets
from ..plugins.pruning_registry import ChannelLayout, PruningRegistry

_CONV = ChannelLayout(weight_out=0, weight_in=1, output=1)
_TRANSPOSED = ChannelLayout(weight_out=1, weight_in=0, output=1)
_NORM = ChannelLayout(weight_out=0, weight_in=None, output=1)

LAYOUTS = {
    nn.Conv1d: _CONV, nn.Conv2d: _CONV, nn.Conv3d: _CONV,
    nn.ConvTranspose1d: _TRANSPOSED, nn.ConvTranspose2d: _TRANSPOSED, nn.ConvTranspose3d: _TRANSPOSED,
    nn.Linear: ChannelLayout(weight_out=0, weight_in=1, output=-1),
    nn.modules.batchnorm._NormBase: _NORM,  # BatchNorm1d/2d/3d, InstanceNorm1d/2d/3d
    nn.GroupNorm: _NORM,
    nn.LayerNorm: ChannelLayout(weight_out=0, weight_in=None, output=-1),
    nn.PReLU: ChannelLayout(weight_out=0, weight_in=None, output=1, parameters=()),
    nn.Embedding: ChannelLayout(weight_out=1, weight_in=None, output=-1, parameters=()),
    nn.MultiheadAttention: ChannelLayout(weight_out=0, weight_in=1, output=-1, weight="in_proj_weight",
                                         parameters=("in_proj_bias",)),
}


def register(registry: PruningRegistry) -> None:
    registry.add_metric("l1", lambda: metrics.Norm(1))
    registry.add_metric("l2", lambda: metrics.Norm(2))
    registry.add_metric("fpgm", metrics.GeometricMedian)
    registry.add_metric("slim", metrics.ScalingFactor)
    registry.add_metric("apoz", lambda **options: metrics.Activation("apoz", **options))
    registry.add_metric("mean_activation", lambda **options: metrics.Activation("mean", **options))
    registry.add_metric("taylor", metrics.Taylor)
    registry.add_metric("random", metrics.Random)
    registry.add_granularity("out_channel", targets.out_channel)
    registry.add_granularity("in_channel", targets.in_channel)
    registry.add_granularity("head", targets.head)
    registry.add_granularity("element", targets.element)
    registry.add_granularity("default", targets.element)  # NNI 3.0's name for element-wise
    registry.add_schedule("one_shot", scheduling.OneShot)
    registry.add_schedule("linear", scheduling.Linear)
    registry.add_schedule("agp", scheduling.AGP)
    for module_type, layout in LAYOUTS.items():
        registry.add_channels(module_type, layout)
