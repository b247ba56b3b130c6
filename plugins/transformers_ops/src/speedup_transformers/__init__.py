"""speedup rules for Hugging Face transformers layers, registered through the ``speedup`` entry points.

Types are registered by qualified name, so loading the plugin does not import transformers (which
takes about a second); the rule applies when a model contains such a module.
"""

from __future__ import annotations

from speedup import hookimpl
from speedup.plugins.registry import RuleRegistry

from .conv1d import Conv1DRule

__version__ = "0.1.0"


@hookimpl
def speedup_register_rules(registry: RuleRegistry) -> None:
    registry.add_module("transformers.pytorch_utils.Conv1D", Conv1DRule())
    # A key/value cache is returned only to be passed back in: it holds the heads that remain.
    registry.add_state("transformers.cache_utils.Cache")
