"""Atoms: the units of removal, and the constraints that keep every removal legal.

Every entry along a prunable dimension of every tensor and parameter refers to one *atom*. An atom
is either kept or removed, and an entry exists in the sped-up model exactly when its atoms are
kept. Rules describe operators by relating atoms, never by deciding removals:

* **tie** two atom arrays entry by entry: the entries must be kept together (an elementwise add
  ties its operands' channels; a linear layer ties its input features to its weight's columns);
* **define** an atom as the conjunction of others: a reshape of 768 features into 12 heads of 64
  defines feature ``h * 64 + e`` as "head ``h`` and position ``e``", so removing a head removes
  its 64 features and nothing else can remove half a head;
* **pin** atoms that must stay (graph inputs and outputs, operators nobody understands);
* **require** one atom array of another, entry by entry: an entry is kept only with the entry it
  requires, which may stay alone (a norm's output entry needs its input entry, whose statistics
  need it whether or not the output entry goes).

Because a removal is decided per atom, any set of removed atoms gives shapes that agree at every
operator: legality holds by construction, and the engine needs no legalisation fixpoint. The
table is solved once, with vectorised connected components, so the cost is linear in the number
of entries rather than a pass over the graph per node.

Atom ``0`` is the *unit* atom: always kept, used to pad conjunctions of different widths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

UNIT = 0
_MAX_DEPTH = 6


class AtomTable:
    """Allocates atoms and collects ties, conjunctions and pins until :meth:`solve`."""

    def __init__(self) -> None:
        self.count = 1
        self._ties: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._pins: list[torch.Tensor] = []
        self._defined: list[torch.Tensor] = []
        self._parts: list[torch.Tensor] = []
        self._offered: list[torch.Tensor] = []
        self._requires: list[tuple[torch.Tensor, torch.Tensor]] = []

    def fresh(self, n: int) -> torch.Tensor:
        atoms = torch.arange(self.count, self.count + n, dtype=torch.long)
        self.count += n
        return atoms

    def tie(self, a: torch.Tensor, b: torch.Tensor) -> None:
        if a is b:
            return
        if a.shape != b.shape:
            raise ValueError(f"cannot tie atom arrays of sizes {tuple(a.shape)} and {tuple(b.shape)}")
        self._ties.append((a.reshape(-1), b.reshape(-1)))

    def pin(self, atoms: torch.Tensor) -> None:
        self._pins.append(atoms.reshape(-1))

    def require(self, dependent: torch.Tensor, required: torch.Tensor) -> None:
        if dependent.shape != required.shape:
            raise ValueError(f"cannot require atom arrays of sizes {tuple(dependent.shape)} and "
                             f"{tuple(required.shape)}")
        self._requires.append((dependent.reshape(-1), required.reshape(-1)))

    def define(self, atoms: torch.Tensor, parts: torch.Tensor, offered: int = 0) -> None:
        """``atoms[i]`` is kept exactly when every atom of ``parts[i]`` is kept; ``offered`` is the
        column of ``parts`` that pruning algorithms pick from (see :meth:`Analysis.define`)."""
        if parts.dim() == 1:
            parts = parts[:, None]
        if parts.shape[0] != atoms.numel():
            raise ValueError("a conjunction needs one row of parts per atom")
        self._defined.append(atoms.reshape(-1))
        self._parts.append(parts)
        self._offered.append(torch.full((parts.shape[0],), offered, dtype=torch.long))

    def solve(self) -> "AtomSolution":
        return AtomSolution.build(self)


@dataclass
class AtomSolution:
    """Where each atom ended up: its primitive parts (``expansion``) and whether it is pinned."""

    root: torch.Tensor
    """Representative of each atom's class after ties."""
    expansion: torch.Tensor
    """``(count, width)``: the primitive class representatives an atom stands for, padded with UNIT."""
    pinned: torch.Tensor
    """Boolean over atoms: primitive classes that must stay."""
    defined: torch.Tensor
    """The atoms defined as conjunctions, and (``parts``) their parts, outermost first, as given."""
    parts: torch.Tensor
    offered: torch.Tensor
    """Per defined atom: the column of ``parts`` offered to pruning algorithms as the unit to pick."""
    dependent: torch.Tensor
    """Atoms kept only with the matching atom of ``required`` (see :meth:`AtomTable.require`)."""
    required: torch.Tensor

    @classmethod
    def build(cls, table: AtomTable) -> "AtomSolution":
        count = table.count
        tie_a = [a for a, _ in table._ties]
        tie_b = [b for _, b in table._ties]
        defined = torch.cat(table._defined) if table._defined else torch.empty(0, dtype=torch.long)
        parts = _pad_cat(table._parts)
        root = _components(count, tie_a, tie_b)
        # Classes defined twice (two reshapes of the same features) must agree: tie their parts.
        for _ in range(_MAX_DEPTH):
            extra = _reconcile_definitions(root, defined, parts)
            if extra is None:
                break
            tie_a.append(extra[0])
            tie_b.append(extra[1])
            root = _components(count, tie_a, tie_b)
        offered = torch.cat(table._offered) if table._offered else torch.empty(0, dtype=torch.long)
        requires = list(table._requires)
        defined, parts, offered = _requirements_of_self_definitions(root, defined, parts, offered, requires)
        expansion, cyclic = _expand(root, defined, parts, count)
        pinned = torch.zeros(count, dtype=torch.bool)
        if table._pins:
            pinned[expansion[root[torch.cat(table._pins)]].reshape(-1)] = True
        pinned[expansion[cyclic].reshape(-1)] = True
        pinned[UNIT] = True
        none = torch.empty(0, dtype=torch.long)
        dependent = torch.cat([d for d, _ in requires]) if requires else none
        required = torch.cat([r for _, r in requires]) if requires else none
        return cls(root, expansion, pinned, defined, parts, offered, dependent, required)

    def primitives(self, atoms: torch.Tensor) -> torch.Tensor:
        """``(n, width)`` primitive classes of each atom of a 1-D array."""
        return self.expansion[self.root[atoms]]

    def meet_requirements(self, keep: torch.Tensor) -> None:
        """Keeps (in ``keep``, over primitive classes) what every kept dependent atom requires."""
        if not self.dependent.numel():
            return
        dependent, required = self.primitives(self.dependent), self.primitives(self.required)
        while True:
            missing = keep[dependent].all(1) & ~keep[required].all(1)
            if not bool(missing.any()):
                return
            keep[required[missing].reshape(-1)] = True


def _pad_cat(parts: list[torch.Tensor]) -> torch.Tensor:
    if not parts:
        return torch.empty(0, 1, dtype=torch.long)
    width = max(p.shape[1] for p in parts)
    return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1]), value=UNIT) for p in parts])


def _components(count: int, tie_a: list[torch.Tensor], tie_b: list[torch.Tensor]) -> torch.Tensor:
    """Connected components of the tie graph; each atom maps to the smallest atom of its class."""
    parent = torch.arange(count, dtype=torch.long)
    if not tie_a:
        return parent
    a = torch.cat(tie_a)
    b = torch.cat(tie_b)
    while True:
        pa, pb = parent[a], parent[b]
        differ = pa != pb
        if not bool(differ.any()):
            return parent
        lo = torch.minimum(pa, pb)[differ]
        hi = torch.maximum(pa, pb)[differ]
        parent.scatter_reduce_(0, hi, lo, reduce="amin")
        while True:  # pointer jumping until every atom points at a root
            grand = parent[parent]
            if torch.equal(grand, parent):
                break
            parent = grand


def _reconcile_definitions(root: torch.Tensor, defined: torch.Tensor, parts: torch.Tensor):
    """Ties that make every definition of one class agree; ``None`` when they already do.

    Two definitions of the same width are tied part by part (two identical reshapes). Definitions
    of different widths cannot be matched part by part; tying all their parts together is
    conservative (the entries then live or go as one) and always legal.
    """
    if defined.numel() == 0:
        return None
    classes = root[defined]
    part_roots = torch.where(parts == UNIT, UNIT, root[parts])
    order = torch.argsort(classes, stable=True)
    classes, part_roots = classes[order], part_roots[order]
    same_class = classes[1:] == classes[:-1]
    if not bool(same_class.any()):
        return None
    first = torch.ones_like(classes, dtype=torch.bool)
    first[1:] = ~same_class
    group_start = torch.cummax(torch.where(first, torch.arange(len(classes)), 0), 0).values
    reference = part_roots[group_start]
    mismatch = (part_roots != reference).any(1)
    if not bool(mismatch.any()):
        return None
    widths = (part_roots != UNIT).sum(1)
    same_width = widths == widths[group_start]
    a_list, b_list = [], []
    pairwise = mismatch & same_width
    if bool(pairwise.any()):
        a, b = part_roots[pairwise], reference[pairwise]
        keep = (a != UNIT) & (b != UNIT)
        a_list.append(a[keep])
        b_list.append(b[keep])
    collapse = mismatch & ~same_width
    if bool(collapse.any()):
        rows = torch.cat([part_roots[collapse], reference[collapse]], 1)
        anchor = rows.max(1, keepdim=True).values.expand_as(rows)
        keep = rows != UNIT
        a_list.append(rows[keep])
        b_list.append(anchor[keep])
    return torch.cat(a_list), torch.cat(b_list)


def _requirements_of_self_definitions(root: torch.Tensor, defined: torch.Tensor, parts: torch.Tensor,
                                      offered: torch.Tensor, requires: list) -> tuple:
    """Definitions of a class with itself among its parts, once ties are made, become requirements:
    ``a = a and b`` says only that ``a`` is kept with ``b`` (``a`` may go alone). They arise where a
    dimension merged and split again meets its own atoms: heads merged with the batch and token
    positions by an ``einsum``, split back, and added to scores holding the heads. Left as
    definitions they were a cycle, and every atom it touched was pinned. Returns the definitions
    left; the requirements are appended to ``requires``."""
    if defined.numel() == 0:
        return defined, parts, offered
    classes = root[defined]
    part_roots = torch.where(parts == UNIT, UNIT, root[parts])
    own = (part_roots == classes[:, None]).any(1)
    if not bool(own.any()):
        return defined, parts, offered
    dropped = torch.isin(classes, classes[own])  # every definition of such a class: they agree (reconciled)
    rows, owners = part_roots[dropped], classes[dropped][:, None].expand(-1, parts.shape[1])
    other = (rows != UNIT) & (rows != owners)
    requires.append((owners[other], rows[other]))
    return defined[~dropped], parts[~dropped], offered[~dropped]


def _expand(root: torch.Tensor, defined: torch.Tensor, parts: torch.Tensor, count: int):
    """Resolves every class to the primitive classes it is a conjunction of."""
    width = parts.shape[1] if defined.numel() else 1
    table = torch.full((count, width), UNIT, dtype=torch.long)
    table[:, 0] = torch.arange(count)
    is_defined = torch.zeros(count, dtype=torch.bool)
    if defined.numel():
        classes = root[defined]
        table[classes] = torch.where(parts == UNIT, UNIT, root[parts])
        is_defined[classes] = True
    expansion = table[root]
    for _ in range(_MAX_DEPTH):
        if not bool(is_defined[expansion].any()):
            return expansion, torch.empty(0, dtype=torch.long)
        expansion = table[expansion].reshape(count, -1)
        expansion = _compact(expansion)
    # Still defined after the maximum depth: a cycle of definitions. Pin what it touches.
    cyclic = is_defined[expansion].any(1).nonzero().reshape(-1)
    expansion = torch.where(is_defined[expansion], UNIT, expansion)
    return expansion, cyclic


def _compact(expansion: torch.Tensor) -> torch.Tensor:
    """Drops UNIT padding columns so conjunction widths stay small."""
    ordered = torch.sort(expansion, dim=1, descending=True).values
    width = max(int((ordered != UNIT).sum(1).max()), 1)
    return ordered[:, :width]
