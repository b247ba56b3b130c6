"""Pooling, unpooling, resampling (also at sampled points), rotation: the last 1-3 (spatial)
dimensions change, the others pass through.

A zero channel stays zero. A constant channel stays the same constant wherever each output element
averages or picks input elements of that channel alone (max pooling, adaptive pooling, nearest and
linear interpolation, whose weights sum to one); average pooling that counts zero padding dilutes
it near the borders, so there only zeros are known.
"""

from __future__ import annotations

import re

import torch

from ..graph import Node, TensorValue
from ..propagation import Analysis
from ..rule import OpRule, bind

_POOLS_1D_TO_3D = ["max_pool{}d_with_indices", "max_pool{}d", "avg_pool{}d", "_adaptive_avg_pool{}d",
                   "adaptive_avg_pool{}d", "adaptive_max_pool{}d", "fractional_max_pool{}d", "lp_pool{}d"]
_RESAMPLE = ["upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d", "_upsample_nearest_exact1d",
             "_upsample_nearest_exact2d", "_upsample_nearest_exact3d", "upsample_linear1d", "upsample_bilinear2d",
             "upsample_bicubic2d", "upsample_trilinear3d", "_upsample_bilinear2d_aa", "_upsample_bicubic2d_aa"]


def _spatial(node: Node) -> int:
    match = re.search(r"(\d)d", node.target._opname)
    return int(match.group(1)) if match else 2


class Spatial(OpRule):
    """The last 1-3 dimensions (``_spatial``) change; the leading ones pass through to every output
    of the same rank, from the first argument and from the ``carriers(node)`` besides it."""

    def passing(self, node: Node) -> list[int]:
        return list(range(node.args[0].ndim - _spatial(node)))

    def carriers(self, node: Node) -> list[TensorValue]:
        return [node.args[0]]

    def couple(self, node: Node, ctx: Analysis) -> None:
        passing = self.passing(node)
        for x in self.carriers(node):
            for out in node.outputs:
                if out.ndim == x.ndim:
                    for d in passing:
                        ctx.link(x, d, out, d)

    def forward(self, node: Node, ctx: Analysis) -> None:
        x = node.args[0]
        uniform = self._keeps_constants(node)
        for out in node.outputs[:1]:
            for d in self.passing(node):
                consts = ctx.const(x, d)
                if consts is not None:
                    ctx.set_const(out, d, consts if uniform else consts.only_zeros())

    def backward(self, node: Node, ctx: Analysis) -> None:
        x = node.args[0]
        demanded = [out for out in node.outputs if ctx.is_demanded(out) and out.ndim == x.ndim]
        if demanded:
            needed = {d: torch.stack([ctx.demanded(out, d) for out in demanded]).any(0) for d in self.passing(node)}
            for carrier in self.carriers(node):
                ctx.demand(carrier, needed)

    def _keeps_constants(self, node: Node) -> bool:
        name = node.target._opname
        if name.startswith("avg_pool"):
            a = bind(node)
            padding = a.get("padding", 0)
            padded = any(p for p in (padding if isinstance(padding, (list, tuple)) else [padding]))
            if a.get("divisor_override") is not None:  # a sum of the window's entries, divided by a number
                return False
            return not padded or not a.get("count_include_pad", True)
        return not name.startswith(("lp_pool", "max_unpool"))


class Unpool(Spatial):
    """``max_unpool2d/3d(x, indices, size)``: each value goes to its position in a larger map of
    zeros (only zeros stay constant); ``indices`` come with ``x``, entry for entry."""

    def carriers(self, node: Node) -> list[TensorValue]:
        return [node.args[0], node.args[1]]


class Rotation(Spatial):
    """``rot90(x, k, dims)``: the two rotated dimensions keep their size; the others pass through,
    constants included (a rotated slice holds the same values)."""

    def passing(self, node: Node) -> list[int]:
        x, rotated = node.args[0], bind(node)["dims"]
        return [d for d in range(x.ndim) if d not in {r % x.ndim for r in rotated}]

    def _keeps_constants(self, node: Node) -> bool:
        return True


class GridSample(OpRule):
    """``grid_sampler_2d/3d(x, grid, mode, padding_mode, align_corners)``: channels pass through
    from ``x`` (its spatial dimensions are read whole); batch entries and output positions come
    from ``grid`` (its last dimension, the coordinates, is read whole). A zero channel samples
    zeros; a constant one samples that constant unless points outside read zero padding
    (``padding_mode`` 0)."""

    def couple(self, node: Node, ctx: Analysis) -> None:
        x, grid, out = node.args[0], node.args[1], node.outputs[0]
        ctx.link(x, 0, out, 0)
        ctx.link(grid, 0, out, 0)
        ctx.link(x, 1, out, 1)
        for d in range(1, grid.ndim - 1):
            ctx.link(grid, d, out, d + 1)

    def forward(self, node: Node, ctx: Analysis) -> None:
        consts = ctx.const(node.args[0], 1)
        if consts is not None:
            ctx.set_const(node.outputs[0], 1, consts if bind(node)["padding_mode"] != 0 else consts.only_zeros())

    def backward(self, node: Node, ctx: Analysis) -> None:
        x, grid, out = node.args[0], node.args[1], node.outputs[0]
        if not ctx.is_demanded(out):
            return
        ctx.demand(x, {0: ctx.demanded(out, 0), 1: ctx.demanded(out, 1)})
        ctx.demand(grid, {d: ctx.demanded(out, 0 if d == 0 else d + 1) for d in range(grid.ndim - 1)})


class AffineGrid(OpRule):
    """``affine_grid_generator(theta, size, align_corners)``: each sample's sampling points from its own
    affine matrix (``theta`` of ``(N, 2, 3)`` or ``(N, 3, 4)``, read whole). Samples correspond; the
    points and their coordinates are new dimensions, of sizes the call gives."""

    def couple(self, node: Node, ctx: Analysis) -> None:
        ctx.link(node.args[0], 0, node.outputs[0], 0)

    def backward(self, node: Node, ctx: Analysis) -> None:
        theta, out = node.args[0], node.outputs[0]
        if ctx.is_demanded(out):
            ctx.demand(theta, {0: ctx.demanded(out, 0)})


def register(registry) -> None:
    rule = Spatial()
    names = [p.format(n) for p in _POOLS_1D_TO_3D for n in (1, 2, 3)] + _RESAMPLE
    registry.add_ops([f"aten.{name}" for name in names], rule)
    registry.add_ops(["aten.max_unpool2d", "aten.max_unpool3d"], Unpool())
    registry.add_op("aten.rot90", Rotation())
    registry.add_ops(["aten.grid_sampler_2d", "aten.grid_sampler_3d"], GridSample())
    registry.add_op("aten.affine_grid_generator", AffineGrid())
