"""Parametrized tensors (weight norm, spectral norm, any ``torch.nn.utils.parametrize``, the masks
of ``torch.nn.utils.prune``), frozen for the call.

A parametrized module computes its weight from other tensors at every access (weight norm:
``g * v / ||v||`` per row); a rule slicing the weight cannot slice what it is computed from and
stay exact (the norm of a row changes when its columns go). For inference only the computed tensor
matters, so before masks are read, each parametrized module is put in the model as the plain module
holding its computed tensors, computed in eval mode: what ``parametrize.remove_parametrizations(...,
leave_parametrized=True)`` or ``remove_weight_norm`` make, as deployment code does. Masks name the
tensors as the model shows them (``conv.weight``) and apply to the computed values.

After the speedup, a module of which nothing changed is put back with its parametrization; one that
lost entries stays plain, and the report says so. The old weight norm and spectral norm hooks
(``torch.nn.utils.weight_norm``: ``weight_g``, ``weight_v`` and a forward pre-hook;
``torch.nn.utils.spectral_norm``: ``weight_orig`` and the vectors ``weight_u``, ``weight_v``) are frozen alike.

A tensor pruned with ``torch.nn.utils.prune`` (``weight_orig``, ``weight_mask`` and a forward pre-hook
computing ``weight = weight_orig * weight_mask``) is frozen alike, and its mask joins the masks given
for the call (an entry either masks is masked): the pruning the model carries is what a user asks
speedup to make real. A layer that loses entries then holds its masked weight, as ``prune.remove``
leaves it.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.prune import BasePruningMethod
from torch.nn.utils.spectral_norm import SpectralNorm, SpectralNormLoadStateDictPreHook, SpectralNormStateDictHook
from torch.nn.utils.weight_norm import WeightNorm

from .cloning import clone_module
from .equivalent_forms import Form, put_back_unchanged
from .errors import SpeedupError
from .masks import Masks
from .replacement import registered_places
from .transaction import Transaction


@dataclass
class Twin:
    """A parametrized module's plain twin."""

    module: nn.Module
    names: list[str]
    """The tensors it holds as computed."""
    masks: dict[str, torch.Tensor]
    """Masks the module carried itself (``torch.nn.utils.prune``'s), by tensor name, as booleans."""
    how: str
    """How the module computed them ("through a parametrization"), for warnings."""
    undone_by: Optional[str]
    """What a user calls to make the same plain module, if anything."""


@dataclass
class Frozen:
    form: Form
    """The module (``form.module``) and its plain twin (``form.form``), where it is in the model."""
    twin: Twin
    tensors: dict[str, torch.Tensor]
    """The twin's own tensors as frozen: one replaced later means the twin changed."""
    sources_masked: bool = False
    """The call masked what the tensors are computed from: the module would compute them unmasked."""

    @classmethod
    def put_in(cls, name: str, module: nn.Module, twin: Twin, places: list, tx: Transaction,
               sources_masked: bool = False) -> "Frozen":
        """The module ``name`` replaced by its twin in the model (at ``places``, through ``tx``)."""
        for parent, attr in places:
            tx.set_attr(parent, attr, twin.module)
        return cls(Form(name, module, twin.module, places, [twin.module]), twin, _tensors(twin.module), sources_masked)


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
                f"the model itself ({type(module).__name__}) computes its tensors through a parametrization or "
                f"pruning hook; wrap it (nn.Sequential(model)) or call {twin.undone_by} first."
            )
        places = places if places is not None else registered_places(model)
        frozen.append(Frozen.put_in(name, module, twin, places.get(id(module), []), tx))
    return frozen


def put_back_unfrozen(frozen: list[Frozen], rebuilt: set[int], masks: Masks,
                      tx: Transaction) -> tuple[list[Form], list[str]]:
    """Puts back the parametrized modules of which nothing changed; returns the twins that stay
    (rebuilt, a tensor of theirs replaced, or masked: the parametrization would compute the masked
    entries again), with a warning for each."""
    changed = set(rebuilt)
    for f in frozen:
        tensors = _tensors(f.form.form)
        if f.sources_masked or any(f.tensors.get(name) is not tensor or masks.masks_any(f"{f.form.name}.{name}")
                                   for name, tensor in tensors.items()):
            changed.add(id(f.form.form))
    stay = put_back_unchanged([f.form for f in frozen], changed, tx)
    by_form = {id(f.form): f for f in frozen}
    alike: dict[tuple, list[Frozen]] = {}  # one warning for the modules frozen alike (every pruned conv)
    for form in stay:
        f = by_form[id(form)]
        kind = (tuple(f.twin.names), f.twin.how, type(f.twin.module).__name__, f.twin.undone_by)
        alike.setdefault(kind, []).append(f)
    return stay, [_stays_plain(group) for group in alike.values()]


_NAMED = 3
"""Modules a warning names before it counts the rest."""


def _stays_plain(group: list[Frozen]) -> str:
    twin = group[0].twin
    them = "it" if len(group) == 1 else "them"
    undone = f", as {twin.undone_by} leaves {them} for inference" if twin.undone_by else ""
    names = ", ".join(f"'{f.form.name}'" for f in group[:_NAMED])
    if len(group) > _NAMED:
        names += f" and {len(group) - _NAMED} more"
    kind = type(twin.module).__name__
    holds = f"its sped-up {kind} holds" if len(group) == 1 else f"their sped-up {kind}s hold"
    return f"{names} computed {', '.join(twin.names)} {twin.how}; {holds} the computed values instead{undone}"


def frozen_twin(module: nn.Module) -> Optional[Twin]:
    """The plain twin of a parametrized (or pruned) module, holding its computed tensors; None for a
    module without parametrization."""
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
        return Twin(twin, names, {}, "through a parametrization", "torch.nn.utils.parametrize.remove_parametrizations")
    hooks = [h for h in module._forward_pre_hooks.values()
             if isinstance(h, (WeightNorm, SpectralNorm, BasePruningMethod))]
    if not hooks:
        return None
    twin = clone_module(module)
    twin._forward_pre_hooks = OrderedDict((key, h) for key, h in module._forward_pre_hooks.items()
                                          if not any(h is hook for hook in hooks))
    # The spectral norm's hooks saving and loading its vectors would look for them in the twin.
    twin._state_dict_hooks = OrderedDict((key, h) for key, h in module._state_dict_hooks.items()
                                         if not isinstance(h, SpectralNormStateDictHook))
    twin._load_state_dict_pre_hooks = OrderedDict(
        (key, h) for key, h in module._load_state_dict_pre_hooks.items()
        if not isinstance(getattr(h, "hook", h), SpectralNormLoadStateDictPreHook))
    names, masks = [], {}
    how, undone_by = "through a weight norm hook", "torch.nn.utils.remove_weight_norm"
    with torch.no_grad():
        for hook in hooks:
            if isinstance(hook, WeightNorm):
                name, sources = hook.name, [f"{hook.name}_g", f"{hook.name}_v"]
                computed = hook.compute_weight(module)
            elif isinstance(hook, SpectralNorm):  # as in eval mode: no power iteration
                name, sources = hook.name, [f"{hook.name}_orig", f"{hook.name}_u", f"{hook.name}_v"]
                computed = hook.compute_weight(module, do_power_iteration=False)
                how, undone_by = "through a spectral norm hook", "torch.nn.utils.remove_spectral_norm"
            else:
                name, sources = hook._tensor_name, [f"{hook._tensor_name}_orig", f"{hook._tensor_name}_mask"]
                computed = hook.apply_mask(module)
                masks[name] = module._buffers[sources[1]] != 0
            original = module._parameters[sources[0]]
            for source in sources:
                twin._parameters.pop(source, None)
                twin._buffers.pop(source, None)
            twin.__dict__.pop(name, None)
            _put(twin, name, computed, True, original.requires_grad)
            names.append(name)
    if masks:
        return Twin(twin, names, masks, "through a pruning hook", "torch.nn.utils.prune.remove")
    return Twin(twin, names, masks, how, undone_by)


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
