"""Models as handed in: torch.compile's wrapper is seen through; TorchScript, and lazy modules not
yet run, are refused.

``torch.compile(model)`` returns an ``OptimizedModule`` holding the model as ``_orig_mod``; running
the wrapper would compile the recording itself. Speedup changes the module it wraps, which the
wrapper compiles again for the new sizes on its next call (as after any change of the module). Masks
may name modules as either shows them (``_orig_mod.conv`` or ``conv``). A compiled block inside the
model (``model.layer1 = torch.compile(model.layer1)``) runs eagerly during the call and is changed
alike; masks may name its layers with or without the ``_orig_mod`` it adds to their names. A compiled
layer rebuilt smaller gets a wrapper of its own, with the old one's settings (a wrapper calls the very
module it was made for).

A TorchScript module (``torch.jit.script`` / ``torch.jit.trace``) runs compiled code whose sizes
speedup cannot change: it is refused with what to do (a scripted submodule is traced through, its
parameters sliced like any other). So is a model with lazy modules not yet run (``nn.LazyConv2d``):
their parameters have no sizes yet, and running the model to give them some would change it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from .errors import SpeedupError

COMPILED_ATTR = "_orig_mod"
"""The attribute under which ``torch.compile``'s wrapper holds the module it wraps (its modules' names
start with ``_orig_mod.``)."""


def compiled_inner(module: nn.Module) -> Optional[nn.Module]:
    """The module ``torch.compile``'s wrapper ``module`` wraps; None for any other module."""
    if type(module).__name__ != "OptimizedModule":
        return None
    inner = module._modules.get(COMPILED_ATTR)
    return inner if isinstance(inner, nn.Module) else None


def eager_model(model: nn.Module) -> nn.Module:
    """The module speedup changes for ``model``; raises for a model it cannot change (see above)."""
    if isinstance(model, torch.jit.ScriptModule):
        raise SpeedupError(
            f"the model is a TorchScript module ({type(model).__name__}), whose compiled code cannot change sizes; "
            "speed up the eager model, then script or trace the result."
        )
    inner = compiled_inner(model)
    if inner is not None:
        return eager_model(inner)
    for name, module in model.named_modules():
        if any(is_lazy(t) for t in (*module._parameters.values(), *module._buffers.values())):
            raise SpeedupError(
                f"'{name}' ({type(module).__name__}) has parameters of no size yet (a lazy module not run); run the "
                "model once on an input (model(dummy_input)) to give them their sizes, then speed it up."
            )
    return model
