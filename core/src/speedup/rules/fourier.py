"""Fourier transforms (``torch.fft``): long convolutions (S4, Hyena, H3) and spectral layers (FNO).

Along the transformed dimensions every output entry reads every input entry, and their sizes change
(``rfft`` keeps ``n // 2 + 1`` frequencies): they keep their size. The other dimensions (channels,
batch) pass through entry for entry, so a channel may go with what it feeds. A constant channel
transforms to something else than a constant (a spike at frequency zero) except where it is zero,
and complex entries are constants here only where they are zero.
"""

from __future__ import annotations

from ..graph import Node
from ..propagation import Analysis
from ._maps import DimMap, forward_zeros
from .shape import MapRule


class FourierTransform(MapRule):
    """``aten._fft_r2c``, ``_fft_c2r``, ``_fft_c2c``: ``(self, dim, normalization, ...)``."""

    def maps(self, node: Node) -> list[DimMap]:
        x, out = node.args[0], node.outputs[0]
        transformed = {d % x.ndim for d in node.args[1]}
        return [DimMap(x, d, out, d) for d in range(x.ndim) if d not in transformed]

    def forward(self, node: Node, ctx: Analysis) -> None:
        forward_zeros(ctx, self.maps(node))


def register(registry) -> None:
    registry.add_ops(["aten._fft_r2c", "aten._fft_c2r", "aten._fft_c2c"], FourierTransform())
