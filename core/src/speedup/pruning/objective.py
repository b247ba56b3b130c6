"""Objectives: reach a FLOPs, parameter or measured-latency ratio by searching the sparsity.

The config list gives each entry's sparse ratio; an objective scales all of them by one factor,
found by bisection: each try computes masks, speeds a copy of the model up with them and measures
it against the original. The smallest factor meeting the objective wins (prune no more than needed).
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..engine import SpeedupWarning, shrink, split_inputs

MEASURES = ("flops", "params", "latency")


@dataclass
class Objective:
    """Prune until ``measure`` (``"flops"``, ``"params"`` or ``"latency"``) is at most ``ratio`` of the original's.

    ``tolerance``: the search stops once within it below ``ratio``; ``max_tries``: speedups tried per
    search; ``repeats``: timed forwards per model and try (latency only).
    """

    measure: str
    ratio: float
    tolerance: float = 0.01
    max_tries: int = 12
    repeats: int = 5

    def __post_init__(self) -> None:
        if self.measure not in MEASURES:
            raise ValueError(f"an objective measures one of {MEASURES}, got {self.measure!r}")
        if not 0.0 < self.ratio < 1.0:
            raise ValueError(f"an objective's ratio is between 0 and 1 (after / before), got {self.ratio!r}")


def search(objective: Objective, target_ratio: float, masks_at: Callable[[float], dict], highest: float,
           model: nn.Module, example_inputs: Any) -> tuple[float, float]:
    """The smallest scale in ``[0, highest]`` whose masks bring the measure to ``target_ratio`` or below.

    Returns ``(scale, measured ratio)``. Raises ``ValueError`` when even ``highest`` does not get there.
    """
    measure = _measurer(objective, model, example_inputs)
    low, high = 0.0, highest
    reached = measure(masks_at(high))
    if reached > target_ratio:
        raise ValueError(f"the objective {objective.measure} <= {target_ratio:.3f} of the original cannot be met: "
                         f"pruning every selected target to its max_sparse_ratio gives {reached:.3f}. Select more "
                         "modules or raise max_sparse_ratio.")
    for _ in range(objective.max_tries - 1):
        if target_ratio - reached <= objective.tolerance:
            break
        middle = (low + high) / 2
        value = measure(masks_at(middle))
        if value <= target_ratio:
            high, reached = middle, value
        else:
            low = middle
    return high, reached


def _measurer(objective: Objective, model: nn.Module, example_inputs: Any) -> Callable[[dict], float]:
    baseline = _latency(model, example_inputs, objective.repeats) if objective.measure == "latency" else None

    def measure(masks: dict) -> float:
        smaller = copy.deepcopy(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SpeedupWarning)
            report = shrink(smaller, masks, example_inputs, verify=False)
        if objective.measure == "flops":
            return report.flops_ratio
        if objective.measure == "params":
            return report.param_ratio
        return _latency(smaller, example_inputs, objective.repeats) / baseline

    return measure


def _latency(model: nn.Module, example_inputs: Any, repeats: int) -> float:
    """Median seconds per forward on ``example_inputs`` after one warm-up run."""
    args, kwargs = split_inputs(example_inputs)
    times = []
    with torch.no_grad():
        model(*args, **kwargs)
        for _ in range(max(repeats, 1)):
            started = time.perf_counter()
            model(*args, **kwargs)
            times.append(time.perf_counter() - started)
    return statistics.median(times)
