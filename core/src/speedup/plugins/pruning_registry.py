"""The table of pruning pieces that plugins fill: metrics, granularities, schedules, channel layouts.

Filled through the ``speedup_register_pruning`` hook (see :mod:`speedup.plugins.hookspec`), exactly
like operator rules: core registers its built-ins as the ``torch`` plugin, an installed plugin may
replace a built-in, and two plugins claiming one name is a conflict reported when the name is used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

from torch import nn

from ..errors import PluginConflictError
from .registry import CORE_DISTRIBUTION, Provider, claim, module_key, nearest


@dataclass(frozen=True)
class ChannelLayout:
    """Where a module type keeps its channels: what ``out_channel`` / ``in_channel`` mean for it.

    ``weight_out`` / ``weight_in``: the dimension of the weight (``weight``, the parameter scored by
    default) indexed by output / input channel
    (``None``: the module has no such notion); ``output``: the channel dimension of the module's
    output, counted from the end when negative (activation metrics read it there).
    ``parameters`` are those sliced along with ``weight``'s output channels (a bias, a norm's shift),
    each along its dimension 0.
    """

    weight_out: Optional[int]
    weight_in: Optional[int]
    output: int
    weight: str = "weight"
    parameters: tuple[str, ...] = ("bias",)


MetricFactory = Callable[..., Any]
"""``factory(**options) -> Metric`` (see :class:`speedup.pruning.metrics.Metric`)."""
Granularity = Callable[[Any, str, Any, Optional[ChannelLayout]], Any]
"""``fn(selected, parameter_name, tensor, layout) -> Blocks`` (see :mod:`speedup.pruning.targets`)."""
ScheduleFactory = Callable[..., Any]
"""``factory(**options) -> Schedule`` (see :mod:`speedup.pruning.scheduling`)."""


@dataclass
class PruningRegistry:
    """Pruning pieces by name (metrics, granularities, schedules) and channel layouts by module type."""

    metrics: dict[str, Any] = field(default_factory=dict)
    granularities: dict[str, Any] = field(default_factory=dict)
    schedules: dict[str, Any] = field(default_factory=dict)
    channels: dict[str, Any] = field(default_factory=dict)
    conflicts: dict[Any, tuple[Provider, Provider]] = field(default_factory=dict)
    provider: Provider = Provider(CORE_DISTRIBUTION, "")

    TABLES = {"metrics": "metric", "granularities": "granularity", "schedules": "schedule", "channels": "channels"}
    """Table attribute -> the word ``speedup plugins`` lists its entries under."""

    def add_metric(self, name: str, factory: MetricFactory) -> None:
        """A metric (which units matter least) under ``name``, as ``prune(..., metric=name)`` uses it."""
        self._add(self.metrics, name, factory)

    def add_granularity(self, name: str, granularity: Granularity) -> None:
        """A granularity (how a parameter is cut into units) under the config key ``granularity``."""
        self._add(self.granularities, name, granularity)

    def add_schedule(self, name: str, factory: ScheduleFactory) -> None:
        """A schedule (the sparsity of each step of iterative pruning) under ``name``."""
        self._add(self.schedules, name, factory)

    def add_channels(self, module_type: Union[type, str], layout: ChannelLayout) -> None:
        """Where ``module_type`` (and its subclasses) keeps input and output channels."""
        if not isinstance(layout, ChannelLayout):
            raise TypeError(f"the channel layout of {module_type!r} must be a ChannelLayout, got {layout!r}")
        key = module_key(module_type, "add_channels")
        claim(self.channels, key, layout, self.provider, self.conflicts)

    def _add(self, table: dict, name: str, value: Any) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"pruning pieces are registered under a non-empty name, got {name!r}")
        if not callable(value):
            raise TypeError(f"'{name}' must be registered with a callable, got {value!r}")
        claim(table, name, value, self.provider, self.conflicts)

    # -- lookup -----------------------------------------------------------------------------

    def metric(self, name: str) -> MetricFactory:
        return self._named(self.metrics, name, "metric")

    def granularity(self, name: str) -> Granularity:
        return self._named(self.granularities, name, "granularity")

    def schedule(self, name: str) -> ScheduleFactory:
        return self._named(self.schedules, name, "schedule")

    def layout(self, module: nn.Module) -> Optional[ChannelLayout]:
        """The channel layout of ``module``'s type or its nearest registered base; ``None`` if unknown."""
        return nearest(self.channels, type(module), self.conflicts, self._conflict)

    def _named(self, table: dict, name: str, kind: str) -> Any:
        if name in self.conflicts and name in table:
            raise PluginConflictError(self._conflict(name))
        entry = table.get(name)
        if entry is None:
            known = ", ".join(sorted(table)) or "none"
            raise KeyError(f"no {kind} named '{name}' is installed (known: {known}). A plugin registers one "
                           f"with registry.add_{kind}(name, ...) in its speedup_register_pruning hook.")
        return entry.rule

    def _conflict(self, key: str) -> str:
        first, second = self.conflicts[key]
        return f"both {first} and {second} register '{key}' for pruning. Uninstall one of them."
