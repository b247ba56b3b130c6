"""Core's built-in rules for torch operators and modules: the ``torch`` plugin of ``speedup-core``.

Registered through the ``speedup`` entry-point group like any third-party plugin. One file per
family of operators; adding an operator touches one file.
"""

from __future__ import annotations

from ..plugins.hookspec import hookimpl
from ..plugins.registry import RuleRegistry
from ..pruning import builtin as pruning_builtins
from ..plugins.pruning_registry import PruningRegistry
from . import (activated_norms, activation, attention, bilinear, contraction, conv, elementwise, embedding, fourier,
               indexing, like, linear, norm, quantize, recurrent, reduction, response_norm, sequences, shape, spatial,
               written_norms)

_FAMILIES = (elementwise, shape, indexing, reduction, contraction, spatial, linear, bilinear, conv, norm, written_norms,
             activated_norms, response_norm, embedding, activation, attention, like, sequences, recurrent, fourier,
             quantize)


@hookimpl
def speedup_register_rules(registry: RuleRegistry) -> None:
    for family in _FAMILIES:
        family.register(registry)


@hookimpl
def speedup_register_pruning(registry: PruningRegistry) -> None:
    pruning_builtins.register(registry)
