"""Deciding what goes: from demanded entries to kept atoms to kept entries per dimension.

An atom is kept when it is pinned or when any entry that needs it is demanded; every other atom
is removed, and with it every entry that refers to it. Because the atoms already encode how the
operators tie dimensions together (see :mod:`speedup.atoms`), this is a single vectorised step.
Dimensions linked one-to-one share the same atom array, so each array is decided once.

A dimension may not lose every entry (a layer whose mask removes all its channels while its
output is still consumed): one entry is then kept, with a warning, and the model stays valid.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .atoms import AtomSolution
from .graph import Graph, NodeKind, TensorValue


@dataclass
class Plan:
    """What deciding noticed (the kept entries themselves are stored on each value as ``value.kept``)."""

    warnings: list[str] = field(default_factory=list)


def decide(graph: Graph, solution: AtomSolution) -> Plan:
    arrays: dict[int, torch.Tensor] = {}
    demand: dict[int, torch.Tensor] = {}
    users: dict[int, list[tuple[TensorValue, int]]] = {}
    for value in graph.values:
        value.kept = [None] * value.ndim
        for d, atoms in enumerate(value.atoms):
            if atoms is None or not isinstance(atoms, torch.Tensor) or not atoms.numel():
                continue
            key = id(atoms)
            need = value.demanded_entries(d)
            if key in arrays:
                if need is not None:
                    demand[key] = need if demand[key] is None else demand[key] | need
            else:
                arrays[key], demand[key] = atoms, need
            users.setdefault(key, []).append((value, d))
    plan = Plan()
    if not arrays:
        return plan
    keys = list(arrays)
    sizes = [arrays[k].numel() for k in keys]
    primitives = solution.primitives(torch.cat([arrays[k] for k in keys]))
    made = _made_from_nothing(graph) if any(demand[k] is None for k in keys) else set()
    needs = [demand[k] if demand[k] is not None
             else torch.ones(n, dtype=torch.bool) if all(_dropped(value, made) for value, _ in users[k])
             else torch.zeros(n, dtype=torch.bool) for k, n in zip(keys, sizes)]
    keep = solution.pinned.clone()
    keep[primitives[torch.cat(needs)].reshape(-1)] = True
    segment = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    while True:
        solution.meet_requirements(keep)
        kept = keep[primitives].all(1)
        kept_counts = torch.zeros(len(sizes), dtype=torch.long).index_add_(0, segment, kept.long())
        empty = (kept_counts == 0).nonzero().reshape(-1).tolist()
        if not empty:
            break
        # Keep one entry of the first emptied dimension; dimensions tied to it fill up with it.
        i = empty[0]
        keep[primitives[sum(sizes[:i])]] = True
        plan.warnings.append(_emptied_warning(*users[keys[i]][0]))
    parts = kept.split(sizes)
    for i in (kept_counts < torch.tensor(sizes)).nonzero().reshape(-1).tolist():
        indices = parts[i].nonzero().reshape(-1)
        for value, d in users[keys[i]]:
            value.kept[d] = indices
    return plan


def _made_from_nothing(graph: Graph) -> set[int]:
    """``id`` of the values the code makes from nothing the model holds or is given (``torch.ones(B, 5)``,
    and what operators compute from such tensors alone)."""
    made: set[int] = set()
    for node in graph.nodes:
        if node.kind is NodeKind.OP and all(id(v) in made for v in node.inputs):
            made.update(id(v) for v in node.outputs)
    return made


def _dropped(value: TensorValue, made: set[int]) -> bool:
    """Whether ``value`` is made from nothing and the analysis found no entry of it needed (the code
    makes it and drops it): removing its entries saves nothing, so it is left as made, without a
    warning that its "layer" could go. A layer whose output nothing reads still loses its masked
    entries (and such a warning says the layer could go)."""
    return id(value) in made and value.demand is None


def _emptied_warning(value: TensorValue, d: int) -> str:
    where = value.name or (value.producer.describe() if value.producer else repr(value))
    return (
        f"every entry of dimension {d} of {where} is masked or unused; one entry is kept so the model stays "
        "valid (what the model returns is unchanged). If the whole layer should go, remove it from the model."
    )
