"""Indexing operators: slices, selects, concatenation and splitting.

The Python code that indexes runs unchanged in the sped-up model, with the same literal indices.
``x[:, 2:5]`` still means "entries 2, 3 and 4" after entries were removed, so every entry up to
the end of a literal bound is pinned: the same entries stay where the literals point. An
open-ended slice (``x[:, 2:]``) adapts to a shorter dimension, so its selected entries may go.

Entries a slice did not select are still needed: the bounds may depend on the input
(``self.position_ids[:, :seq_len]`` reads more of the buffer for a longer input), and nothing at
the dispatcher tells such bounds from literal ones. A sliced dimension therefore loses only
entries that are removable for another reason, unless the bounds cannot move: an open-ended slice
reads to the end (the entries before it are pinned), and slices cutting a tensor the model computes
into parts that together read all of it (``x[..., :d]`` and ``x[..., d:]``) are the code's parts, each
needing its own entries.

``split`` into equal parts (which is what ``chunk`` becomes) is treated like ``view(k, s)``:
removing position ``e`` removes it from every part, so the parts shrink equally and ``chunk``
still cuts at the right places. A literal ``split(58)`` would not adapt; the verification of the
sped-up model catches that and keeps the dimension instead. Parts of different sizes
(``split(x, [self.dim_conv, self.dim_untouched])``, FasterNet's partial convolution) each lose their
own entries, as the inputs of a ``cat`` do: the sizes the code passes must then follow, which they do
where the module stored them (see :mod:`speedup.stale_sizes`); otherwise verification keeps the
dimension whole.
"""

from __future__ import annotations

import sys
from typing import Any, NamedTuple, Optional

import torch
from torch import nn

from ..graph import Node, Origin, TensorValue
from ..propagation import Analysis
from ..modules import ChannelGather
from ..replacement import ModulePlan
from ..rule import DimConst, ModuleRule, OpRule, bind
from ._maps import DescribedByMaps, DimMap
from .toolkit import demand_computed, equal_parts, first_input
from .shape import MapRule


def _pin_prefix(ctx: Analysis, x: TensorValue, dim: int, upto: int) -> None:
    """Entries ``[0, upto)`` keep their positions: literal indices keep pointing at them."""
    atoms = ctx.atoms(x, dim)
    if atoms is not None and upto > 0:
        ctx.table.pin(atoms[:upto])


def _pin_suffix(ctx: Analysis, x: TensorValue, dim: int, count: int) -> None:
    atoms = ctx.atoms(x, dim)
    if atoms is not None and count > 0:
        ctx.table.pin(atoms[-count:])


def _pin_held(ctx: Analysis, x: TensorValue, dim: int) -> bool:
    """Pins a dimension of a tensor the model holds (or computes from what it holds) that a call reads
    only part of: the entries the dummy input did not reach are still there for other inputs
    (``self.pos[:length]`` reads more rows of longer inputs), so no grouping of channels may offer
    them (:func:`~speedup.groups.find_groups`); the speedup keeps them anyway. False for other tensors."""
    if x.origin not in (Origin.PARAMETER, Origin.CONSTANT):
        return False
    _pin_prefix(ctx, x, dim, x.shape[dim])
    return True


class _IndexingRule(MapRule):
    """A map rule whose indexed dimension is needed whole (see the module docstring)."""

    def indexed_dim(self, node: Node) -> int:
        raise NotImplementedError

    def backward(self, node: Node, ctx: Analysis) -> None:
        super().backward(node, ctx)
        if any(ctx.is_demanded(out) for out in node.outputs):
            x, dim = node.args[0], self.indexed_dim(node)
            ctx.keep(x, dim, torch.ones(x.shape[dim], dtype=torch.bool))


class Slice(_IndexingRule):
    """``aten.slice(x, dim, start, end, step)``."""

    def indexed_dim(self, node: Node) -> int:
        return self._bounds(node)[1]

    def _bounds(self, node: Node):
        a = bind(node)
        x = a["self"]
        dim = a["dim"] % x.ndim
        n = x.shape[dim]
        start = a.get("start") if a.get("start") is not None else 0
        end = a.get("end") if a.get("end") is not None else sys.maxsize
        return x, dim, n, start, end, a.get("step", 1)

    def maps(self, node: Node) -> list[DimMap]:
        x, dim, n, start, end, step = self._bounds(node)
        out = node.outputs[0]
        lo, hi, _ = slice(start, end, step).indices(n)
        index = torch.arange(lo, max(hi, lo), step)[: out.shape[dim]]
        return [DimMap(x, d, out, d, index if d == dim else None) for d in range(x.ndim)]

    def _open_ended(self, node: Node) -> bool:
        """``x[:, 2:]``: the selected entries may go (those before them keep their places)."""
        _, _, n, start, end, step = self._bounds(node)
        return step == 1 and 0 <= start and end >= n

    def _partitions(self, node: Node) -> bool:
        """Whether the slices of the tensor along this dimension together read every entry of a tensor
        the model computes (``x[..., :d]`` and ``x[..., d:]``, a gate written with slices): bounds that
        cut a dimension into parts are the code's, not the input's."""
        x, dim, n, _, _, _ = self._bounds(node)
        if x.origin in (Origin.PARAMETER, Origin.CONSTANT):
            return False
        read = torch.zeros(n, dtype=torch.bool)
        for other in x.consumers:
            if other.target is node.target and other.args and other.args[0] is x:
                _, other_dim, _, start, end, step = self._bounds(other)
                if other_dim == dim:
                    read[slice(*slice(start, end, step).indices(n))] = True
        return bool(read.all())

    def backward(self, node: Node, ctx: Analysis) -> None:
        open_ended = self._open_ended(node)
        if not open_ended and not self._partitions(node):
            super().backward(node, ctx)
            return
        # It reads the same entries for every input: an entry it selects is needed where its output's
        # is, and one it does not select where another part needs it.
        MapRule.backward(self, node, ctx)
        if open_ended and ctx.is_demanded(node.outputs[0]):
            x, dim, n, start, _, _ = self._bounds(node)
            ctx.keep(x, dim, torch.arange(n) < start)

    def couple(self, node: Node, ctx: Analysis) -> None:
        super().couple(node, ctx)
        x, dim, n, start, end, step = self._bounds(node)
        whole = self._open_ended(node)
        if not whole and _pin_held(ctx, x, dim):
            return
        if step != 1:
            ctx.pin(x, dim)
        elif start < 0:
            _pin_suffix(ctx, x, dim, -start if end >= n else n)
        elif end >= n:
            _pin_prefix(ctx, x, dim, start)
        else:
            _pin_prefix(ctx, x, dim, end if end >= 0 else n)


class Select(_IndexingRule):
    """``aten.select(x, dim, index)``: the dimension disappears; one entry is read."""

    def indexed_dim(self, node: Node) -> int:
        return self._args(node)[1]

    def maps(self, node: Node) -> list[DimMap]:
        x, dim, _ = self._args(node)
        out = node.outputs[0]
        return [DimMap(x, d, out, d if d < dim else d - 1) for d in range(x.ndim) if d != dim]

    def _args(self, node: Node):
        x = node.args[0]
        return x, node.args[1] % x.ndim, node.args[2]

    def couple(self, node: Node, ctx: Analysis) -> None:
        super().couple(node, ctx)
        x, dim, index = self._args(node)
        if _pin_held(ctx, x, dim):
            return
        if index < 0:
            _pin_suffix(ctx, x, dim, -index)
        else:
            _pin_prefix(ctx, x, dim, index + 1)



class IndexSelect(_IndexingRule):
    """``index_select(x, dim, index)`` with a constant index: literal positions, like ``select``."""

    def indexed_dim(self, node: Node) -> int:
        return node.args[1] % node.args[0].ndim

    def maps(self, node: Node) -> list[DimMap]:
        x, dim, index = node.args[0], node.args[1] % node.args[0].ndim, node.args[2]
        out = node.outputs[0]
        if index.data is None:
            return [DimMap(x, d, out, d) for d in range(x.ndim) if d != dim]
        return [DimMap(x, d, out, d, index.host().long().reshape(-1) if d == dim else None) for d in range(x.ndim)]

    def couple(self, node: Node, ctx: Analysis) -> None:
        super().couple(node, ctx)
        x, dim, index = node.args[0], node.args[1] % node.args[0].ndim, node.args[2]
        ctx.pin(x, dim) if index.data is None or index.data.numel() == 0 else _pin_prefix(
            ctx, x, dim, int(index.host().max()) + 1)

    def backward(self, node: Node, ctx: Analysis) -> None:
        super().backward(node, ctx)
        if ctx.is_demanded(node.outputs[0]):
            demand_computed(ctx, node.args[2])  # every position it names is read


class ChannelGatherRule(DescribedByMaps, ModuleRule):
    """:class:`~speedup.modules.ChannelGather`: output entry ``j`` is input entry ``index[j]``, and
    the index is renumbered for the entries that stay, so any entry may go (with those it feeds)."""

    lazy_masks = True  # no parameters; the index is read through the node's values

    def maps(self, node: Node) -> list[DimMap]:
        x, out = first_input(node), node.outputs[0]
        dim = node.module.dim % x.ndim
        index = node.params["index"].host().long()
        return [DimMap(x, d, out, d, index if d == dim else None) for d in range(x.ndim)]

    def replace(self, module: nn.Module, plan: ModulePlan) -> nn.Module:
        x, dim = plan.input(), module.dim % plan.input().ndim
        index = module.index.cpu()
        kept_out, kept_in = plan.kept(plan.output(), dim), plan.kept(x, dim)
        picked = index if kept_out is None else index[kept_out.cpu()]
        if kept_in is not None:
            position = torch.full((x.shape[dim],), -1, dtype=torch.long)
            position[kept_in.cpu()] = torch.arange(kept_in.numel())
            picked = position[picked]
            if bool((picked < 0).any()):
                raise AssertionError(f"{plan.name}: a kept output entry reads a removed input entry")
        return ChannelGather(picked.to(module.index.device), module.dim)


class Flip(MapRule):
    def maps(self, node: Node) -> list[DimMap]:
        x, out = node.args[0], node.outputs[0]
        flipped = {d % x.ndim for d in node.args[1]}
        return [DimMap(x, d, out, d, torch.arange(x.shape[d] - 1, -1, -1) if d in flipped else None)
                for d in range(x.ndim)]


class Roll(MapRule):
    """``roll(x, shifts, dims)``: a cyclic shift by literal amounts, which would wrap elsewhere in a
    shorter dimension, so rolled dimensions keep their size; the others pass through. Rolling the
    flattened tensor (no ``dims``) keeps everything."""

    def _rolled(self, node: Node) -> dict[int, int]:
        args = bind(node)
        x, shifts, dims = args["self"], list(args["shifts"]), list(args["dims"])
        rolled: dict[int, int] = {}
        for d, shift in zip(dims, shifts):
            rolled[d % x.ndim] = rolled.get(d % x.ndim, 0) + shift
        return rolled

    def maps(self, node: Node) -> list[DimMap]:
        x, out = node.args[0], node.outputs[0]
        rolled = self._rolled(node)
        if not rolled:
            return []
        return [DimMap(x, d, out, d, (torch.arange(x.shape[d]) - rolled[d]) % max(x.shape[d], 1) if d in rolled else None)
                for d in range(x.ndim)]

    def couple(self, node: Node, ctx: Analysis) -> None:
        super().couple(node, ctx)
        for d in self._rolled(node):
            ctx.pin(node.args[0], d)


class Unfold(MapRule):
    """``x.unfold(dim, size, step)``: sliding windows along ``dim`` (a literal size and step), which
    keeps its entries; the other dimensions pass through."""

    def maps(self, node: Node) -> list[DimMap]:
        x, out = node.args[0], node.outputs[0]
        dim = node.args[1] % max(x.ndim, 1)
        return [DimMap(x, d, out, d) for d in range(x.ndim) if d != dim]


class Im2col(MapRule):
    """``F.unfold`` (``aten.im2col``): channel ``c`` becomes the rows ``c * k .. c * k + k - 1`` of the
    output (``k`` kernel taps), so a removed channel removes its rows; the positions keep their size."""

    def maps(self, node: Node) -> list[DimMap]:
        x, out = node.args[0], node.outputs[0]
        cdim = x.ndim - 3
        taps = out.shape[cdim] // max(x.shape[cdim], 1)
        maps = [DimMap(x, cdim, out, cdim, torch.arange(out.shape[cdim]) // taps)]
        return ([DimMap(x, 0, out, 0)] if cdim == 1 else []) + maps

    def forward(self, node: Node, ctx: Analysis) -> None:
        padded = any(p != 0 for p in bind(node)["padding"])
        for m in self.maps(node):
            consts = ctx.const(m.x, m.idim)
            if consts is not None and padded:  # a constant channel meets the zero padding: only zeros stay
                consts = DimConst.where(consts.zero, torch.zeros_like(consts.value)) if bool(consts.zero.any()) else None
            if consts is not None and m.index is not None:
                consts = consts.index(m.index)
            ctx.set_const(m.out, m.odim, consts)


class Col2im(OpRule):
    """``F.fold`` (``aten.col2im``), the inverse of ``F.unfold``: rows ``c * k .. c * k + k - 1`` of the
    input (``k`` kernel taps) add up into channel ``c`` of the output, where windows overlap. A channel
    goes with all its rows (its taps are pinned together), and the sped-up call, reading fewer rows,
    makes as many fewer channels; the positions keep their size, and only a channel whose rows are all
    zero is constant (overlapping windows add a constant up unevenly)."""

    def _dims(self, node: Node) -> tuple[TensorValue, TensorValue, int, int, int]:
        x, out = node.args[0], node.outputs[0]
        rows, channels = x.ndim - 2, out.ndim - 3  # (N, C * k, L) -> (N, C, H, W), or unbatched
        return x, out, rows, channels, x.shape[rows] // max(out.shape[channels], 1)

    def couple(self, node: Node, ctx: Analysis) -> None:
        x, out, rows, channels, taps = self._dims(node)
        if rows:
            ctx.link(x, 0, out, 0)
        cut = equal_parts(ctx, x, rows, taps) if taps else None
        if cut is None:
            ctx.pin(out, channels)
            return
        ctx.table.pin(cut[1])
        ctx.assign(out, channels, cut[0])

    def forward(self, node: Node, ctx: Analysis) -> None:
        x, out, rows, channels, taps = self._dims(node)
        consts = ctx.const(x, rows)
        if consts is not None and taps and bool(consts.zero.any()):
            zero = consts.zero.reshape(-1, taps).all(1)
            ctx.set_const(out, channels, DimConst.where(zero, torch.zeros(zero.numel(), dtype=torch.float64)))

    def backward(self, node: Node, ctx: Analysis) -> None:
        x, out, rows, channels, taps = self._dims(node)
        if not ctx.is_demanded(out):
            return
        masks = {rows: ctx.demanded(out, channels).repeat_interleave(taps)}
        if rows:
            masks[0] = ctx.demanded(out, 0)
        ctx.demand(x, masks)


class Index(MapRule):
    """``x[i, j]`` (``aten.index.Tensor``) with integer index tensors: the indexed dimensions give way
    to the indices' (broadcast together), where the first of them was when they are adjacent, else in
    front; the other dimensions pass through (CLIP pools ``x[torch.arange(n), tokens.argmax(-1)]``, its
    features passing). An index known before the call (a buffer of positions, as a relative position
    bias table is read) names literal positions, kept like ``index_select``'s; one computed during the
    call (tokens sorted by expert in a mixture of experts) may name any, so its dimension keeps every
    entry. A boolean index keeps everything."""

    def _indexed(self, node: Node) -> Optional[list[tuple[int, TensorValue]]]:
        """(position, index) of each index tensor, all integer; else None."""
        present = [(p, i) for p, i in enumerate(node.args[1]) if i is not None]
        if not present or any(not isinstance(i, TensorValue) or i.dtype not in (torch.long, torch.int)
                              for _, i in present):
            return None
        return present

    def maps(self, node: Node) -> list[DimMap]:
        indexed = self._indexed(node)
        if indexed is None:
            return []
        x, out = node.args[0], node.outputs[0]
        positions = [p for p, _ in indexed]
        width = out.ndim - (x.ndim - len(positions))  # the dimensions of the broadcast indices
        adjacent = positions == list(range(positions[0], positions[-1] + 1))
        passing = [d for d in range(x.ndim) if d not in positions]
        if adjacent:
            return [DimMap(x, d, out, d if d < positions[0] else d - len(positions) + width) for d in passing]
        return [DimMap(x, d, out, width + rank) for rank, d in enumerate(passing)]

    def couple(self, node: Node, ctx: Analysis) -> None:
        super().couple(node, ctx)
        x = node.args[0]
        for position, index in self._indexed(node) or []:
            if index.data is None:
                ctx.pin(x, position)
                continue
            positions = index.host().long().reshape(-1) % max(x.shape[position], 1)
            if positions.numel():
                _pin_prefix(ctx, x, position, int(positions.max()) + 1)

    def backward(self, node: Node, ctx: Analysis) -> None:
        super().backward(node, ctx)
        if ctx.is_demanded(node.outputs[0]):
            for index in node.args[1]:  # every position an index names is read (a mask's every entry)
                demand_computed(ctx, index)


class RowsWritten(OpRule):
    """Rows of features written into the positions a mask or an index selects, the features passing
    through: LLaVA merges its image features into the token embeddings with
    ``emb.masked_scatter(is_image[..., None].expand_as(emb), features)`` or ``emb[is_image] = features``
    (``index_put``). Where every selected position takes a whole row (a mask the same along the last
    dimension, indices for all the dimensions before it) of a source as wide, or one number
    (``x[padding] = 0``), the last dimension of the tensor, of the source and of the result are one: a
    feature may go from all three. The positions keep their size; anything else keeps everything."""

    def _parts(self, node: Node) -> Optional[tuple[TensorValue, TensorValue, list[TensorValue], TensorValue]]:
        """(tensor written into, rows written, masks or indices, result) where rows pass whole, else None."""
        args = bind(node)
        x, out = args["self"], node.outputs[0]
        if node.target._opname.startswith("masked_scatter"):
            mask, rows = args["mask"], args["source"]
            selectors = [mask] if isinstance(mask, TensorValue) else []
            whole = (len(selectors) == 1 and mask.ndim == x.ndim and
                     (mask.shape[-1] == 1 or (len(mask.strides) == mask.ndim and mask.strides[-1] == 0)))
        else:
            rows = args["values"]
            selectors = [i for i in args["indices"] if i is not None]
            indexed = sum(i.ndim if i.dtype == torch.bool else 1 for i in selectors if isinstance(i, TensorValue))
            whole = (indexed == x.ndim - 1 and len(selectors) == len(args["indices"])
                     and all(isinstance(i, TensorValue) for i in selectors))
        if not (whole and isinstance(rows, TensorValue) and x.shape == out.shape
                and (rows.ndim == 0 or rows.shape[-1] == x.shape[-1])):
            return None
        return x, rows, selectors, out

    def couple(self, node: Node, ctx: Analysis) -> None:
        parts = self._parts(node)
        if parts is None:
            return
        x, rows, selectors, out = parts
        for d in range(x.ndim - 1):
            ctx.link(x, d, out, d)
        ctx.link(x, -1, out, -1)
        if rows.ndim:
            ctx.link(rows, -1, out, -1)
        for selector in selectors:
            if selector.ndim == x.ndim and selector.shape[-1] == x.shape[-1]:
                ctx.link(selector, -1, out, -1)  # the mask broadcast along the features follows them

    def forward(self, node: Node, ctx: Analysis) -> None:
        parts = self._parts(node)
        if parts is None:
            return
        x, rows, _, out = parts
        kept = ctx.const(x, -1)
        if rows.ndim:
            written = ctx.const(rows, -1)
            zero = written.zero if written is not None else None
        else:  # one number written (``x[mask] = 0``)
            value = rows.host()
            zero = torch.full((x.shape[-1],), value is not None and float(value) == 0.0)
        if kept is not None and zero is not None:
            ctx.set_const(out, -1, DimConst.where(zero & kept.zero, torch.zeros(x.shape[-1], dtype=torch.float64)))

    def backward(self, node: Node, ctx: Analysis) -> None:
        parts = self._parts(node)
        if parts is None:
            super().backward(node, ctx)  # every input whole
            return
        x, rows, selectors, out = parts
        if not ctx.is_demanded(out):
            return
        need = ctx.demanded(out, -1)
        ctx.demand(x, {d: ctx.demanded(out, d) for d in range(x.ndim - 1)} | {x.ndim - 1: need})
        ctx.demand(rows, {rows.ndim - 1: need} if rows.ndim else None)
        for selector in selectors:
            along = selector.ndim == x.ndim and selector.shape[-1] == x.shape[-1]
            demand_computed(ctx, selector, {selector.ndim - 1: need} if along else None)


class ScatteredAlong(OpRule):
    """Entries of a source written or reduced into positions along ``dim`` that an index chooses:
    ``index_add`` / ``index_copy`` / ``index_reduce`` / ``index_fill`` (one index for every slice) and
    ``scatter`` / ``scatter_add`` / ``scatter_reduce`` (an index entry for every source entry). A graph
    network sums its messages into their nodes so (``zeros.index_add_(0, dst, h[src])``), its features
    passing. Along every other dimension where the tensor written into, the source and a scatter's
    index are as long as the result, each entry is computed on its own: a feature may go from all of
    them, and one zero in the tensor and the source stays zero (every reduction of zeros is zero). The
    indexed dimension, and any other, keeps its size."""

    def couple(self, node: Node, ctx: Analysis) -> None:
        call = _Scatter.of(node)
        for d in call.aligned:
            ctx.link(call.x, d, call.out, d)
            if call.source is not None:
                ctx.link(call.source, d, call.out, d)
            if call.per_entry:
                ctx.link(call.index, d, call.out, d)

    def forward(self, node: Node, ctx: Analysis) -> None:
        call = _Scatter.of(node)
        if call.source is None and not (isinstance(call.value, (int, float)) and call.value == 0):
            return
        for d in call.aligned:
            kept = ctx.const(call.x, d)
            written = ctx.const(call.source, d) if call.source is not None else None
            if kept is None or (call.source is not None and written is None):
                continue
            zero = kept.zero & written.zero if written is not None else kept.zero
            ctx.set_const(call.out, d, DimConst.where(zero, torch.zeros(call.out.shape[d], dtype=torch.float64)))

    def backward(self, node: Node, ctx: Analysis) -> None:
        call = _Scatter.of(node)
        if not ctx.is_demanded(call.out):
            return
        need = {d: ctx.demanded(call.out, d) for d in call.aligned}
        ctx.demand(call.x, need)
        if call.source is not None:
            ctx.demand(call.source, need)
        demand_computed(ctx, call.index, need if call.per_entry else None)
        demand_computed(ctx, call.value)


class _Scatter(NamedTuple):
    """One call of :class:`ScatteredAlong`'s operators, by part."""

    x: TensorValue
    """The tensor written into."""
    index: TensorValue
    source: Optional[TensorValue]
    value: Any
    """The number written (``index_fill``, ``scatter.value``), else None."""
    out: TensorValue
    per_entry: bool
    """Whether the index has an entry for every source entry (a scatter's), else one per slice."""
    aligned: list[int]
    """The dimensions other than ``dim`` whose entries correspond in every part."""

    @classmethod
    def of(cls, node: Node) -> "_Scatter":
        args = bind(node)
        x, out = args["self"], node.outputs[0]
        dim = args["dim"] % max(x.ndim, 1)
        index, source = args["index"], args.get("source", args.get("src"))
        source = source if isinstance(source, TensorValue) else None
        per_entry = node.target._opname.startswith("scatter")
        aligned = [d for d in range(x.ndim) if d != dim and out.shape[d] == x.shape[d]
                   and (source is None or source.shape[d] == x.shape[d])
                   and (not per_entry or index.shape[d] == x.shape[d])]
        return cls(x, index, source, args.get("value"), out, per_entry, aligned)


class Cat(OpRule):
    """``cat(tensors, dim)``: the output dimension is the inputs' dimensions one after another."""

    def _parts(self, node: Node) -> tuple[list[TensorValue], int, TensorValue]:
        a = bind(node)
        out = node.outputs[0]
        dim = a.get("dim", 0) % out.ndim
        parts = [t for t in a["tensors"] if isinstance(t, TensorValue) and t.ndim == out.ndim]
        return parts, dim, out

    def couple(self, node: Node, ctx: Analysis) -> None:
        parts, dim, out = self._parts(node)
        segments = []
        for x in parts:
            atoms = ctx.atoms(x, dim)
            ctx.accept(x, dim)
            if atoms is None:
                atoms = ctx.fresh(x.shape[dim])
                ctx.table.pin(atoms)
            segments.append(atoms)
            for d in range(out.ndim):
                if d != dim:
                    ctx.link(x, d, out, d)
        ctx.assign(out, dim, torch.cat(segments) if segments else None)

    def forward(self, node: Node, ctx: Analysis) -> None:
        parts, dim, out = self._parts(node)
        for d in range(out.ndim):
            if d != dim:
                _set_common_const(ctx, parts, d, out)
        consts = [ctx.const(x, dim) for x in parts]
        if all(c is None for c in consts):
            return
        consts = [c or DimConst.none(x.shape[dim]) for c, x in zip(consts, parts)]
        ctx.set_const(out, dim, DimConst(torch.cat([c.mask for c in consts]), torch.cat([c.value for c in consts])))

    def backward(self, node: Node, ctx: Analysis) -> None:
        parts, dim, out = self._parts(node)
        if not ctx.is_demanded(out):
            return
        needs = ctx.demanded(out, dim).split([x.shape[dim] for x in parts])
        others = {d: ctx.demanded(out, d) for d in range(out.ndim) if d != dim}
        for x, need in zip(parts, needs):
            others[dim] = need
            ctx.demand(x, others)


def _set_common_const(ctx: Analysis, parts: list[TensorValue], d: int, out: TensorValue) -> None:
    """Along a non-concatenated dimension an entry is constant if it is, equally, in every part."""
    consts = []
    for x in parts:
        found = ctx.const(x, d)
        if found is None:
            return
        consts.append(found)
    if not consts:
        return
    mask = torch.stack([c.mask for c in consts]).all(0)
    values = torch.stack([c.value for c in consts])
    mask &= (values == values[:1]).all(0)
    ctx.set_const(out, d, DimConst.where(mask, values[0]))


class Split(OpRule):
    """``split`` / ``split_with_sizes``: equal parts shrink equally, parts of different sizes each on
    their own (see the module docstring)."""

    def _layout(self, node: Node):
        x = node.args[0]
        a = bind(node)
        dim = a.get("dim", 0) % x.ndim
        sizes = [v.shape[dim] for v in node.outputs]
        equal = len(set(sizes)) == 1 and sum(sizes) == x.shape[dim] and len(node.outputs) > 0
        return x, dim, sizes, equal

    def couple(self, node: Node, ctx: Analysis) -> None:
        x, dim, sizes, equal = self._layout(node)
        for out in node.outputs:
            for d in range(x.ndim):
                if d != dim:
                    ctx.link(x, d, out, d)
        if not equal:
            atoms = ctx.atoms(x, dim)
            starts = [sum(sizes[:i]) for i in range(len(sizes))]
            for out, start, size in zip(node.outputs, starts, sizes):
                ctx.assign(out, dim, atoms[start:start + size] if atoms is not None else None)
            return
        position = _positions(ctx, x, dim, sizes[0])
        for out in node.outputs:
            if position is not None:
                ctx.assign(out, dim, position)

    def forward(self, node: Node, ctx: Analysis) -> None:
        x, dim, sizes, _ = self._layout(node)
        consts = ctx.const(x, dim)
        pieces = consts.mask.split(sizes) if consts is not None else None
        values = consts.value.split(sizes) if consts is not None else None
        for i, out in enumerate(node.outputs):
            for d in range(x.ndim):
                if d != dim:
                    ctx.set_const(out, d, ctx.const(x, d))
            if pieces is not None:
                ctx.set_const(out, dim, DimConst(pieces[i], values[i]))

    def backward(self, node: Node, ctx: Analysis) -> None:
        x, dim, sizes, equal = self._layout(node)
        demanded = [out for out in node.outputs if ctx.is_demanded(out)]
        if not demanded:
            return
        need = []
        for out in node.outputs:
            need.append(ctx.demanded(out, dim) if ctx.is_demanded(out) else torch.zeros(out.shape[dim], dtype=torch.bool))
        masks = {dim: torch.cat(need)}
        for d in range(x.ndim):
            if d != dim:
                masks[d] = torch.stack([ctx.demanded(out, d) for out in demanded]).any(0)
        ctx.demand(x, masks)


def _positions(ctx: Analysis, x: TensorValue, dim: int, size: int) -> Optional[torch.Tensor]:
    """The atoms of each position of ``x``'s dimension cut into equal parts of ``size``, a position
    going from every part at once (the number of parts is the code's); None where it keeps its size."""
    cut = equal_parts(ctx, x, dim, size)
    if cut is None:
        return None
    ctx.table.pin(cut[0])
    return cut[1]


class Glu(OpRule):
    """``glu(x, dim)``: ``a * sigmoid(b)`` of the two halves of ``dim``, entry by entry (``nn.GLU``,
    gated convolutions): the halves lose the same positions, as in an equal split, and the other
    dimensions pass through. An output entry is zero where ``a`` is, constant where both are."""

    def _layout(self, node: Node) -> tuple[TensorValue, int, TensorValue]:
        x = node.args[0]
        return x, bind(node).get("dim", -1) % x.ndim, node.outputs[0]

    def couple(self, node: Node, ctx: Analysis) -> None:
        x, dim, out = self._layout(node)
        for d in range(x.ndim):
            if d != dim:
                ctx.link(x, d, out, d)
        position = _positions(ctx, x, dim, out.shape[dim])
        if position is not None:
            ctx.assign(out, dim, position)

    def forward(self, node: Node, ctx: Analysis) -> None:
        x, dim, out = self._layout(node)
        for d in range(x.ndim):
            consts = ctx.const(x, d)
            if consts is None:
                continue
            if d != dim:  # a constant slice holds the same value in both halves
                ctx.set_const(out, d, DimConst.where(consts.mask, consts.value * torch.sigmoid(consts.value)))
                continue
            (a, b), (va, vb) = consts.mask.chunk(2), consts.value.chunk(2)
            ctx.set_const(out, d, DimConst.where((a & b) | (a & (va == 0)), va * torch.sigmoid(vb)))

    def backward(self, node: Node, ctx: Analysis) -> None:
        x, dim, out = self._layout(node)
        if ctx.is_demanded(out):
            masks = {d: ctx.demanded(out, d) for d in range(x.ndim)}
            masks[dim] = masks[dim].repeat(2)
            ctx.demand(x, masks)


class ChannelShuffleRule(ChannelGatherRule):
    """``nn.ChannelShuffle(groups)``: output channel ``j`` is input channel ``(j % g) * (C / g) + j // g``.
    On fewer channels the shuffle would need as many in every group; it becomes the
    :class:`~speedup.modules.ChannelGather` of the channels that stay, so any channel may go."""

    def maps(self, node: Node) -> list[DimMap]:
        x, out = first_input(node), node.outputs[0]
        index = _shuffled(x.shape[1], node.module.groups)
        return [DimMap(x, d, out, d, index if d == 1 else None) for d in range(x.ndim)]

    def replace(self, module: nn.Module, plan: ModulePlan) -> nn.Module:
        if plan.kept(plan.input(), 1) is None and plan.kept(plan.output(), 1) is None:
            return module
        shuffled = _shuffled(plan.input().shape[1], module.groups).to(plan.input().device)
        return super().replace(ChannelGather(shuffled, 1), plan)


class ChannelShuffleOp(DescribedByMaps, OpRule):
    """``F.channel_shuffle(x, groups)`` called in a module's own code: the group count is the code's,
    so a channel goes at the same position of every group (the shuffle of the channels that stay
    is then the kept part of the shuffle); constants and demand follow the permutation."""

    def maps(self, node: Node) -> list[DimMap]:
        x, out = node.args[0], node.outputs[0]
        index = _shuffled(x.shape[1], bind(node)["groups"])
        return [DimMap(x, d, out, d, index if d == 1 else None) for d in range(x.ndim)]

    def couple(self, node: Node, ctx: Analysis) -> None:
        x = node.args[0]
        _positions(ctx, x, 1, x.shape[1] // bind(node)["groups"])
        super().couple(node, ctx)


def _shuffled(channels: int, groups: int) -> torch.Tensor:
    j = torch.arange(channels)
    return (j % groups) * (channels // groups) + j // groups


class Unbind(DescribedByMaps, OpRule):
    """``unbind(x, dim)``: the number of outputs is fixed by the code, so ``dim`` keeps its size; the
    other dimensions pass to every output (``q, k, v = qkv.unbind(0)`` loses whole heads)."""

    def _dim(self, node: Node) -> int:
        x = node.args[0]
        return (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) % x.ndim

    def maps(self, node: Node) -> list[DimMap]:
        x, dim = node.args[0], self._dim(node)
        return [DimMap(x, d, out, d if d < dim else d - 1) for out in node.outputs for d in range(x.ndim) if d != dim]

    def couple(self, node: Node, ctx: Analysis) -> None:
        ctx.pin(node.args[0], self._dim(node))
        super().couple(node, ctx)


class Stack(OpRule):
    """``stack(tensors, dim)``: a new dimension (its size is the number of tensors: kept)."""

    def _layout(self, node: Node) -> tuple[list[TensorValue], int]:
        a = bind(node)
        return a["tensors"], a.get("dim", 0) % node.outputs[0].ndim

    def couple(self, node: Node, ctx: Analysis) -> None:
        tensors, dim = self._layout(node)
        for x in tensors:
            for d in range(x.ndim):
                ctx.link(x, d, node.outputs[0], d if d < dim else d + 1)

    def forward(self, node: Node, ctx: Analysis) -> None:
        """Along the other dimensions, a slice is constant where every stacked tensor's is, alike."""
        tensors, dim = self._layout(node)
        for d in range(tensors[0].ndim):
            ctx.set_const(node.outputs[0], d if d < dim else d + 1, DimConst.agreeing([ctx.const(x, d) for x in tensors]))

    def backward(self, node: Node, ctx: Analysis) -> None:
        tensors, dim = self._layout(node)
        out = node.outputs[0]
        if ctx.is_demanded(out):
            for x in tensors:
                ctx.demand(x, {d: ctx.demanded(out, d if d < dim else d + 1) for d in range(x.ndim)})


class Pad(OpRule):
    """``constant_pad_nd`` and reflection/replication pads: padded dimensions keep their size."""

    def _padded(self, node: Node) -> set[int]:
        x = node.args[0]
        return {x.ndim - 1 - i // 2 for i, p in enumerate(node.args[1]) if p != 0}

    def couple(self, node: Node, ctx: Analysis) -> None:
        x, out = node.args[0], node.outputs[0]
        padded = self._padded(node)
        for d in range(x.ndim):
            if d not in padded:
                ctx.link(x, d, out, d)

    def forward(self, node: Node, ctx: Analysis) -> None:
        x, out = node.args[0], node.outputs[0]
        fill = node.args[2] if node.target._opname == "constant_pad_nd" and len(node.args) > 2 else 0
        for d in range(x.ndim):
            if d in self._padded(node):
                continue
            consts = ctx.const(x, d)
            if consts is not None:
                # A constant slice stays constant only if the padding holds the same value.
                keep = consts.mask & (consts.value == float(fill)) if node.target._opname == "constant_pad_nd" else consts.mask
                ctx.set_const(out, d, DimConst.where(keep, consts.value))

    def backward(self, node: Node, ctx: Analysis) -> None:
        x, out = node.args[0], node.outputs[0]
        if ctx.is_demanded(out):
            padded = self._padded(node)
            ctx.demand(x, {d: ctx.demanded(out, d) for d in range(x.ndim) if d not in padded})


class Gather(OpRule):
    """``gather(x, dim, index)``: along ``dim`` entries are picked by index values (kept whole);
    along the other dimensions output, input and index correspond where their sizes agree."""

    def _args(self, node: Node):
        x, dim, index = node.args[0], node.args[1] % node.args[0].ndim, node.args[2]
        return x, dim, index, node.outputs[0]

    def couple(self, node: Node, ctx: Analysis) -> None:
        x, dim, index, out = self._args(node)
        for d in range(out.ndim):
            if d != dim:
                ctx.link(index, d, out, d)
                if x.shape[d] == out.shape[d]:
                    ctx.link(x, d, out, d)

    def backward(self, node: Node, ctx: Analysis) -> None:
        x, dim, index, out = self._args(node)
        if ctx.is_demanded(out):
            others = {d: ctx.demanded(out, d) for d in range(out.ndim) if d != dim and x.shape[d] == out.shape[d]}
            ctx.demand(x, others)
            # The index only where an output entry is needed (DeBERTa's relative positions, an
            # index repeated over batch x heads, would otherwise keep every head).
            ctx.demand(index, {d: ctx.demanded(out, d) for d in range(out.ndim) if d != dim})


def register(registry) -> None:
    registry.add_ops(["aten.masked_scatter", "aten.masked_scatter_", "aten.index_put", "aten.index_put_"],
                     RowsWritten())
    registry.add_op("aten.gather", Gather())
    registry.add_ops(["aten.index_add", "aten.index_copy", "aten.index_reduce", "aten.index_fill", "aten.scatter",
                      "aten.scatter_add", "aten.scatter_reduce"], ScatteredAlong())
    registry.add_op("aten.slice.Tensor", Slice())
    registry.add_op("aten.select.int", Select())
    registry.add_op("aten.index_select", IndexSelect())
    registry.add_module(ChannelGather, ChannelGatherRule())
    registry.add_module(nn.ChannelShuffle, ChannelShuffleRule())
    registry.add_op("aten.glu", Glu())
    registry.add_ops(["aten.channel_shuffle", "aten.native_channel_shuffle"], ChannelShuffleOp())
    registry.add_op("aten.flip", Flip())
    registry.add_op("aten.roll", Roll())
    registry.add_op("aten.unfold", Unfold())
    registry.add_op("aten.im2col", Im2col())
    registry.add_op("aten.col2im", Col2im())
    registry.add_op("aten.index.Tensor", Index())
    registry.add_op("aten.cat", Cat())
    registry.add_ops(["aten.split.Tensor", "aten.split_with_sizes", "aten.split", "aten.unsafe_split",
                      "aten.unsafe_split_with_sizes"], Split())
    registry.add_op("aten.unbind", Unbind())
    registry.add_op("aten.stack", Stack())
    registry.add_ops(["aten.constant_pad_nd", "aten.reflection_pad1d", "aten.reflection_pad2d", "aten.reflection_pad3d",
                      "aten.replication_pad1d", "aten.replication_pad2d", "aten.replication_pad3d"], Pad())
