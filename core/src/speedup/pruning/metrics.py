"""Metrics: which units of a target matter least. Lower scores are pruned first.

Weight metrics read the parameter only: L1 and L2 norms of each unit, FPGM (the units nearest the
geometric median of all units, which the others can stand in for), the BatchNorm scaling factor
(network slimming) and random. Data metrics need :class:`Calibration` batches: APoZ and mean
activation look at each output channel after a ReLU, Taylor's first-order score accumulates
``(weight * gradient)^2`` over the batches' losses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from ..engine import split_inputs
from ..errors import ConfigError
from .targets import Target


@dataclass
class Calibration:
    """Batches a data metric runs the model on.

    ``inputs``: model inputs, each a tensor, a tuple of positional inputs or a dict of keyword inputs.
    ``labels``: one per batch, handed to ``loss`` (Taylor only). ``loss(output, label) -> scalar``.
    """

    inputs: Iterable[Any]
    labels: Optional[Iterable[Any]] = None
    loss: Optional[Callable[[Any, Any], torch.Tensor]] = None

    def batches(self) -> Iterable[tuple[Any, Any]]:
        inputs = list(self.inputs)
        labels = list(self.labels) if self.labels is not None else [None] * len(inputs)
        if len(labels) != len(inputs):
            raise ConfigError(f"calibration has {len(inputs)} input batches but {len(labels)} labels")
        if not inputs:
            raise ConfigError("calibration has no input batches")
        return zip(inputs, labels)


class Metric:
    """Scores every unit of a target; the allocation removes the lowest first.

    A metric that needs data overrides :meth:`calibrate`, which sees every target before any is
    scored. :meth:`score` returns a float tensor with one score per unit, in the target's unit order.
    """

    name = "metric"

    def calibrate(self, model: nn.Module, targets: list[Target], calibration: Optional[Calibration]) -> None:
        """Collects what :meth:`score` needs; weight metrics need nothing."""

    def score(self, target: Target) -> torch.Tensor:
        raise NotImplementedError


class Norm(Metric):
    """The ``p``-norm of each unit's entries (L1: ``p=1``, L2: ``p=2``)."""

    def __init__(self, p: float = 1.0):
        self.p = p
        self.name = f"l{p:g}"

    def score(self, target: Target) -> torch.Tensor:
        units = target.blocks.blockwise(target.tensor.detach().float())
        return torch.linalg.vector_norm(units, ord=self.p, dim=1)


class GeometricMedian(Metric):
    """FPGM: the sum of distances from each unit to all others; the most replaceable units score lowest."""

    name = "fpgm"

    def score(self, target: Target) -> torch.Tensor:
        units = target.blocks.blockwise(target.tensor.detach().float())
        return torch.cdist(units[None], units[None])[0].sum(1)


class ScalingFactor(Metric):
    """Network slimming: the absolute BatchNorm (or other norm) scale of each channel."""

    name = "slim"

    def score(self, target: Target) -> torch.Tensor:
        module = target.module
        if not isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)) or target.parameter != "weight":
            raise ConfigError(f"{target.entry.where()}: the slim metric scores the scale ('weight') of normalization "
                              f"layers, but '{target.name}' is a {type(module).__name__}. Select the BatchNorm layers "
                              "(op_types ['BatchNorm2d']); dependency groups then prune their convs too.")
        return target.blocks.blockwise(target.tensor.detach().float().abs()).sum(1)


class Random(Metric):
    """Uniform random scores from a seeded generator (a baseline)."""

    name = "random"

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    def score(self, target: Target) -> torch.Tensor:
        return torch.rand(target.units, generator=self.generator)


class Activation(Metric):
    """Statistics of each output channel after a ReLU, over calibration batches.

    ``apoz``: the score is ``1 - APoZ`` (average percentage of zeros): channels that are mostly zero
    go first. ``mean``: the mean activation: channels that are weakest on average go first.
    """

    def __init__(self, statistic: str = "apoz", activation: Callable[[torch.Tensor], torch.Tensor] = torch.relu):
        if statistic not in ("apoz", "mean"):
            raise ValueError(f"statistic must be 'apoz' or 'mean', got {statistic!r}")
        self.statistic = statistic
        self.name = "apoz" if statistic == "apoz" else "mean_activation"
        self.activation = activation
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}

    def calibrate(self, model: nn.Module, targets: list[Target], calibration: Optional[Calibration]) -> None:
        if calibration is None:
            raise ConfigError(f"the {self.name} metric needs calibration batches: prune(..., "
                              "calibration=Calibration(inputs=[batch, ...]))")
        self._sums, self._counts = {}, {}  # each schedule step looks at the model as it is now
        handles, observed = [], set()
        for target in targets:
            if not target.is_output_channels:
                raise ConfigError(f"{target.entry.where('granularity')}: {self.name} scores output channels; "
                                  f"'{target.name}' is not pruned by output channel")
            if target.module_name not in observed:
                observed.add(target.module_name)
                handles.append(target.module.register_forward_hook(self._observer(target)))
        try:
            with torch.no_grad():
                for inputs, _ in calibration.batches():
                    args, kwargs = split_inputs(inputs)
                    model(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()

    def _observer(self, target: Target):
        name, dim = target.module_name, target.layout.output

        def observe(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            activation = self.activation(output.detach().float()).movedim(dim, 0).reshape(output.shape[dim], -1)
            value = (activation == 0).sum(1).float() if self.statistic == "apoz" else activation.sum(1)
            self._sums[name] = self._sums.get(name, 0) + value
            self._counts[name] = self._counts.get(name, 0) + activation.shape[1]

        return observe

    def score(self, target: Target) -> torch.Tensor:
        if target.module_name not in self._sums:
            raise ConfigError(f"'{target.module_name}' did not run on the calibration batches, so {self.name} has no "
                              "statistics for it")
        average = self._sums[target.module_name] / self._counts[target.module_name]
        return 1.0 - average if self.statistic == "apoz" else average


class Taylor(Metric):
    """First-order Taylor importance: ``sum over batches of (weight * gradient)^2``, summed per unit.

    It estimates how much the loss changes when the unit is set to zero (Molchanov et al., 2019).
    The model runs forward and backward on each calibration batch with ``calibration.loss``; the
    parameters' ``.grad`` are restored afterwards.
    """

    name = "taylor"

    def __init__(self) -> None:
        self._scores: dict[str, torch.Tensor] = {}

    def calibrate(self, model: nn.Module, targets: list[Target], calibration: Optional[Calibration]) -> None:
        if calibration is None or calibration.loss is None:
            raise ConfigError("the taylor metric needs calibration batches and a loss: prune(..., calibration="
                              "Calibration(inputs=[...], labels=[...], loss=lambda output, label: ...))")
        tensors = {t.name: t.tensor for t in targets}
        for name, tensor in tensors.items():
            if not tensor.requires_grad:
                raise ConfigError(f"the taylor metric needs gradients of '{name}', which does not require grad")
        self._scores = {}  # each schedule step looks at the model as it is now
        saved = {name: tensor.grad for name, tensor in tensors.items()}
        try:
            for inputs, label in calibration.batches():
                for tensor in tensors.values():
                    tensor.grad = None
                args, kwargs = split_inputs(inputs)
                calibration.loss(model(*args, **kwargs), label).backward()
                for name, tensor in tensors.items():
                    if tensor.grad is None:
                        raise ConfigError(f"the loss does not depend on '{name}', so taylor cannot score it")
                    contribution = (tensor.detach() * tensor.grad).float().pow(2)
                    self._scores[name] = self._scores.get(name, 0) + contribution
        finally:
            for name, tensor in tensors.items():
                tensor.grad = saved[name]

    def score(self, target: Target) -> torch.Tensor:
        return target.blocks.blockwise(self._scores[target.name]).sum(1)
