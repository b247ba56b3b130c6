"""Deciding what goes: from demanded entries to kept atoms to kept entries per dimension.

An atom is kept when it is pinned or when any entry that needs it is demanded; every other atom
is removed, and with it every entry that refers to it. Because the atoms already encode how the
operators tie dimensions together (see :mod:`speedup.atoms`), this is a single vectorised step.

A dimension may not lose every entry (a layer whose mask removes all its channels while its
output is still consumed): one entry is then kept, with a warning, and the model stays valid.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .atoms import AtomSolution
from .graph import Graph, TensorValue


@dataclass
class Plan:
    """Kept entries per dimension (stored on each value as ``value.kept``) and what was noticed."""

    removed_entries: int = 0
    warnings: list[str] = field(default_factory=list)


def decide(graph: Graph, solution: AtomSolution) -> Plan:
    slots: list[tuple[TensorValue, int, torch.Tensor]] = []
    demanded: list[torch.Tensor] = []
    for value in graph.values:
        value.kept = [None] * value.ndim
        for d, atoms in enumerate(value.atoms):
            if isinstance(atoms, torch.Tensor) and atoms.numel():
                slots.append((value, d, atoms))
                demanded.append(_demanded(value, d))
    plan = Plan()
    if not slots:
        return plan
    primitives = solution.primitives(torch.cat([atoms for _, _, atoms in slots]))
    keep = solution.pinned.clone()
    keep[primitives[torch.cat(demanded)].reshape(-1)] = True
    sizes = [atoms.numel() for _, _, atoms in slots]
    while True:
        kept = keep[primitives].all(1)
        empty = [i for i, part in enumerate(kept.split(sizes)) if not bool(part.any())]
        if not empty:
            break
        # Keep one entry of the first emptied dimension; dimensions tied to it fill up with it.
        i = empty[0]
        value, d, _ = slots[i]
        keep[primitives[sum(sizes[:i])]] = True
        plan.warnings.append(_emptied_warning(value, d))
    for (value, d, _), part in zip(slots, kept.split(sizes)):
        if not bool(part.all()):
            value.kept[d] = part.nonzero().reshape(-1)
            plan.removed_entries += int((~part).sum())
    return plan


def _demanded(value: TensorValue, d: int) -> torch.Tensor:
    if value.demand is None:
        return torch.zeros(value.shape[d], dtype=torch.bool)
    mask = value.demand[d]
    return torch.ones(value.shape[d], dtype=torch.bool) if mask is None else mask


def _emptied_warning(value: TensorValue, d: int) -> str:
    where = value.name or (value.producer.describe() if value.producer else repr(value))
    return (
        f"every entry of dimension {d} of {where} is masked or unused; one entry is kept so the model stays "
        "valid (it carries the masked model's value). If the whole layer should go, remove it from the model."
    )
