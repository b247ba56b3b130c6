"""Modules put in an equivalent form that loses more, before a model is recorded.

A plugin registers the form of a module type with ``RuleRegistry.add_rewrite`` (ShuffleNet's block,
whose ``chunk`` and channel shuffle become gathers). Forms go in through the transaction, so a
failed speedup puts every module back; after a successful one, a module is put back wherever
nothing of its form's own parts changed: the user's model keeps its code where the form gained
nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from .plugins.registry import RuleRegistry
from .replacement import registered_places
from .transaction import Transaction


@dataclass
class Form:
    name: str
    module: nn.Module
    form: nn.Module
    places: list[tuple[nn.Module, str]]
    """Where the module is registered in the model: (parent, attribute)."""
    own_parts: list[nn.Module]
    """The form and its submodules that the module did not have (its gathers), as first put in."""


def put_equivalent_forms(model: nn.Module, registry: RuleRegistry, tx: Transaction,
                         as_it_is: Callable[[nn.Module], bool] = lambda module: False) -> list[Form]:
    """Puts each module that has a registered form in the model in that form (outermost first),
    but those ``as_it_is`` names (the user replaces them with their own function)."""
    if not registry.rewrites:
        return []
    forms: list[Form] = []
    places = registered_places(model)
    seen: set[int] = set()
    for name, module in model.named_modules():
        if module is model or id(module) in seen or any(name.startswith(f"{f.name}.") for f in forms):
            continue  # the model itself has no parent to hold its form
        seen.add(id(module))
        form = None if as_it_is(module) else registry.rewritten(module)
        if form is None or form is module:
            continue
        found = Form(name, module, form, places.get(id(module), []), _own_parts(module, form))
        for part in found.own_parts:  # the module's own submodules keep their flags
            part.training = module.training
        forms.append(found)
    for f in forms:
        for parent, attr in f.places:
            tx.set_attr(parent, attr, f.form)
    return forms


def put_back_unchanged(forms: list[Form], rebuilt: set[int], tx: Transaction) -> list[Form]:
    """Puts back the modules whose form's own parts were not rebuilt; returns the forms that stay."""
    kept = []
    for f in forms:
        if any(id(part) in rebuilt for part in f.own_parts):
            kept.append(f)
            continue
        for parent, attr in f.places:
            tx.set_attr(parent, attr, f.module)
    return kept


def _own_parts(module: nn.Module, form: nn.Module) -> list[nn.Module]:
    before = {id(m) for m in module.modules()}
    return [m for m in form.modules() if id(m) not in before]
