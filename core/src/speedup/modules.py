"""Modules that a sped-up model may contain in place of torch's own, where an exact result needs them.

Each is a subclass of the torch module it replaces (``isinstance`` checks keep working) and exists
because removing channels that hold constants changes something the torch module cannot express:

* :class:`FoldedConv2d` (and 1d/3d): the contribution of removed constant input channels is not
  uniform near zero-padded borders, so it is added as a per-position map.
* :class:`ConstantAwareLayerNorm` / :class:`ConstantAwareRMSNorm`: normalisation statistics were
  taken over the full hidden size, including channels that were removed because they held
  constants; the statistics still count them.

They are importable by name, so a pickled sped-up model loads wherever speedup is installed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class _ConstantMap:
    """Adds the exact contribution of folded constant input channels to a convolution's output.

    ``constant_kernel`` is ``(out_channels, 1, *kernel_size)``: ``sum_c v_c W[:, c]`` over the
    removed input channels ``c`` holding ``v_c``. On an input of spatial size ``s`` the
    contribution is that kernel applied, depthwise, to an image of ones of size ``s`` (cached per
    size, device and dtype, since it does not depend on the input's values).
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return super().forward(input) + self._constant_map(input)

    def _constant_map(self, input: torch.Tensor) -> torch.Tensor:
        kernel = self.constant_kernel
        spatial = tuple(input.shape[-(kernel.dim() - 2):])
        key = (spatial, input.device, input.dtype)
        cache = self.__dict__.setdefault("_constant_cache", {})
        cached = cache.get(key)
        if cached is None:
            ones = torch.ones((1, kernel.shape[0]) + spatial, device=input.device, dtype=input.dtype)
            cached = _CONV[kernel.dim() - 2](ones, kernel.to(input.dtype), None, self.stride, self.padding,
                                             self.dilation, kernel.shape[0])
            if input.dim() == kernel.dim() - 1:
                cached = cached[0]
            cache.clear()
            cache[key] = cached
        return cached


class FoldedConv1d(_ConstantMap, nn.Conv1d):
    """A ``Conv1d`` with removed constant input channels folded exactly (see :class:`_ConstantMap`)."""


class FoldedConv2d(_ConstantMap, nn.Conv2d):
    """A ``Conv2d`` with removed constant input channels folded exactly (see :class:`_ConstantMap`)."""


class FoldedConv3d(_ConstantMap, nn.Conv3d):
    """A ``Conv3d`` with removed constant input channels folded exactly (see :class:`_ConstantMap`)."""


class _RemovedConstants:
    """Statistics of hidden channels removed because they held constants: count, sum, sum of squares."""

    full_size: int

    def _remember(self, full_size: int, values: torch.Tensor) -> None:
        self.full_size = full_size
        self.register_buffer("removed_sum", values.sum().to(torch.float32).reshape(()))
        self.register_buffer("removed_square_sum", values.pow(2).sum().to(torch.float32).reshape(()))
        self.removed_count = int(values.numel())


class ConstantAwareLayerNorm(_RemovedConstants, nn.LayerNorm):
    """``LayerNorm`` over the last dimension whose mean and variance also count removed constants."""

    @classmethod
    def from_layer_norm(cls, norm: nn.LayerNorm, full_size: int, removed_values: torch.Tensor) -> "ConstantAwareLayerNorm":
        norm.__class__ = cls
        norm._remember(full_size, removed_values)
        return norm

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        n = self.full_size
        s1 = self.removed_sum.to(input.dtype)
        mean = (input.sum(-1, keepdim=True) + s1) / n
        centered = input - mean
        square = centered.pow(2).sum(-1, keepdim=True) + self.removed_square_sum.to(input.dtype)
        square = square - 2 * mean * s1 + self.removed_count * mean.pow(2)
        out = centered * torch.rsqrt(square / n + self.eps)
        if self.weight is not None:
            out = out * self.weight
        if self.bias is not None:
            out = out + self.bias
        return out


if hasattr(nn, "RMSNorm"):  # torch >= 2.4

    class ConstantAwareRMSNorm(_RemovedConstants, nn.RMSNorm):
        """``RMSNorm`` over the last dimension whose mean square also counts removed constants."""

        @classmethod
        def from_rms_norm(cls, norm: nn.RMSNorm, full_size: int, removed_values: torch.Tensor) -> "ConstantAwareRMSNorm":
            norm.__class__ = cls
            norm._remember(full_size, removed_values)
            return norm

        def forward(self, input: torch.Tensor) -> torch.Tensor:
            eps = self.eps if self.eps is not None else torch.finfo(input.dtype).eps
            square = (input.pow(2).sum(-1, keepdim=True) + self.removed_square_sum.to(input.dtype)) / self.full_size
            out = input * torch.rsqrt(square + eps)
            return out * self.weight if self.weight is not None else out
