"""Which channels of a model live or go together: dependency groups read off the traced graph.

The coupling pass that lets the engine remove channels legally also says, for every parameter
dimension, which atoms its entries stand for (see :mod:`speedup.atoms`). Channels that must go
together (both operands of a residual add, a conv and the depthwise conv after it, the two branches
of a channel shuffle, q/k/v/out of one head) share atoms. A :class:`ChannelGroup` is one axis of
such coupled channels; removing member ``i`` of a group removes every parameter slice tied to it.

Pruning algorithms use the groups to pick channels *consistently* (so that the speedup can remove
all of them); :func:`consistent_masks` is the simplest such algorithm, a random pick.

Within a conjunction (a reshape into heads x head_dim, a grouped layer's groups x positions) only
the factor its rule offers is, when it is free to go: heads, never part of ``head_dim``; positions of
a channel shuffle, never a whole branch; positions in every group of a grouped convolution (not
whole groups), which is what shrinks its work with the square of the width.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from .atoms import UNIT, AtomSolution
from .engine import _Rules, _trace_error, split_inputs
from .computed_weights import freeze_computed_weights
from .equivalent_forms import put_equivalent_forms
from .graph import Node, TensorValue
from .masks import Masks
from .parametrized import evaluated, freeze_parametrized
from .propagation import Analysis
from .random_draws import RandomDraws
from .refill import refill_pinning_modules
from .rule import OpRule
from .tracer import TracingFailed, ordinary_mode, trace
from .transaction import Transaction
from .wrappers import eager_model


@dataclass
class GroupMember:
    """One parameter dimension touched by a group: an entry goes when a group member it refers to goes."""

    parameter: str
    dim: int
    refers: torch.Tensor
    """``(entries, k)``: the group members each entry of the dimension refers to, ``-1`` padding. An
    entry refers to several members where it is a conjunction (a grouped layer's group and position)."""

    @property
    def size(self) -> int:
        return self.refers.shape[0]

    def removed_by(self, members: torch.Tensor) -> torch.Tensor:
        """Boolean over the entries: those referring to one of ``members`` (group member indices)."""
        return torch.isin(self.refers, members).any(1)


@dataclass
class ChannelGroup:
    """An axis of channels coupled through the model: pick members, and all their slices go."""

    size: int
    members: list[GroupMember] = field(default_factory=list)
    _strata: Optional[list[torch.Tensor]] = field(default=None, repr=False, compare=False)

    def strata(self) -> list[torch.Tensor]:
        """The group's channels split by which parameter slices refer to them: each layer's own share.

        The channels of a concatenation are one group (every layer reading the concatenation reads
        them all), but each producer writes its own part of it: DenseNet's layers each add 32.
        Picking the same fraction in every stratum prunes each producer alike, so layers keep
        regular widths (16 of 32, not 13 or 19), which is what a per-layer ratio means and what
        CPU kernels run fastest.
        """
        if self._strata is None:  # computed once: schedules and objective searches allocate many times
            self._strata = self._split_by_referrers()
        return self._strata

    def _split_by_referrers(self) -> list[torch.Tensor]:
        """Channels with the same set of referring parameter slices (a random 40-bit tag per slice, summed)."""
        generator = torch.Generator().manual_seed(self.size)
        signature = torch.zeros(self.size, dtype=torch.int64)
        for member in self.members:
            touched = torch.zeros(self.size, dtype=torch.bool)
            refers = member.refers[member.refers >= 0]
            touched[refers] = True
            signature += touched.long() * torch.randint(1, 2**40, (), generator=generator)
        _, inverse = torch.unique(signature, return_inverse=True)
        return [torch.nonzero(inverse == s).flatten() for s in range(int(inverse.max()) + 1)] if self.size else []

    def describe(self) -> str:
        where = ", ".join(f"{m.parameter}[{m.dim}]" for m in self.members[:4])
        more = f" and {len(self.members) - 4} more" if len(self.members) > 4 else ""
        return f"{self.size} channels of {where}{more}"


@ordinary_mode()
def find_groups(model: nn.Module, example_inputs: Any) -> list[ChannelGroup]:
    """Traces ``model`` (left unchanged) and returns its groups of coupled, removable channels."""
    args, kwargs = split_inputs(example_inputs)
    model = eager_model(model)
    rules = _Rules({})
    tx = Transaction()
    tx.keep_attributes(model)
    tx.set_training(model, False)
    draws = RandomDraws()  # a model drawing random numbers in forward: the user's generator left as it was
    try:
        freeze_parametrized(model, tx)  # masks name the tensors the model computes, as the speedup reads them
        freeze_computed_weights(model, Masks(), tx, rules.claims_or_replaces)
        put_equivalent_forms(model, rules.registry, tx)  # its groups are those the speedup can remove
        graph = trace(model, args, kwargs, rules.claims, is_state=rules.registry.is_state, boundaries=True,
                      keep_values=tx.keep_values, op_rule=rules.registry.op_rule).graph
    except TracingFailed as failure:
        raise _trace_error(failure, args, kwargs) from failure.error
    finally:
        tx.rollback()
        draws.replay()
    analysis = Analysis(graph, rules.for_node, OpRule())
    solution = analysis.couple(offering=True)  # class scores are not offered
    refilled = refill_pinning_modules(graph, analysis, _offers_nothing)
    if refilled:  # as the speedup will, their parameters not being masked (see speedup.refill)
        solution = analysis.couple(frozenset(node.index for node, _ in refilled), offering=True)
    parameters = [v for v in graph.parameters.values() if v.owner is not None and _is_parameter(v)]
    slots = []
    for value in parameters:
        for d, atoms in enumerate(value.atoms):
            if atoms is not None and isinstance(atoms, torch.Tensor) and atoms.numel():
                slots.append((value, d, solution.primitives(atoms)))
    removable = _removable_classes(solution)
    return _group(slots, removable)


def consistent_masks(model: nn.Module, example_inputs: Any, sparsity: float = 0.5, seed: int = 0,
                     groups: Optional[list[ChannelGroup]] = None) -> dict:
    """Masks removing ``sparsity`` of every channel group (of each of its strata), at random but consistently.

    Every parameter slice tied to a removed channel is masked, so everything masked can really go.
    The result is in the NNI layout ``{module: {parameter: mask}}``, accepted by ``speedup.shrink``.
    """
    groups = find_groups(model, example_inputs) if groups is None else groups
    generator = torch.Generator().manual_seed(seed)
    keep: dict[tuple[str, int], torch.Tensor] = {}
    for group in groups:
        picked = [_outer_axis(group, stratum) for stratum in group.strata()]
        removed = torch.cat([axis[torch.randperm(axis.numel(), generator=generator)]
                             [: int(round(axis.numel() * sparsity))] for axis in picked])
        for member in group.members:
            kept = keep.setdefault((member.parameter, member.dim), torch.ones(member.size, dtype=torch.bool))
            kept &= ~member.removed_by(removed)
    masks: dict[str, dict[str, torch.Tensor]] = {}
    for (name, dim), kept in keep.items():
        module, _, attr = name.rpartition(".")
        owner = model.get_submodule(module)
        with evaluated(owner), torch.no_grad():  # a parametrized weight is computed (a spectral norm updates in training)
            full = getattr(owner, attr).shape
        shape = [1] * len(full)
        shape[dim] = -1
        entry = masks.setdefault(module, {})
        line = kept.reshape(shape)
        entry[attr] = (entry[attr] & line) if attr in entry else line.expand(full)
    return masks


def _outer_axis(group: ChannelGroup, stratum: torch.Tensor) -> torch.Tensor:
    """The members of ``stratum`` to pick from: all of them, unless entries are conjunctions of several
    of them (GQA's fused projection: a query head is a key/value group and a position within it).
    Members that never meet in one entry are alternatives along one axis; picking ``sparsity`` of every
    axis would remove more than asked (and both key/value groups, every head with them). The axis
    picked from is the outer one: whose members stand alone for the most entries (the key/value
    groups, alone in the key and value rows; heads, not the rotary positions within them)."""
    if not any(m.refers.shape[1] > 1 and bool(((m.refers >= 0).sum(1) > 1).any()) for m in group.members):
        return stratum
    local = torch.full((group.size,), -1, dtype=torch.long)
    local[stratum] = torch.arange(stratum.numel())
    meet = torch.zeros(stratum.numel(), stratum.numel(), dtype=torch.bool)
    alone = torch.zeros(stratum.numel(), dtype=torch.long)
    for member in group.members:
        rows = torch.where(member.refers >= 0, local[member.refers.clamp(min=0)], -1)
        present = torch.zeros(rows.shape[0], stratum.numel() + 1, dtype=torch.float32)
        present.scatter_(1, torch.where(rows >= 0, rows, stratum.numel()), 1.0)
        present = present[:, :-1]
        single = present.sum(1) == 1
        alone += present[single].sum(0).long()
        meet |= (present[~single].T @ present[~single]) > 0
    axes: list[list[int]] = []  # members that never meet share an axis
    for member in range(stratum.numel()):
        axis = next((axis for axis in axes if not bool(meet[member, axis].any())), None)
        if axis is None:
            axes.append([member])
        else:
            axis.append(member)
    return stratum[torch.tensor(max(axes, key=lambda axis: (int(alone[axis].sum()), len(axis))))]


def _offers_nothing(node: Node) -> bool:
    """Whether no parameter of a module node has a dimension of more than one entry to offer: a module
    that loses nothing when refilled (a Conv1d of one channel run along the channels)."""
    return all(atoms is None or not isinstance(atoms, torch.Tensor) or atoms.numel() <= 1
               for value in node.params.values() for atoms in value.atoms)


def _is_parameter(value: TensorValue) -> bool:
    module, attr = value.owner
    return attr in module._parameters


def _removable_classes(solution: AtomSolution) -> torch.Tensor:
    """Primitive classes a consistent pick may remove: not pinned, and never a factor the rule that
    defined a conjunction did not offer (see :meth:`~speedup.propagation.Analysis.define`) while the
    offered one is free to go (if it is not, the outermost free factor is offered instead)."""
    count = solution.pinned.numel()
    inner = torch.zeros(count, dtype=torch.bool)
    outer = torch.zeros(count, dtype=torch.bool)
    if solution.defined.numel():
        parts = solution.parts
        for row in range(parts.shape[0]):
            factors = []
            for part in parts[row].tolist():
                primitives = solution.primitives(torch.tensor([part]))[0] if part != UNIT else torch.empty(0, dtype=torch.long)
                primitives = primitives[primitives != UNIT]
                factors.append(primitives[~solution.pinned[primitives]])
            offered = int(solution.offered[row])
            chosen = offered if offered < len(factors) and factors[offered].numel() else next(
                (i for i, free in enumerate(factors) if free.numel()), None)
            for i, free in enumerate(factors):
                if i == chosen:
                    outer[free] = True
                else:
                    inner[free] = True
    return ~solution.pinned & ~(inner & ~outer)


def _group(slots: list, removable: torch.Tensor) -> list[ChannelGroup]:
    """Joins removable classes that share a parameter dimension into groups (one axis each)."""
    # A class that carries more than half of some dimension is not a channel but a block of them
    # (coupling constraints merged it, as through chains of channel shuffles): not offered.
    removable = removable.clone()
    for value, d, primitives in slots:
        counts = torch.bincount(primitives.reshape(-1), minlength=removable.numel())
        removable &= counts * 2 <= primitives.shape[0]
    parent = list(range(removable.numel()))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    per_slot = []
    for value, d, primitives in slots:
        classes = torch.unique(primitives[removable[primitives]]).tolist()
        per_slot.append(classes)
        if classes:
            root = find(classes[0])
            for other in classes[1:]:
                parent[find(other)] = root
    used = sorted({c for classes in per_slot for c in classes})
    roots = {c: find(c) for c in used}
    local = torch.full((removable.numel(),), -1, dtype=torch.long)
    groups: dict[int, ChannelGroup] = {}
    for c in used:  # numbered in class order within each group
        group = groups.setdefault(roots[c], ChannelGroup(0))
        local[c] = group.size
        group.size += 1
    for (value, d, primitives), classes in zip(slots, per_slot):
        if classes:
            refers = torch.where(removable[primitives], local[primitives], -1)
            groups[roots[classes[0]]].members.append(GroupMember(value.name, d, refers))
    return list(groups.values())
