"""Copying a module so that the copy can change without changing the original."""

from __future__ import annotations

from torch import nn


def clone_module(module: nn.Module) -> nn.Module:
    """A shallow copy that owns its parameter, buffer and submodule tables.

    Keeps the module's class, hooks and every attribute (``copy.copy`` alone would share the
    tables, and setting a parameter on the copy would change the original).
    """
    new = type(module).__new__(type(module))
    new.__dict__.update(module.__dict__)  # copy.copy's result, without its protocol nor Module.__setattr__
    new.__dict__.update(_parameters=dict(module._parameters), _buffers=dict(module._buffers),
                        _modules=dict(module._modules),
                        _non_persistent_buffers_set=set(module._non_persistent_buffers_set))
    return new
