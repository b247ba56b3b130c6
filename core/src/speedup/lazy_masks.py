"""Masked weights that stay as they are in the model while it is sped up.

Zeroing every masked weight in the model before tracing it takes, in fresh memory, a masked copy of
each or its zeroed entries saved for the undo: as much memory as the weights themselves, and on a
BERT-base encoder half the call in page faults. Instead, the weights (two or more dimensions) are
left alone:

* while the model is traced, each operator reading one gets a masked copy made for that call (see
  :func:`speedup.tracer.trace`), and its value in the graph carries the mask, so that its ``data``
  and ``host()`` are the masked model's values;
* the replacement masks the slices it takes (:func:`speedup.replacement.masked_entries`);
* what the model still holds in the end (a weight nothing could slice) is masked in it.

A weight is masked in the model at once where something may read it there: an operator writing it
in place, a module rule without :attr:`~speedup.rule.ModuleRule.lazy_masks` (written against the
module's attributes), a module the user's function replaces (which receives the masked module).
Vectors (biases, norms) are small and are always masked in the model up front.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from .graph import Graph
from .masks import Masks, MaskPattern
from .transaction import Transaction


class LazyMasks:
    """The masked weights of one speedup call that the model holds unmasked, and masking them for good."""

    def __init__(self, model: nn.Module, masks: Masks, tx: Transaction,
                 replaced_by_user: Optional[Callable[[nn.Module], bool]] = None):
        self._tx = tx
        names = {name for name, tensor in masks.masked.items() if tensor.dim() >= 2}
        if names and replaced_by_user is not None:
            for module_name, module in model.named_modules():
                if replaced_by_user(module):
                    prefix = f"{module_name}." if module_name else ""
                    names = {name for name in names if not name.startswith(prefix)}
        self.names = names
        self.by_id: dict[int, tuple[torch.Tensor, MaskPattern]] = {
            id(masks.masked[name]): (masks.masked[name], masks.pattern(name)) for name in names}
        """``id(tensor) -> (tensor, pattern)``, as :func:`speedup.tracer.trace` takes them."""
        self._masked_for_good: set[int] = set()

    def masked_forwards(self, model: nn.Module, module_rule: Callable) -> dict[int, Callable]:
        """``id(module) -> fn`` for the modules whose rules compute their masked output from their
        unmasked weights (:meth:`~speedup.rule.ModuleRule.masked_forward`), for the recording."""
        forwards: dict[int, Callable] = {}
        if not self.by_id:
            return forwards
        for module in model.modules():
            if not module._modules and not any(id(t) in self.by_id for t in module._parameters.values()):
                continue  # a leaf holding no masked weight: the usual case, decided without looking up a rule
            rule = module_rule(module)
            if rule is None or not rule.lazy_masks:
                continue
            masks = {name: self.by_id[id(t)][1] for name, t in module.named_parameters() if id(t) in self.by_id}
            fn = rule.masked_forward(module, masks) if masks else None
            if fn is not None:
                forwards[id(module)] = fn
        return forwards

    def mask_for_good(self, tensor: torch.Tensor, in_place: bool = False) -> None:
        """Masks one of the weights in the model (undoably): something reads it there (``in_place``:
        through a view, which must see the masked values)."""
        self._masked_for_good.add(id(tensor))
        self._tx.zero_masked(tensor, self.by_id[id(tensor)][1], in_place)

    def mask_where_modules_are_read(self, graph: Graph, module_rule: Callable) -> None:
        """Masks in the model the weights of modules whose rules may read the module's attributes."""
        for calls in graph.module_calls.values():
            rule = module_rule(calls[0].module)
            if rule is not None and not rule.lazy_masks:
                for value in calls[0].params.values():
                    value.mask_in_place(self.mask_for_good)

    def mask_what_remains(self, model: nn.Module) -> None:
        """Masks in the model the weights it still holds once rebuilt (those the replacement did not
        slice), so that they hold what the masked model holds."""
        remaining = [(t, p) for key, (t, p) in self.by_id.items() if key not in self._masked_for_good]
        if not remaining:
            return
        held = {id(t) for t in model.parameters()} | {id(t) for t in model.buffers()}
        for tensor, pattern in remaining:
            if id(tensor) in held:
                self._tx.zero_masked(tensor, pattern)
