"""ShuffleNetV2's block in an equivalent form whose channel split and shuffle are gathers.

The block splits its input in two halves with ``x.chunk(2)``, passes one half through, runs the
other through ``branch2``, and interleaves the two with ``channel_shuffle(out, 2)``
(``view``/``transpose``/``view``). Run on fewer channels, that code still cuts at the middle and
interleaves one by one: each half must keep as many channels, and the shuffle pairs every passed
channel with a branch channel, block after block, so at most half of the stream could go. As
gathers, ``order(cat(x, branch2(second_half(x))))``, the same channels go anywhere: the speedup
renumbers the gathers' indices.
"""

from __future__ import annotations

import sys
from typing import Hashable, Optional

import torch
from torch import nn

from speedup.modules import ChannelGather
from speedup.plugins.registry import RuleRegistry
from speedup.tracer import onednn_off

BLOCK = "torchvision.models.shufflenetv2.InvertedResidual"


class GatheredInvertedResidual(nn.Module):
    """``InvertedResidual`` computing the same: ``order`` picks the shuffled output from the
    concatenation of the input (stride 1; ``branch_input`` picks ``branch2``'s half of it) or of
    ``branch1``'s output (stride 2) with ``branch2``'s output."""

    def __init__(self, stride: int, branch1: nn.Module, branch2: nn.Module, branch_input: Optional[ChannelGather],
                 order: ChannelGather):
        super().__init__()
        self.stride = stride
        self.branch1, self.branch2 = branch1, branch2
        self.branch_input, self.order = branch_input, order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.branch_input is not None:
            out = torch.cat((x, self.branch2(self.branch_input(x))), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return self.order(out)


def gathered_inverted_residual(block: nn.Module) -> Optional[GatheredInvertedResidual]:
    """The gathered form of a torchvision ``InvertedResidual``, checked against the block on a probe;
    ``None`` for a block built differently from torchvision's."""
    from torchvision.models.shufflenetv2 import channel_shuffle

    first = block.branch2[0] if isinstance(block.branch2, nn.Sequential) and len(block.branch2) else None
    if not isinstance(first, nn.Conv2d):
        return None
    half = first.out_channels  # each of the two parts the output is shuffled from
    device = first.weight.device
    if block.stride == 1:
        inputs = 2 * first.in_channels
        branch_input = ChannelGather(torch.arange(inputs - first.in_channels, inputs, device=device))
        part_start = torch.tensor([0, inputs])  # the passed half of x, then branch2's output
    else:
        inputs = first.in_channels
        branch_input = None
        part_start = torch.tensor([0, half])
    shuffled = channel_shuffle(torch.arange(2 * half).view(1, 2 * half, 1, 1), 2).reshape(-1)
    order = ChannelGather((part_start[shuffled // half] + shuffled % half).to(device))
    form = GatheredInvertedResidual(block.stride, block.branch1, block.branch2, branch_input, order)
    build = _build(block, inputs)
    if build is not None and build in _CHECKED_BUILDS:
        return form
    if not _computes_the_same(block, form, inputs):
        return None
    if build is not None and len(_CHECKED_BUILDS) < _MOST_BUILDS_KEPT:
        _CHECKED_BUILDS.add(build)
    return form


_CHECKED_BUILDS: set[Hashable] = set()
"""Builds of a block whose form passed the probe (see :func:`_build`): a model's blocks repeat a
few builds (ShuffleNetV2 x0.5: 16 blocks, 6 builds), and each probe runs the block twice, which cost
a fifth of the speedup call."""

_MOST_BUILDS_KEPT = 1024


def _build(block: nn.Module, inputs: int) -> Optional[Hashable]:
    """What decides whether the form computes what ``block`` computes: the code it runs (its
    ``forward`` and the ``channel_shuffle`` that code calls), its stride, its input channels, and
    each part's type and sizes. ``None`` (probe every time) unless every part is a ``torch.nn``
    module without hooks: for those, ``extra_repr`` states every size the part has; a part of
    another type may hold sizes it does not show."""
    parts = []
    for part in block.modules():
        if part is not block and not type(part).__module__.startswith("torch.nn.modules."):
            return None
        if part._forward_hooks or part._forward_pre_hooks:
            return None
        parts.append((type(part), part.extra_repr()))
    code = sys.modules.get(type(block).__module__)
    return (type(block), type(block).forward, getattr(code, "channel_shuffle", None), block.stride, inputs,
            tuple(parts))


def _computes_the_same(block: nn.Module, form: nn.Module, channels: int) -> bool:
    """Both run in eval mode on one probe (a block in train mode would update its statistics)."""
    modes = [(m, m.training) for m in (*block.modules(), *form.modules())]
    parameter = next(block.parameters(), None)
    like = {"dtype": parameter.dtype, "device": parameter.device} if parameter is not None else {}
    probe = torch.randn(2, channels, 6, 6, generator=torch.Generator().manual_seed(0)).to(**like)
    try:
        block.eval()
        form.eval()
        # Without oneDNN: it would first build kernels for the probe's shapes, which took longer
        # than running the probe (a few milliseconds a build of block).
        with torch.no_grad(), onednn_off():
            expected, actual = block(probe.clone()), form(probe.clone())
    except Exception:  # noqa: BLE001 - a block this form does not describe stays as it is
        return False
    finally:
        for module, mode in modes:
            module.training = mode
    return expected.shape == actual.shape and torch.allclose(expected, actual, rtol=1e-5, atol=1e-6)


def register(registry: RuleRegistry) -> None:
    registry.add_rewrite(BLOCK, gathered_inverted_residual)
