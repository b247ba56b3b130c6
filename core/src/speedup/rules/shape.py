"""Operators that move entries around without computing: copies, permutations, reshapes, expands.

The reshape rule is the general one: it matches input and output dimensions into groups of equal
size, splits each group into its finest common factors, and expresses every dimension as the
conjunction of the factors it spans. Splitting 768 features into 12 heads of 64 thereby makes
"head 3" a removable unit and "half of head 3" impossible, and flattening ``(C, H, W)`` makes each
channel remove its ``H * W`` features together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..graph import Node, TensorValue
from ..propagation import Analysis
from ..rule import DimConst, OpRule, bind
from ._maps import DescribedByMaps, DimMap, forward_zeros, uniform_const


class MapRule(DescribedByMaps, OpRule):
    """An operator fully described by dimension maps from its first input to its first output."""


class Identity(MapRule):
    """Same shape, same entries: clone, alias, detach, dropout in eval mode..."""

    def maps(self, node: Node) -> list[DimMap]:
        x, out = node.args[0], node.outputs[0]
        return [DimMap(x, d, out, d) for d in range(x.ndim)] if x.shape == out.shape else []


class ComplexView(MapRule):
    """``view_as_complex`` (pairs along the last dimension become one complex entry) and
    ``view_as_real`` (the reverse): the other dimensions pass through; the pair dimension keeps its
    size. A complex entry is a constant here only where it is zero (constants are real numbers)."""

    def maps(self, node: Node) -> list[DimMap]:
        x, out = node.args[0], node.outputs[0]
        return [DimMap(x, d, out, d) for d in range(min(x.ndim, out.ndim))]

    def forward(self, node: Node, ctx: Analysis) -> None:
        forward_zeros(ctx, self.maps(node))


class Triangle(MapRule):
    """``triu`` and ``tril``: the entries of the last two dimensions are zeroed by their positions, so
    those keep their size (a causal mask made in forward); the dimensions before pass through."""

    def maps(self, node: Node) -> list[DimMap]:
        x, out = node.args[0], node.outputs[0]
        return [DimMap(x, d, out, d) for d in range(x.ndim - 2)]

    def forward(self, node: Node, ctx: Analysis) -> None:
        forward_zeros(ctx, self.maps(node))


class Restride(MapRule):
    """``as_strided`` that only changes the strides of size-1 dimensions: the same entries.

    ATen emits it to give a result the memory format of its input (``adaptive_avg_pool2d`` to
    1x1 of a channels-last tensor restrides the mean); the sizes and strides are computed from the
    tensor it runs on, so they follow a smaller one. Any other ``as_strided`` reinterprets memory
    and stays a barrier.
    """

    def maps(self, node: Node) -> list[DimMap]:
        args = bind(node)
        x, size, stride = args["self"], tuple(args["size"]), tuple(args["stride"])
        offset = args.get("storage_offset")
        same = (size == x.shape and offset is None and len(x.strides) == len(size)
                and all(n == 1 or a == b for n, a, b in zip(size, stride, x.strides)))
        return [DimMap(x, d, node.outputs[0], d) for d in range(x.ndim)] if same else []


class Permute(MapRule):
    def maps(self, node: Node) -> list[DimMap]:
        x, out = node.args[0], node.outputs[0]
        name = node.target._opname
        if name == "permute":
            order = [d % max(x.ndim, 1) for d in node.args[1]]
        elif name == "t":
            order = [1, 0] if x.ndim == 2 else list(range(x.ndim))
        else:  # transpose(dim0, dim1)
            order = list(range(x.ndim))
            a, b = (d % max(x.ndim, 1) for d in node.args[1:3])
            order[a], order[b] = order[b], order[a]
        return [DimMap(x, src, out, d) for d, src in enumerate(order)]


class Unsqueeze(MapRule):
    def maps(self, node: Node) -> list[DimMap]:
        x, out = node.args[0], node.outputs[0]
        new = node.args[1] % out.ndim
        return [DimMap(x, d, out, d if d < new else d + 1) for d in range(x.ndim)]


class Squeeze(MapRule):
    def maps(self, node: Node) -> list[DimMap]:
        x, out = node.args[0], node.outputs[0]
        kept = [d for d in range(x.ndim) if not (x.shape[d] == 1 and _squeezed(node, d, x.ndim))]
        return [DimMap(x, d, out, i) for i, d in enumerate(kept)] if len(kept) == out.ndim else []


def _squeezed(node: Node, d: int, ndim: int) -> bool:
    if len(node.args) < 2:
        return True
    dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
    return d in [x % ndim for x in dims]


class Repeat(MapRule):
    """``repeat``: tiles; output entry ``j`` copies input entry ``j % n``. New leading dims are fresh."""

    def maps(self, node: Node) -> list[DimMap]:
        x, out = node.args[0], node.outputs[0]
        offset = out.ndim - x.ndim
        return [
            DimMap(x, d, out, d + offset, torch.arange(out.shape[d + offset]) % x.shape[d] if x.shape[d] else None)
            for d in range(x.ndim)
        ]

    def couple(self, node: Node, ctx: Analysis) -> None:
        super().couple(node, ctx)
        out = node.outputs[0]
        for d in range(out.ndim - node.args[0].ndim):
            ctx.assign(out, d, ctx.fresh(out.shape[d]))


class Expand(OpRule):
    """``expand``: size-1 dimensions become copies; each copy is a removable entry of its own."""

    def couple(self, node: Node, ctx: Analysis) -> None:
        x, out = node.args[0], node.outputs[0]
        offset = out.ndim - x.ndim
        for d in range(out.ndim):
            xd = d - offset
            if xd >= 0 and x.shape[xd] == out.shape[d]:
                ctx.link(x, xd, out, d)
            else:
                ctx.assign(out, d, ctx.fresh(out.shape[d]))
                if xd >= 0:
                    ctx.accept(x, xd)

    def forward(self, node: Node, ctx: Analysis) -> None:
        x, out = node.args[0], node.outputs[0]
        offset = out.ndim - x.ndim
        for d in range(out.ndim):
            xd = d - offset
            same = xd >= 0 and x.shape[xd] == out.shape[d]
            ctx.set_const(out, d, ctx.const(x, xd) if same else uniform_const(ctx, x, out.shape[d]))

    def backward(self, node: Node, ctx: Analysis) -> None:
        x, out = node.args[0], node.outputs[0]
        if not ctx.is_demanded(out):
            return
        offset = out.ndim - x.ndim
        masks = {}
        for d in range(out.ndim):
            xd = d - offset
            need = ctx.demanded(out, d)
            if xd < 0:
                if not bool(need.any()):
                    return
            elif x.shape[xd] == out.shape[d]:
                masks[xd] = need
            else:
                masks[xd] = need.any().reshape(1)
        ctx.demand(x, masks)


@dataclass
class _Group:
    """Input and output dimensions covering the same run of elements, and their common factors."""

    in_dims: list[int]
    out_dims: list[int]
    bounds: list[int]
    """Ascending strides at which some dimension of either side starts: 1 = b0 < b1 < ... = total."""


class Reshape(OpRule):
    """``view`` / ``reshape``: regroups dimensions, splitting and merging as the sizes say."""

    def keep_after_departure(self, node: Node, again: Optional[Node]) -> Optional[set[int]]:
        """The dimensions the call gives a size other than ``-1`` and the plan another size: a literal
        (``view(b, t, -1, self.head_dim)``) does not follow the plan, the ``-1`` next to it does."""
        sizes = list(node.args[1] if again is None else again.args[1])
        planned = node.outputs[0].planned_shape()
        if len(sizes) != len(planned) or not all(isinstance(s, int) for s in sizes):
            return None
        keep = {d for d, (given, want) in enumerate(zip(sizes, planned)) if given != -1 and given != want}
        return keep or None

    def couple(self, node: Node, ctx: Analysis) -> None:
        x, out = node.args[0], node.outputs[0]
        groups = _groups(x.shape, out.shape)
        if groups is None:
            return
        for group in groups:
            if len(group.in_dims) == 1 and len(group.out_dims) == 1:
                ctx.link(x, group.in_dims[0], out, group.out_dims[0])
            elif group.bounds:
                _couple_group(ctx, x, out, group)

    def forward(self, node: Node, ctx: Analysis) -> None:
        x, out = node.args[0], node.outputs[0]
        for group in _groups(x.shape, out.shape) or []:
            if len(group.in_dims) == 1 and len(group.out_dims) == 1:
                ctx.set_const(out, group.out_dims[0], ctx.const(x, group.in_dims[0]))
                continue
            if not group.bounds:
                continue
            sources = [(d, ctx.const(x, d)) for d in group.in_dims]
            sources = [(d, c) for d, c in sources if c is not None]
            for od in group.out_dims:
                ctx.set_const(out, od, _regrouped_const(x, out, group, sources, od))

    def backward(self, node: Node, ctx: Analysis) -> None:
        x, out = node.args[0], node.outputs[0]
        if not ctx.is_demanded(out):
            return
        groups = _groups(x.shape, out.shape)
        if groups is None:
            ctx.demand_all(x)
            return
        masks = {}
        for group in groups:
            needs = [ctx.demanded(out, d) for d in group.out_dims]
            if len(needs) == 1 and len(group.in_dims) == 1:
                masks[group.in_dims[0]] = needs[0]
                continue
            if all(bool(n.all()) for n in needs):
                continue
            if not any(bool(n.any()) for n in needs):
                return
            flat = torch.ones(_size(out, group.out_dims), dtype=torch.bool)
            for d, need in zip(group.out_dims, needs):
                flat &= need[_coordinate(out, group.out_dims, d)]
            for d in group.in_dims:
                masks[d] = torch.zeros(x.shape[d], dtype=torch.bool).index_put_(
                    (_coordinate(x, group.in_dims, d)[flat],), torch.tensor(True))
        ctx.demand(x, masks)


def _groups(in_shape: tuple, out_shape: tuple) -> Optional[list[_Group]]:
    """Matches runs of non-unit dimensions with equal products; ``None`` when they do not match."""
    ins = [d for d, s in enumerate(in_shape) if s != 1]
    outs = [d for d, s in enumerate(out_shape) if s != 1]
    if 0 in in_shape or 0 in out_shape or math.prod(in_shape) != math.prod(out_shape):
        return None
    groups, i, j = [], 0, 0
    while i < len(ins) and j < len(outs):
        gi, go = [ins[i]], [outs[j]]
        pi, po = in_shape[ins[i]], out_shape[outs[j]]
        i, j = i + 1, j + 1
        while pi != po:
            if pi < po:
                if i >= len(ins):
                    return None
                gi.append(ins[i])
                pi *= in_shape[ins[i]]
                i += 1
            else:
                if j >= len(outs):
                    return None
                go.append(outs[j])
                po *= out_shape[outs[j]]
                j += 1
        groups.append(_Group(gi, go, _common_bounds([in_shape[d] for d in gi], [out_shape[d] for d in go])))
    return groups


def _suffix_products(sizes: list[int]) -> list[int]:
    products, acc = [], 1
    for size in reversed(sizes):
        products.append(acc)
        acc *= size
    products.append(acc)
    return products


def _common_bounds(in_sizes: list[int], out_sizes: list[int]) -> list[int]:
    """The strides of the finest factors both sides split into; empty when no such factoring exists."""
    bounds = sorted(set(_suffix_products(in_sizes)) | set(_suffix_products(out_sizes)))
    if any(b % a for a, b in zip(bounds, bounds[1:])):
        return []
    return bounds


def _stride(value: TensorValue, dims: list[int], d: int) -> int:
    return math.prod(value.shape[e] for e in dims[dims.index(d) + 1:])


def _size(value: TensorValue, dims: list[int]) -> int:
    return math.prod(value.shape[d] for d in dims)


def _coordinate(value: TensorValue, dims: list[int], d: int) -> torch.Tensor:
    """For every element of the group (row-major), its index along dimension ``d``."""
    flat = torch.arange(_size(value, dims))
    return (flat // _stride(value, dims, d)) % value.shape[d]


def _factor_span(bounds: list[int], stride: int, size: int) -> list[int]:
    """Indices ``k`` of the factors (stride ``bounds[k]``) that one dimension covers, outermost first."""
    return [k for k in reversed(range(len(bounds) - 1)) if bounds[k] >= stride and bounds[k + 1] <= stride * size]


def _couple_group(ctx: Analysis, x: TensorValue, out: TensorValue, group: _Group) -> None:
    bounds = group.bounds
    sizes = [bounds[k + 1] // bounds[k] for k in range(len(bounds) - 1)]
    factors: list = [None] * len(sizes)
    for d in group.in_dims:
        stride = _stride(x, group.in_dims, d)
        span = _factor_span(bounds, stride, x.shape[d])
        atoms = ctx.atoms(x, d)
        ctx.accept(x, d)
        if atoms is None:
            continue
        if len(span) == 1:
            factors[span[0]] = atoms
            continue
        entries = torch.arange(x.shape[d])
        parts = []
        for k in span:
            factors[k] = ctx.fresh(sizes[k])
            parts.append(factors[k][(entries * stride // bounds[k]) % sizes[k]])
        ctx.define(atoms, torch.stack(parts, 1))
        ctx.note_factoring(atoms, [factors[k] for k in span])
    for d in group.out_dims:
        stride = _stride(out, group.out_dims, d)
        span = [k for k in _factor_span(bounds, stride, out.shape[d]) if factors[k] is not None]
        entries = torch.arange(out.shape[d])
        coordinates = [(entries * stride // bounds[k]) % sizes[k] for k in span]
        parts = [factors[k][c] for k, c in zip(span, coordinates)]
        if not parts:
            ctx.assign(out, d, None)
        elif len(parts) == 1:
            ctx.assign(out, d, parts[0])
        else:
            permuted = ctx.reassembled([factors[k] for k in span], coordinates)
            if permuted is not None:
                ctx.assign(out, d, permuted)  # a split undone in another order: a permutation
                continue
            atoms = ctx.fresh(out.shape[d])
            ctx.define(atoms, torch.stack(parts, 1))
            ctx.assign(out, d, atoms)


def _regrouped_const(x: TensorValue, out: TensorValue, group: _Group, sources: list, od: int) -> Optional[DimConst]:
    """An output entry is constant when the input entries covering it are constant and equal."""
    if not sources:
        return None
    n = out.shape[od]
    outer = _size(out, group.out_dims) // (n * _stride(out, group.out_dims, od))
    inner = _stride(out, group.out_dims, od)
    mask = torch.zeros(n, dtype=torch.bool)
    value = torch.zeros(n, dtype=torch.float64)
    for d, consts in sources:
        coord = _coordinate(x, group.in_dims, d)
        m = consts.mask[coord].reshape(outer, n, inner).permute(1, 0, 2).reshape(n, -1)
        v = consts.value[coord].reshape(outer, n, inner).permute(1, 0, 2).reshape(n, -1)
        found = m.all(1) & (v == v[:, :1]).all(1) & ~mask
        value = torch.where(found, v[:, 0], value)
        mask |= found
    return DimConst.where(mask, value) if bool(mask.any()) else None


class PixelShuffle(OpRule):
    """``pixel_shuffle(r)``: channel ``c * r * r + k`` feeds output channel ``c``; ``pixel_unshuffle`` inverts."""

    def _layout(self, node: Node) -> tuple[TensorValue, TensorValue, torch.Tensor, bool]:
        x, out = node.args[0], node.outputs[0]
        shuffle = node.target._opname == "pixel_shuffle"
        r2 = (x.shape[-3] // out.shape[-3]) if shuffle else (out.shape[-3] // x.shape[-3])
        fine = x if shuffle else out
        return x, out, torch.arange(fine.shape[-3]) // r2, shuffle

    def couple(self, node: Node, ctx: Analysis) -> None:
        x, out, coarse_of_fine, shuffle = self._layout(node)
        for d in range(x.ndim - 3):
            ctx.link(x, d, out, d)
        atoms = ctx.atoms(x, -3)
        ctx.accept(x, -3)
        if atoms is None:
            ctx.assign(out, -3, None)
        elif shuffle:
            coarse = ctx.fresh(out.shape[-3])
            ctx.tie(atoms, coarse[coarse_of_fine])
            ctx.assign(out, -3, coarse)
        else:
            ctx.assign(out, -3, atoms[coarse_of_fine])

    def forward(self, node: Node, ctx: Analysis) -> None:
        x, out, coarse_of_fine, shuffle = self._layout(node)
        for d in range(x.ndim - 3):
            ctx.set_const(out, d, ctx.const(x, d))
        consts = ctx.const(x, -3)
        if consts is None:
            return
        if shuffle:
            m = consts.mask.reshape(out.shape[-3], -1)
            v = consts.value.reshape(out.shape[-3], -1)
            same = m.all(1) & (v == v[:, :1]).all(1)
            ctx.set_const(out, -3, DimConst.where(same, v[:, 0]))
        else:
            ctx.set_const(out, -3, consts.index(coarse_of_fine))

    def backward(self, node: Node, ctx: Analysis) -> None:
        x, out, coarse_of_fine, shuffle = self._layout(node)
        if not ctx.is_demanded(out):
            return
        masks = {d: ctx.demanded(out, d) for d in range(x.ndim - 3)}
        need = ctx.demanded(out, -3)
        if shuffle:
            masks[x.ndim - 3] = need[coarse_of_fine]
        else:
            masks[x.ndim - 3] = need.reshape(x.shape[-3], -1).any(1)
        ctx.demand(x, masks)


def register(registry) -> None:
    registry.add_ops(
        ["aten.clone", "aten.alias", "aten.detach", "aten.lift_fresh", "aten.contiguous", "aten.dropout",
         "aten.feature_dropout", "aten.alpha_dropout", "aten.native_dropout", "aten._conj", "aten.resolve_conj",
         "aten.resolve_neg"],
        Identity(),
    )
    registry.add_ops(["aten.as_strided", "aten.as_strided_"], Restride())
    registry.add_ops(["aten.view_as_complex", "aten.view_as_real"], ComplexView())
    registry.add_ops(["aten.triu", "aten.tril"], Triangle())
    registry.add_ops(["aten.permute", "aten.transpose.int", "aten.t", "aten.swapaxes", "aten.swapdims"], Permute())
    registry.add_op("aten.unsqueeze", Unsqueeze())
    registry.add_op("aten.squeeze", Squeeze())
    registry.add_ops(["aten.view.default", "aten._unsafe_view", "aten.reshape", "aten._reshape_alias"], Reshape())
    registry.add_op("aten.expand", Expand())
    registry.add_op("aten.repeat", Repeat())
    registry.add_ops(["aten.pixel_shuffle", "aten.pixel_unshuffle"], PixelShuffle())
