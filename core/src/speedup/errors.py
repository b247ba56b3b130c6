"""Errors speedup raises. Each message says which module or mask, what was expected, what to do."""


class SpeedupError(Exception):
    """Base class: the model was left exactly as it was before the call."""


class RestoreError(RuntimeError):
    """Undoing speedup's changes after an error failed: unlike a :class:`SpeedupError`, the model may
    not be as it was (the error that stopped the call is chained to it)."""


class MaskError(SpeedupError, ValueError):
    """A mask names something the model does not have, or has the wrong shape or values."""


class TraceError(SpeedupError):
    """The model could not be run on the dummy input."""


class RuleError(SpeedupError):
    """A rule (core's or a plugin's) failed on a module that accepts its inputs: a bug in the rule."""


class VerificationError(SpeedupError):
    """The sped-up model did not compute what the masked model computes."""


class PluginConflictError(SpeedupError):
    """Two installed plugins claim the same module type or operator."""


class PluginLoadError(SpeedupError):
    """A plugin failed to load while plugins were loaded strictly."""


class ConfigError(SpeedupError, ValueError):
    """A pruning config list is malformed, or selects something the model cannot prune that way."""
