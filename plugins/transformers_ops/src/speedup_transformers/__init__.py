"""speedup rules for Hugging Face transformers layers, registered through the ``speedup`` entry points."""

from __future__ import annotations

from speedup import hookimpl
from speedup.plugins.registry import RuleRegistry

from .conv1d import Conv1DRule

__version__ = "0.1.0"


@hookimpl
def speedup_register_rules(registry: RuleRegistry) -> None:
    from transformers.pytorch_utils import Conv1D

    registry.add_module(Conv1D, Conv1DRule())
