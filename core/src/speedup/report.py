"""What a speedup did: removed channels per module, sizes before and after, barriers, timings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional


@dataclass(frozen=True)
class Barrier:
    """An operator no rule covers: nothing was removed across it."""

    op: str
    scope: str
    location: str

    def __str__(self) -> str:
        where = f" at {self.location}" if self.location else ""
        return f"{self.op} in '{self.scope or '<model>'}'{where}"


@dataclass
class ShrinkReport:
    """Returned by :func:`speedup.shrink` (and kept as ``ModelSpeedup.report``)."""

    modules: dict[str, tuple[str, dict[str, tuple[tuple, tuple]]]] = field(default_factory=dict)
    """Rebuilt module name -> (type, {parameter: (shape before, shape after)})."""
    parameters: dict[str, tuple[tuple, tuple]] = field(default_factory=dict)
    """Parameters read directly by operators that were sliced: name -> (shape before, shape after)."""
    attributes: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    """Size attributes that plugins keep in step: ``"module.attribute"`` -> (before, after)."""
    forms: dict[str, tuple[str, str]] = field(default_factory=dict)
    """Modules left in the equivalent form a plugin gives their type, which lost more than they
    could have: name -> (type, type of the form); see ``RuleRegistry.add_rewrite``."""
    params_before: int = 0
    params_after: int = 0
    flops_before: int = 0
    """FLOPs of the masked model on the dummy input (counted while it was recorded)."""
    barriers: list[Barrier] = field(default_factory=list)
    kept_for_verification: list[str] = field(default_factory=list)
    """Operators whose code did not adapt to smaller tensors; their dimensions were kept."""
    refilled: list[str] = field(default_factory=list)
    """Modules kept whole whose inputs get back the channels they lost, or whose outputs are cut to
    those the model keeps (see :mod:`speedup.refill`)."""
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    max_abs_diff: float = 0.0
    """Largest difference between the sped-up and the masked model's outputs on the dummy input."""
    count_flops_after: Optional[Callable[[], int]] = field(default=None, repr=False)
    _flops_after: Optional[int] = field(default=None, repr=False)
    find_masked_but_kept: Optional[Callable[[], dict]] = field(default=None, repr=False)
    _masked_but_kept: Optional[dict] = field(default=None, repr=False)

    @property
    def masked_but_kept(self) -> dict[str, dict[int, int]]:
        """Wholly masked slices still in the model: ``{parameter: {dim: how many}}``; empty when every
        channel, row or column a mask zeroed was removed (see :mod:`speedup.leftovers`). Found on
        first access."""
        if self._masked_but_kept is None and self.find_masked_but_kept is not None:
            self._masked_but_kept = self.find_masked_but_kept()
            self.find_masked_but_kept = None
        return self._masked_but_kept or {}

    @property
    def flops_after(self) -> int:
        """FLOPs of the sped-up model on the dummy input.

        Counted on first access (one forward pass under a FLOP counter, then cached), so that a
        speedup whose FLOPs nobody reads does not pay for counting them.
        """
        if self._flops_after is None and self.count_flops_after is not None:
            self._flops_after = self.count_flops_after()
            self.count_flops_after = None
        return self._flops_after or 0

    @property
    def param_ratio(self) -> float:
        return self.params_after / self.params_before if self.params_before else 1.0

    @property
    def flops_ratio(self) -> float:
        return self.flops_after / self.flops_before if self.flops_before else 1.0

    def summary(self) -> str:
        lines = [
            f"parameters {self.params_before:,} -> {self.params_after:,} ({self.param_ratio:.1%})",
            f"FLOPs      {self.flops_before:,} -> {self.flops_after:,} ({self.flops_ratio:.1%})",
            f"modules rebuilt {len(self.modules)}, parameters sliced {len(self.parameters)}, "
            f"max output difference {self.max_abs_diff:.2e}",
            "time " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in self.timings.items()),
        ]
        if self.barriers:
            lines.append(f"barriers ({len(self.barriers)}): " + "; ".join(str(b) for b in self.barriers[:5])
                         + (" ..." if len(self.barriers) > 5 else ""))
        if self.kept_for_verification:
            lines.append("kept after verification: " + "; ".join(self.kept_for_verification[:5]))
        if self.refilled:
            lines.append(f"kept whole, inputs refilled ({len(self.refilled)}): " + ", ".join(self.refilled[:8])
                         + (" ..." if len(self.refilled) > 8 else ""))
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def table(self) -> str:
        """One line per rebuilt module with its parameter shapes before and after."""
        rows = []
        for name, (kind, shapes) in self.modules.items():
            change = ", ".join(f"{p} {tuple(a)}->{tuple(b)}" for p, (a, b) in shapes.items())
            rows.append(f"{name:40s} {kind:24s} {change}")
        for name, (a, b) in self.parameters.items():
            rows.append(f"{name:40s} {'(parameter)':24s} {tuple(a)}->{tuple(b)}")
        for name, (a, b) in self.attributes.items():
            rows.append(f"{name:40s} {'(attribute)':24s} {a!r}->{b!r}")
        for name, (kind, form) in self.forms.items():
            rows.append(f"{name:40s} {'(equivalent form)':24s} {kind} -> {form}")
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.summary()
