"""The pruner: config list -> targets -> scores -> allocation -> masks, once or on a schedule.

It composes the four orthogonal pieces of a pruning algorithm (target, metric, allocation,
scheduling) plus an optional objective, following the prototype's control flow::

    for each step of the schedule:            # scheduling loop
        step objective / sparsity
        search the sparsity meeting it        # allocation loop (objective only)
        masks; fine_tune(model, masks, step)
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Optional, Sequence, Union

from torch import nn

from ..engine import SpeedupWarning
from ..errors import ConfigError
from ..groups import find_groups
from ..plugins.manager import loaded_plugins
from . import allocation
from .config import ConfigEntry, parse_config_list, select_modules
from .masking import Masks, align_masks, build_masks
from .metrics import Calibration, Metric
from .objective import Objective, search
from ..plugins.pruning_registry import PruningRegistry
from .scheduling import Schedule, masks_applied
from .targets import targets_of

_MOST = 0.99
"""The highest ratio a scaled entry reaches (one unit in a hundred stays)."""

FineTune = Callable[[nn.Module, Masks, int], None]
"""``fine_tune(model, masks, step)``: trains the masked model between steps (masks stay applied)."""


class Pruner:
    """Computes masks for ``model`` from an NNI 3.0 config list. The model is only read.

    :param model: the model to prune.
    :param config_list: NNI 3.0 config list (see :mod:`speedup.pruning.config`).
    :param example_inputs: what ``model`` is run on to find the dependency groups (as for
        :func:`speedup.shrink`: a tensor, a tuple of positional inputs, or a dict of keyword inputs).
    :param metric: a registered metric name (``"l1"``, ``"l2"``, ``"fpgm"``, ``"slim"``, ``"apoz"``,
        ``"mean_activation"``, ``"taylor"``, ``"random"``) or a :class:`~speedup.pruning.metrics.Metric`.
    :param calibration: batches for data metrics (APoZ, mean activation, Taylor).
    :param dependency_aware: derive dependency groups from the traced graph, so that coupled layers
        prune the same channels and everything pruned can be removed by the speedup.
    :param metric_options: passed to the metric's factory (``seed=`` for ``random``).
    """

    def __init__(self, model: nn.Module, config_list: Sequence[dict], example_inputs: Any,
                 metric: Union[str, Metric] = "l1", *, calibration: Optional[Calibration] = None,
                 dependency_aware: bool = True, registry: Optional[PruningRegistry] = None, **metric_options: Any):
        self.model = model
        self.example_inputs = example_inputs
        self.registry = registry if registry is not None else loaded_plugins().pruning
        self.entries = parse_config_list(config_list)
        selected, self.excluded = select_modules(model, self.entries)
        self.aligned = [s for s in selected if s.entry.align is not None]
        self.targets = [t for s in selected if s.entry.align is None for t in targets_of(s, self.registry)]
        self.metric = self._metric(metric, metric_options)
        self.calibration = calibration
        self.modules = dict(model.named_modules())
        channels = any(t.blocks.channel_dim is not None for t in self.targets)
        self.groups = find_groups(model, example_inputs) if dependency_aware and channels else None
        self.frozen: list[str] = []
        """Targets left unpruned, with the reason: their channels cannot be removed (with dependency
        groups: a model input or output, a barrier), or an excluded module shares them."""
        self.reached: Optional[float] = None
        """After :meth:`run` with an objective: the measured ratio the last step reached."""
        self._removed: dict[str, Any] = {}

    def compute_masks(self, scale: float = 1.0) -> Masks:
        """Masks at every entry's ``sparse_ratio`` times ``scale``; units removed before stay removed."""
        return self._masks(self._scores(), scale, remember=True)

    def run(self, fine_tune: Optional[FineTune] = None, schedule: Union[str, Schedule] = "one_shot",
            objective: Optional[Objective] = None, **schedule_options: Any) -> Masks:
        """Prunes step by step; returns the final masks.

        :param fine_tune: called after each step with the model, whose masked parameters are then
            zeroed and kept zero during the call; the model stays masked afterwards. Without it the
            model is not changed.
        :param schedule: ``"one_shot"``, ``"linear"``, ``"agp"`` (or a registered name, or a
            :class:`~speedup.pruning.scheduling.Schedule`); ``steps=`` goes to its factory.
        :param objective: instead of the ratios themselves, scale them until the objective is met;
            each step aims at its share of the objective.
        """
        if isinstance(schedule, str):
            schedule = self.registry.schedule(schedule)(**schedule_options)
        masks: Masks = {}
        for step, fraction in enumerate(schedule.fractions()):
            scores = self._scores()  # once per step: the search below only changes the ratios
            scale = fraction
            if objective is not None:
                goal = 1.0 - fraction * (1.0 - objective.ratio)
                scale, self.reached = search(objective, goal, lambda s: self._masks(scores, s, False, searching=True),
                                             self._highest_scale(), self.model, self.example_inputs)
            masks = self._masks(scores, scale, remember=True, searching=objective is not None)
            if fine_tune is not None:
                with masks_applied(self.model, masks):
                    fine_tune(self.model, masks, step)
        return masks

    def _masks(self, scores: dict, scale: float, remember: bool, searching: bool = False) -> Masks:
        """``searching``: an objective scales the ratios, so an entry without ``sparse_ratio`` counts as 1."""
        planned = allocation.plan(self.targets, scores, self.groups, self.excluded, self.registry, self.modules,
                                  lambda entry: self._ratio(entry, scale, searching))
        removed = allocation.allocate(planned.candidates, self._removed)
        if remember:
            self._removed = removed
            self._warn_frozen(planned.frozen)
        masks = build_masks(planned.candidates, removed, self.excluded, self.model)
        align_masks(masks, self.aligned, self.model)
        return masks

    def _scores(self) -> dict:
        self.metric.calibrate(self.model, self.targets, self.calibration)
        scores = {}
        for target in self.targets:
            score = self.metric.score(target)
            if score.numel() != target.units:
                raise ValueError(f"metric {self.metric.name} gave {score.numel()} scores for the {target.units} units "
                                 f"of '{target.name}'")
            scores[target.name] = score.detach().reshape(-1).float().cpu()  # allocation and masks live on the CPU
        return scores

    def _ratio(self, entry: ConfigEntry, scale: float, searching: bool) -> float:
        if entry.sparse_ratio is None and not searching:
            raise ConfigError(f"{entry.where()} has no sparse_ratio (only entries with 'align', or pruned towards an "
                              "objective, may go without)")
        base = 1.0 if entry.sparse_ratio is None else entry.sparse_ratio
        return min(base * scale, entry.max_sparse_ratio, _MOST)

    def _highest_scale(self) -> float:
        """The scale at which every entry reaches its max_sparse_ratio (at most :data:`_MOST`)."""
        ratios = [(e.sparse_ratio or 1.0, min(e.max_sparse_ratio, _MOST)) for e in self.entries if e.align is None]
        return max(high / base for base, high in ratios if base > 0)

    def _metric(self, metric: Union[str, Metric], options: dict) -> Metric:
        if isinstance(metric, Metric):
            return metric
        try:
            return self.registry.metric(metric)(**options)
        except KeyError as exc:
            raise ConfigError(exc.args[0]) from None

    def _warn_frozen(self, frozen: list[str]) -> None:
        new = [f for f in frozen if f not in self.frozen]
        self.frozen += new
        if new:
            warnings.warn("not pruned: " + "; ".join(new), SpeedupWarning, stacklevel=3)


def prune(model: nn.Module, config_list: Sequence[dict], example_inputs: Any, metric: Union[str, Metric] = "l1", *,
          calibration: Optional[Calibration] = None, dependency_aware: bool = True, **metric_options: Any) -> Masks:
    """Masks for ``model`` in NNI's layout, ready for :func:`speedup.shrink` / ``ModelSpeedup``.

    One-shot: every entry of ``config_list`` pruned to its ``sparse_ratio`` by ``metric``. See
    :class:`Pruner` for the parameters, and :meth:`Pruner.run` for schedules and objectives.
    """
    pruner = Pruner(model, config_list, example_inputs, metric, calibration=calibration,
                    dependency_aware=dependency_aware, **metric_options)
    return pruner.compute_masks()
