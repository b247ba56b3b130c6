"""An example speedup plugin: rules for :class:`ScaledLinear`, found through the ``speedup`` entry points.

``pyproject.toml`` declares::

    [project.entry-points.speedup]
    example = "speedup_example"

speedup imports this module the first time it needs rules in a process and calls
:func:`speedup_register_rules` once.
"""

from __future__ import annotations

import speedup
from speedup.plugins.registry import RuleRegistry

from .modules import ScaledLinear
from .rule import ScaledLinearRule

__version__ = "0.1.0"

__all__ = ["ScaledLinear", "ScaledLinearRule", "speedup_register_rules"]


@speedup.hookimpl
def speedup_register_rules(registry: RuleRegistry) -> None:
    """Claims :class:`ScaledLinear` (exactly: the rule does not set ``subclasses``)."""
    registry.add_module(ScaledLinear, ScaledLinearRule())
