"""Parametrized tensors (weight norm, spectral norm, any ``torch.nn.utils.parametrize``), frozen for the call.

A parametrized module computes its weight from other tensors at every access (weight norm:
``g * v / ||v||`` per row); a rule slicing the weight cannot slice what it is computed from and
stay exact (the norm of a row changes when its columns go). For inference only the computed tensor
matters, so before masks are read, each parametrized module is put in the model as the plain module
holding its computed tensors, computed in eval mode: what ``parametrize.remove_parametrizations(...,
leave_parametrized=True)`` or ``remove_weight_norm`` make, as deployment code does. Masks name the
tensors as the model shows them (``conv.weight``) and apply to the computed values.

After the speedup, a module of which nothing changed is put back with its parametrization; one that
lost entries stays plain, and the report says so. The old weight norm hook
(``torch.nn.utils.weight_norm``: ``weight_g``, ``weight_v`` and a forward pre-hook) is frozen alike.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.weight_norm import WeightNorm

from .cloning import clone_module
from .equivalent_forms import Form, put_back_unchanged
from .errors import SpeedupError
from .replacement import registered_places
from .transaction import Transaction


@dataclass
class Frozen:
    form: Form
    """The module (``form.module``) and its plain twin (``form.form``), where it is in the model."""
    names: list[str]
    """The tensors it computed through a parametrization."""
    tensors: dict[str, torch.Tensor]
    """The twin's own tensors as frozen: one replaced later means the twin changed."""


def freeze_parametrized(model: nn.Module, tx: Transaction) -> list[Frozen]:
    """Puts every parametrized module of ``model`` in it as its plain, frozen twin (through ``tx``)."""
    frozen: list[Frozen] = []
    places = None
    for name, module in model.named_modules():
        if any(name.startswith(f"{f.form.name}.") for f in frozen):
            continue  # the parametrizations themselves
        twin = frozen_twin(module)
        if twin is None:
            continue
        if module is model:
            raise SpeedupError(
                f"the model itself ({type(module).__name__}) computes its tensors through a parametrization; "
                "wrap it (nn.Sequential(model)) or call torch.nn.utils.parametrize.remove_parametrizations first."
            )
        places = places if places is not None else registered_places(model)
        plain, names = twin
        frozen.append(Frozen(Form(name, module, plain, places.get(id(module), []), [plain]), names, _tensors(plain)))
    for f in frozen:
        for parent, attr in f.form.places:
            tx.set_attr(parent, attr, f.form.form)
    return frozen


def put_back_unfrozen(frozen: list[Frozen], rebuilt: set[int], tx: Transaction) -> tuple[list[Form], list[str]]:
    """Puts back the parametrized modules of which nothing changed; returns the twins that stay
    (rebuilt, or a tensor of theirs replaced), with a warning for each."""
    changed = set(rebuilt)
    for f in frozen:
        if any(f.tensors.get(name) is not tensor for name, tensor in _tensors(f.form.form).items()):
            changed.add(id(f.form.form))
    stay = put_back_unchanged([f.form for f in frozen], changed, tx)
    names = {id(f.form): f.names for f in frozen}
    warnings = [f"'{f.name}' computed {', '.join(names[id(f)])} through a parametrization; its sped-up "
                f"{type(f.form).__name__} holds the computed values instead (as remove_parametrizations does for "
                "inference)" for f in stay]
    return stay, warnings


def frozen_twin(module: nn.Module) -> Optional[tuple[nn.Module, list[str]]]:
    """The plain twin of a parametrized module, holding its computed tensors, and their names; None
    for a module without parametrization."""
    if parametrize.is_parametrized(module):
        twin = clone_module(module)
        twin.__class__ = type(module).__bases__[0]  # parametrize derives a class from the module's own
        twin._modules.pop("parametrizations")
        names = list(module.parametrizations)
        with evaluated(module), torch.no_grad():
            for name in names:
                originals = module.parametrizations[name]  # ``original``, or ``original0``... (weight norm: g, v)
                original = getattr(originals, "original", None)
                original = original if original is not None else originals.original0
                _put(twin, name, getattr(module, name), isinstance(original, nn.Parameter), original.requires_grad)
        return twin, names
    hooks = [h for h in module._forward_pre_hooks.values() if isinstance(h, WeightNorm)]
    if not hooks:
        return None
    twin = clone_module(module)
    twin._forward_pre_hooks = OrderedDict((key, h) for key, h in module._forward_pre_hooks.items()
                                          if not isinstance(h, WeightNorm))
    with torch.no_grad():
        for hook in hooks:
            g = module._parameters[f"{hook.name}_g"]
            del twin._parameters[f"{hook.name}_g"], twin._parameters[f"{hook.name}_v"]
            twin.__dict__.pop(hook.name, None)
            _put(twin, hook.name, hook.compute_weight(module), True, g.requires_grad)
    return twin, [h.name for h in hooks]


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {**module._parameters, **module._buffers}


def _put(module: nn.Module, name: str, value: torch.Tensor, parameter: bool, requires_grad: bool) -> None:
    value = value.detach().clone()
    if parameter:
        module._parameters[name] = nn.Parameter(value, requires_grad=requires_grad)
    else:
        module._buffers[name] = value


@contextlib.contextmanager
def evaluated(module: nn.Module) -> Iterator[None]:
    """Eval mode while the tensors are computed: spectral norm's power iteration would otherwise
    update its vectors in place (the user's model must stay as it was)."""
    flags = [(m, m.training) for m in module.modules()]
    for m, _ in flags:
        m.training = False
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag
