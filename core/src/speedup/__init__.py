"""speedup: turn a masked (simulated-pruned) PyTorch model into a really smaller and faster one.

>>> from speedup import ModelSpeedup
>>> ModelSpeedup(model, dummy_input, masks).speedup_model()

or, with a report of what changed:

>>> report = speedup.shrink(model, masks, dummy_input)
>>> speedup.fold_batchnorm(model, dummy_input)   # optional, for inference
"""

from .batchnorm_folding import fold_batchnorm
from .compat import ModelSpeedup
from .engine import SpeedupWarning, shrink
from .errors import (MaskError, PluginConflictError, PluginLoadError, RestoreError, RuleError, SpeedupError,
                     TraceError, VerificationError)
from .plugins.hookspec import hookimpl
from .report import ShrinkReport
from .rule import DimConst, ModuleRule, OpRule, Rule

__version__ = "0.1.0"

__all__ = [
    "ModelSpeedup",
    "shrink",
    "fold_batchnorm",
    "ShrinkReport",
    "SpeedupWarning",
    "SpeedupError",
    "MaskError",
    "TraceError",
    "VerificationError",
    "RuleError",
    "PluginConflictError",
    "PluginLoadError",
    "RestoreError",
    "hookimpl",
    "Rule",
    "OpRule",
    "ModuleRule",
    "DimConst",
]
