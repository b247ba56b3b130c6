"""Allocation: how many units of each target go, and which.

Units are allocated in :class:`Candidate` s. A candidate is either one target's own units, or the
channels of a dependency group: a traced :class:`~speedup.groups.ChannelGroup` (a conv, its
BatchNorm, both sides of a residual add, q/k/v/out of a head) or the targets sharing a
``dependency_group_id``. A group's score per channel is the sum of its targets' scores for that
channel (a target whose several entries make one channel, as a head's rows do, contributes their
mean), so coupled layers prune the same channels. Where a target's entries are conjunctions (heads x
positions in a head), only the outermost factor is allocated: whole heads, never a position in every head.

Within a candidate the lowest scores go: ``round(sparse_ratio * units)``, clamped by
``min_sparse_ratio`` / ``max_sparse_ratio`` and so that one unit always stays. A traced group is
allocated per stratum (:meth:`~speedup.groups.ChannelGroup.strata`: each producer's share of a
concatenation), so every layer loses its own fraction. Candidates sharing a
``global_group_id`` are pooled: the lowest scores across all of them go until the group's ratio is
met, each candidate still within its own min/max.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Optional

import torch
from torch import nn

from ..errors import ConfigError
from ..groups import ChannelGroup, GroupMember
from ..plugins.pruning_registry import PruningRegistry
from .targets import Target


@dataclass
class Candidate:
    """Units allocated together, with the targets that scored them."""

    key: str
    targets: list[Target]
    scores: torch.Tensor
    """One score per unit; ``inf`` for a unit no target scored (it is never removed)."""
    ratio: float
    min_ratio: float
    max_ratio: float
    global_group: Any = None
    group: Optional[ChannelGroup] = None
    shared: bool = False
    """Targets of an explicit ``dependency_group_id``: every target's units are the candidate's units."""

    @property
    def scored(self) -> int:
        return int((self.scores != math.inf).sum())


@dataclass
class Plan:
    """The candidates, and the dependency groups that could not be pruned with the reason why."""

    candidates: list[Candidate] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)


def plan(targets: list[Target], scores: dict[str, torch.Tensor], groups: Optional[list[ChannelGroup]],
         excluded: set[str], registry: PruningRegistry, modules: dict[str, nn.Module], ratio_of) -> Plan:
    """Sorts targets into candidates. ``ratio_of(entry)`` gives an entry's sparse ratio for this step."""
    result = Plan()
    explicit: dict[Any, list[Target]] = {}
    traced: dict[int, list[tuple[Target, GroupMember]]] = {}
    index = _member_index(groups or [])
    for target in targets:
        if target.entry.dependency_group_id is not None:
            explicit.setdefault(target.entry.dependency_group_id, []).append(target)
            continue
        found = index.get((target.name, target.blocks.channel_dim)) if target.blocks.channel_dim is not None else None
        if target.heads_only and (found is None or not _spans_several_entries(found[1])):
            raise ConfigError(f"{target.entry.where('granularity')}: the traced graph shows no attention heads in "
                              f"'{target.name}' (a head is a block of rows reshaped into one head of an attention)")
        if found is None and groups is not None and target.blocks.channel_dim is not None:
            result.frozen.append(f"{target.name}: its channels cannot be removed (they are a model input or output, "
                                 "or pass an operator no rule covers)")
        elif found is None:
            result.candidates.append(_single(target, scores[target.name], ratio_of))
        else:
            traced.setdefault(found[0], []).append((target, found[1]))
    for group_id, members in explicit.items():
        result.candidates.append(_shared(group_id, members, scores, ratio_of))
    for number, pairs in traced.items():
        group = groups[number]
        blocker = _blocker(group, excluded, registry, modules) if excluded else None
        if blocker is not None:
            names = ", ".join(sorted({t.name for t, _ in pairs}))
            result.frozen.append(f"{names}: coupled with '{blocker}', which the config list excludes")
            continue
        result.candidates.append(_traced(number, group, pairs, scores, ratio_of))
    return result


def allocate(candidates: list[Candidate], previous: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Which units of each candidate go (boolean per unit); units in ``previous`` go again first."""
    removed: dict[str, torch.Tensor] = {}
    pools: dict[Any, list[Candidate]] = {}
    for candidate in candidates:
        scores = candidate.scores.clone()
        if candidate.key in previous:
            scores[previous[candidate.key]] = -math.inf
        candidate.scores = scores
        if candidate.global_group is None:
            removed[candidate.key] = _stratified(candidate) if candidate.group is not None else \
                _lowest(candidate.scores, _count(candidate))
        else:
            pools.setdefault(candidate.global_group, []).append(candidate)
    for group_id, members in pools.items():
        removed.update(_pooled(group_id, members))
    return removed


def _member_index(groups: list[ChannelGroup]) -> dict[tuple[str, int], tuple[int, GroupMember]]:
    return {(m.parameter, m.dim): (number, m) for number, group in enumerate(groups) for m in group.members}


def _outermost(member: GroupMember) -> torch.Tensor:
    """The group channel each entry belongs to, ``-1`` for none: where an entry is a conjunction (a
    column of a (heads x head_dim) projection refers to its head and its position in the head), the
    outermost factor, the one changing least often along the entries (the head)."""
    refers = member.refers
    if refers.shape[1] == 1:
        return refers[:, 0]
    changes = (refers[1:] != refers[:-1]).sum(0)
    changes[~(refers >= 0).any(0)] = refers.shape[0] + 1  # a column referring to nothing never wins
    return refers[:, int(torch.argmin(changes))]


def _spans_several_entries(member: GroupMember) -> bool:
    channels = _outermost(member)
    channels = channels[channels >= 0]
    return channels.numel() > 0 and int(torch.bincount(channels).max()) > 1


def _blocker(group: ChannelGroup, excluded: set[str], registry: PruningRegistry,
             modules: dict[str, nn.Module]) -> Optional[str]:
    """An excluded module whose own output channels are in the group: removing them is not allowed."""
    for member in group.members:
        module_name, _, attr = member.parameter.rpartition(".")
        if module_name in excluded and _is_output_channels(modules[module_name], attr, member.dim, registry):
            return module_name
    return None


def _is_output_channels(module: nn.Module, attr: str, dim: int, registry: PruningRegistry) -> bool:
    layout = registry.layout(module)
    if layout is None:
        return False
    if attr == layout.weight:
        return layout.weight_out is not None and dim == layout.weight_out % getattr(module, attr).dim()
    return attr in layout.parameters and dim == 0


def _bounds(targets: list[Target], ratio_of) -> tuple[float, float, float, Any]:
    entries = [t.entry for t in targets]
    ratio = min(ratio_of(e) for e in entries)
    global_ids = {e.global_group_id for e in entries if e.global_group_id is not None}
    if len(global_ids) > 1:
        names = ", ".join(t.name for t in targets)
        raise ConfigError(f"{names} prune the same channels but belong to global groups {sorted(map(str, global_ids))}")
    return (ratio, max(e.min_sparse_ratio for e in entries), min(e.max_sparse_ratio for e in entries),
            next(iter(global_ids), None))


def _single(target: Target, scores: torch.Tensor, ratio_of) -> Candidate:
    ratio, low, high, global_id = _bounds([target], ratio_of)
    return Candidate(target.name, [target], scores.float(), ratio, low, high, global_id)


def _shared(group_id: Any, targets: list[Target], scores: dict[str, torch.Tensor], ratio_of) -> Candidate:
    sizes = {t.name: t.units for t in targets}
    if len(set(sizes.values())) > 1:
        raise ConfigError(f"dependency_group_id {group_id!r} joins targets with different numbers of units: "
                          + ", ".join(f"{n} ({u})" for n, u in sizes.items()))
    total = sum(scores[t.name].float() for t in targets)
    ratio, low, high, global_id = _bounds(targets, ratio_of)
    return Candidate(f"dependency group {group_id!r}", targets, total, ratio, low, high, global_id, shared=True)


def _traced(number: int, group: ChannelGroup, pairs: list[tuple[Target, GroupMember]],
            scores: dict[str, torch.Tensor], ratio_of) -> Candidate:
    total = torch.zeros(group.size)
    covered = torch.zeros(group.size, dtype=torch.bool)
    for target, member in pairs:
        channels = _outermost(member)
        rows = torch.nonzero(channels >= 0).flatten()
        channels = channels[rows]
        unit_scores = scores[target.name].float()[rows]
        sums = torch.zeros(group.size).index_add_(0, channels, unit_scores)
        counts = torch.zeros(group.size).index_add_(0, channels, torch.ones_like(unit_scores))
        total += torch.where(counts > 0, sums / counts.clamp(min=1), 0.0)
        covered |= counts > 0
    total[~covered] = math.inf
    ratio, low, high, global_id = _bounds([t for t, _ in pairs], ratio_of)
    return Candidate(f"channel group {number}", [t for t, _ in pairs], total, ratio, low, high, global_id, group)


def _limits(candidate: Candidate) -> tuple[int, int]:
    n = candidate.scored
    return math.ceil(candidate.min_ratio * n - 1e-9), min(math.floor(candidate.max_ratio * n + 1e-9), max(n - 1, 0))


def _count(candidate: Candidate) -> int:
    low, high = _limits(candidate)
    return max(low, min(high, round(candidate.ratio * candidate.scored)))


def _stratified(candidate: Candidate) -> torch.Tensor:
    """The lowest of each stratum of a traced group (each producer's share of a concatenation), at
    the candidate's ratio: every layer loses its fraction, as a per-layer ratio says."""
    removed = torch.zeros(candidate.scores.numel(), dtype=torch.bool)
    for stratum in candidate.group.strata():
        part = replace(candidate, scores=candidate.scores[stratum])
        removed[stratum] = _lowest(part.scores, _count(part))
    return removed


def _lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    removed = torch.zeros(scores.numel(), dtype=torch.bool)
    removed[torch.sort(scores, stable=True).indices[:count]] = True
    return removed


def _pooled(group_id: Any, members: list[Candidate]) -> dict[str, torch.Tensor]:
    ratios = {c.ratio for c in members}
    if len(ratios) > 1:
        raise ConfigError(f"global_group_id {group_id!r} has different sparse ratios {sorted(ratios)}; a global group "
                          "shares one ratio")
    limits = [_limits(c) for c in members]
    wanted = round(members[0].ratio * sum(c.scored for c in members))
    wanted = max(sum(low for low, _ in limits), min(sum(high for _, high in limits), wanted))
    taken = [_lowest(c.scores, low) for c, (low, _) in zip(members, limits)]
    counts = [int(t.sum()) for t in taken]
    scores = torch.cat([c.scores for c in members])
    owner = torch.cat([torch.full((c.scores.numel(),), i) for i, c in enumerate(members)]).tolist()
    position = torch.cat([torch.arange(c.scores.numel()) for c in members]).tolist()
    left = wanted - sum(counts)
    for i in torch.sort(scores, stable=True).indices.tolist():
        if left <= 0 or scores[i] == math.inf:
            break
        c, p = owner[i], position[i]
        if taken[c][p] or counts[c] >= limits[c][1]:
            continue
        taken[c][p] = True
        counts[c] += 1
        left -= 1
    return {c.key: t for c, t in zip(members, taken)}
