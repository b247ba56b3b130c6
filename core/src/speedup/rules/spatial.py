"""Pooling and resampling: the last 1-3 (spatial) dimensions change, the others pass through.

A zero channel stays zero. A constant channel stays the same constant wherever each output element
averages or picks input elements of that channel alone (max pooling, adaptive pooling, nearest and
linear interpolation, whose weights sum to one); average pooling that counts zero padding dilutes
it near the borders, so there only zeros are known.
"""

from __future__ import annotations

import re

import torch

from ..graph import Node
from ..propagation import Analysis
from ..rule import DimConst, OpRule, bind

_POOLS_1D_TO_3D = ["max_pool{}d_with_indices", "max_pool{}d", "avg_pool{}d", "_adaptive_avg_pool{}d",
                   "adaptive_avg_pool{}d", "adaptive_max_pool{}d", "fractional_max_pool{}d", "lp_pool{}d"]
_RESAMPLE = ["upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d", "_upsample_nearest_exact1d",
             "_upsample_nearest_exact2d", "_upsample_nearest_exact3d", "upsample_linear1d", "upsample_bilinear2d",
             "upsample_bicubic2d", "upsample_trilinear3d", "_upsample_bilinear2d_aa", "_upsample_bicubic2d_aa"]


def _spatial(node: Node) -> int:
    match = re.search(r"(\d)d", node.target._opname)
    return int(match.group(1)) if match else 2


class Spatial(OpRule):
    def couple(self, node: Node, ctx: Analysis) -> None:
        x = node.args[0]
        keep = x.ndim - _spatial(node)
        for out in node.outputs:
            if out.ndim == x.ndim:
                for d in range(keep):
                    ctx.link(x, d, out, d)

    def forward(self, node: Node, ctx: Analysis) -> None:
        x = node.args[0]
        uniform = self._keeps_constants(node)
        for out in node.outputs[:1]:
            for d in range(x.ndim - _spatial(node)):
                consts = ctx.const(x, d)
                if consts is not None:
                    mask = consts.mask if uniform else consts.zero
                    ctx.set_const(out, d, DimConst.where(mask, consts.value))

    def backward(self, node: Node, ctx: Analysis) -> None:
        x = node.args[0]
        demanded = [out for out in node.outputs if ctx.is_demanded(out) and out.ndim == x.ndim]
        if demanded:
            keep = x.ndim - _spatial(node)
            ctx.demand(x, {d: torch.stack([ctx.demanded(out, d) for out in demanded]).any(0) for d in range(keep)})

    def _keeps_constants(self, node: Node) -> bool:
        name = node.target._opname
        if name.startswith("avg_pool"):
            a = bind(node)
            padding = a.get("padding", 0)
            padded = any(p for p in (padding if isinstance(padding, (list, tuple)) else [padding]))
            return not padded or not a.get("count_include_pad", True)
        return not name.startswith("lp_pool")


def register(registry) -> None:
    rule = Spatial()
    names = [p.format(n) for p in _POOLS_1D_TO_3D for n in (1, 2, 3)] + _RESAMPLE
    registry.add_ops([f"aten.{name}" for name in names], rule)
