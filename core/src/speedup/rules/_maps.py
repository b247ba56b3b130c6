"""Helpers for rules whose output entries are copies of input entries (shape and indexing ops).

Such an operator is described by *dimension maps*: output dimension ``od`` of ``out`` takes entry
``index[j]`` of input dimension ``idim`` of ``x`` (``index=None`` for the identity). From that one
description follow the coupling (the output's atoms are the input's, re-indexed), the constants
(copied) and the demand (scattered back).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..graph import Node, TensorValue
from ..propagation import Analysis
from ..rule import DimConst


@dataclass
class DimMap:
    x: TensorValue
    idim: int
    out: TensorValue
    odim: int
    index: Optional[torch.Tensor] = None


def couple_maps(ctx: Analysis, maps: list[DimMap]) -> None:
    for m in maps:
        if m.index is None:
            ctx.link(m.x, m.idim, m.out, m.odim)
        else:
            atoms = ctx.atoms(m.x, m.idim)
            ctx.accept(m.x, m.idim)
            ctx.assign(m.out, m.odim, None if atoms is None else atoms[m.index])


def forward_maps(ctx: Analysis, maps: list[DimMap]) -> None:
    for m in maps:
        consts = ctx.const(m.x, m.idim)
        if consts is not None and m.index is not None:
            consts = consts.index(m.index)
        ctx.set_const(m.out, m.odim, consts)


def forward_zeros(ctx: Analysis, maps: list[DimMap]) -> None:
    """Constants of a call mixing the entries of the dimensions its maps leave out (a transform, a
    triangle's positions): along the others, a slice that is zero stays zero, nothing else is known."""
    for m in maps:
        consts = ctx.const(m.x, m.idim)
        ctx.set_const(m.out, m.odim, consts.only_zeros() if consts is not None else None)


def backward_maps(ctx: Analysis, maps: list[DimMap]) -> None:
    """Demands, per input, the entries some demanded output entry copies."""
    by_input: dict[int, tuple[TensorValue, dict[int, torch.Tensor]]] = {}
    for m in maps:
        if not ctx.is_demanded(m.out):
            continue
        need = ctx.demanded(m.out, m.odim)
        if m.index is not None:
            need = scatter_any(m.index, need, m.x.shape[m.idim])
        x, masks = by_input.setdefault(m.x.index, (m.x, {}))
        masks[m.idim] = masks[m.idim] | need if m.idim in masks else need
    for x, masks in by_input.values():
        ctx.demand(x, masks)


def scatter_any(index: torch.Tensor, flags: torch.Tensor, size: int) -> torch.Tensor:
    """``result[i]`` is True when some ``j`` with ``index[j] == i`` has ``flags[j]``."""
    result = torch.zeros(size, dtype=torch.bool)
    result[index[flags]] = True
    return result


def uniform_const(ctx: Analysis, x: TensorValue, n: int) -> Optional[DimConst]:
    """Constants of a dimension made of ``n`` copies of the whole of ``x`` (broadcast, expand)."""
    uniform = ctx.uniform(x)
    if uniform is None:
        return None
    return DimConst(torch.ones(n, dtype=torch.bool), torch.full((n,), uniform, dtype=torch.float64))


class DescribedByMaps:
    """A rule (for an operator or a module) whose call is fully described by dimension maps from its
    first input to its first output: coupling, constants and demand all follow from :meth:`maps`."""

    def maps(self, node: Node) -> list[DimMap]:
        raise NotImplementedError

    def couple(self, node: Node, ctx: Analysis) -> None:
        couple_maps(ctx, self.maps(node))

    def forward(self, node: Node, ctx: Analysis) -> None:
        forward_maps(ctx, self.maps(node))

    def backward(self, node: Node, ctx: Analysis) -> None:
        maps = self.maps(node)
        if maps:
            backward_maps(ctx, maps)
        elif any(ctx.is_demanded(out) for out in node.outputs):
            ctx.demand_all(node.args[0])  # no map describes this call: it reads everything
