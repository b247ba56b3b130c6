"""Constant channels of what a model returns: removed inside the model, put back after it.

A returned tensor keeps its shape, since callers index it. Channels of it that hold a constant (a
hidden stream whose channels were masked everywhere is zero there; a masked output layer gives its
bias) need not be computed, though: the analysis lets them go inside the model like any other
constant channel, and :class:`PutBackConstants`, a forward hook on the model, writes the constants
back into the returned tensors. T5 returns its encoder's hidden state next to the logits: without
this, its hidden size could not shrink at all.

A constant entry that stays (one entry of a dimension that lost all the others is kept so the model
stays valid; an entry tied to a needed one elsewhere) was not demanded either: what the sped-up
model computes there may not be the constant, so the hook writes the constant there too.

The hook is a plain object of this module, so a sped-up model still pickles and deep-copies. It
finds the tensors by their path in the return value (a key of a ``ModelOutput``, an index of a
tuple); a return value that lacks a path (another output option was set) is left as it is there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from .graph import Graph, TensorValue
from .rule import DimConst
from .transaction import Transaction


@dataclass
class DimensionRestore:
    """One dimension of a returned tensor: where its kept entries go, and the constants to write."""

    dim: int
    size: int
    kept: torch.Tensor
    constant: torch.Tensor
    """Entries written with their constant: every removed one, and kept ones nothing demanded."""
    values: torch.Tensor
    """float64, one per constant entry."""

    def fits(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` has the kept entries along the dimension (``squeeze()`` may have dropped it)."""
        return tensor.ndim > self.dim and tensor.shape[self.dim] == self.kept.numel()

    def apply(self, tensor: torch.Tensor) -> torch.Tensor:
        shape = list(tensor.shape)
        if self.kept.numel() == self.size:
            full = tensor.clone()  # the model's own tensor is not written to
        else:
            shape[self.dim] = self.size
            full = tensor.new_empty(shape)
            full.index_copy_(self.dim, self.kept.to(tensor.device), tensor)
        view = [1] * tensor.ndim
        view[self.dim] = -1
        shape[self.dim] = self.constant.numel()
        constants = self.values.to(device=tensor.device, dtype=tensor.dtype).view(view).expand(shape)
        return full.index_copy_(self.dim, self.constant.to(tensor.device), constants)


class PutBackConstants:
    """Forward hook: the returned tensors at ``restores``' paths get their removed constant channels back.

    A tensor without the planned entries is not this model's return value there (another output
    option was set) and is left as it is; ``unfit`` notes it, for the verification, where the dummy
    input must give the planned shapes."""

    def __init__(self, restores: list[tuple[tuple, list[DimensionRestore]]]):
        self.restores = restores
        self.unfit = False

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        for path, dims in self.restores:
            tensor = value_at(output, path)
            if isinstance(tensor, torch.Tensor):
                if not all(dim.fits(tensor) for dim in dims):
                    self.unfit = True
                    continue
                for dim in dims:
                    tensor = dim.apply(tensor)
                output = with_value_at(output, path, tensor)
        return output


def put_back_constants(model: nn.Module, graph: Graph, tx: Transaction) -> Optional[PutBackConstants]:
    """Registers the hook where a returned tensor lost entries (undone on rollback); returns it."""
    restores = []
    for path, value in graph.output_paths:
        dims = [restore for restore in (_restore(value, d) for d in range(value.ndim)) if restore is not None]
        if dims:
            restores.append((path, dims))
    if not restores:
        return None
    hook = PutBackConstants(restores)
    tx.on_rollback(model.register_forward_hook(hook).remove)
    return hook


def _restore(value: TensorValue, d: int) -> Optional[DimensionRestore]:
    """What dimension ``d`` of a returned value needs written back, if anything."""
    removed = _removed(value, d)
    if removed.any():
        # The analysis lets a returned entry go only where it is constant (see Analysis._returned_demand).
        consts = value.consts[d] if value.consts else None
        assert isinstance(consts, DimConst) and bool(consts.mask[removed].all()), "a returned entry went that varies"
    return dimension_restore(value, d, removed)


def dimension_restore(value: TensorValue, d: int, removed: Optional[torch.Tensor] = None) -> Optional[DimensionRestore]:
    """What dimension ``d`` of a value needs written back to hold every entry the masked model has
    there: its removed entries (``removed``, found if not given), and the constant ones nothing
    demanded (what was computed there may not be the constant); ``None`` where nothing. A removed
    entry that is not constant gets zero."""
    size = value.shape[d]
    removed = _removed(value, d) if removed is None else removed
    consts = value.consts[d] if value.consts else None
    constant, values = removed, torch.zeros(size, dtype=torch.float64)
    if isinstance(consts, DimConst):
        demanded = value.demanded_entries(d)
        constant = removed | (consts.mask if demanded is None else consts.mask & ~demanded)
        values = consts.value
    if not constant.any():
        return None
    return DimensionRestore(d, size, (~removed).nonzero().flatten(), constant.nonzero().flatten(),
                            values[constant].clone())


def _removed(value: TensorValue, d: int) -> torch.Tensor:
    """Boolean per entry of dimension ``d``: the entry went."""
    removed = torch.zeros(value.shape[d], dtype=torch.bool)
    if value.kept and value.kept[d] is not None:
        removed.fill_(True)
        removed[value.kept[d]] = False
    return removed


def value_at(obj: Any, path: tuple) -> Any:
    """The entry at ``path`` in ``obj``, ``None`` where there is none."""
    for kind, key in path:
        try:
            obj = obj[key] if kind == "item" else getattr(obj, key)
        except (KeyError, IndexError, AttributeError, TypeError):
            return None
    return obj


def with_value_at(obj: Any, path: tuple, new: Any) -> Any:
    """``obj`` with the entry at ``path`` replaced by ``new``: containers changed in place, tuples rebuilt."""
    if not path:
        return new
    (kind, key), rest = path[0], path[1:]
    child = with_value_at(obj[key] if kind == "item" else getattr(obj, key), rest, new)
    if kind == "attr":
        setattr(obj, key, child)
    elif isinstance(obj, tuple):
        items = list(obj)
        items[key] = child
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    else:
        obj[key] = child
    return obj
