"""Every change speedup makes to the user's model, recorded so that it can be undone exactly.

On any error the model must be left as it was: same module objects, same parameter objects, same
values, same train/eval flags. So nothing is changed directly; every change goes through a
:class:`Transaction`, which remembers how to undo it.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from .errors import RestoreError
from .masks import MaskPattern

_MISSING = object()


class Transaction:
    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def savepoint(self) -> int:
        return len(self._undo)

    def rollback(self, savepoint: int = 0) -> None:
        """Undoes, newest first, every change made after ``savepoint``; one that fails does not stop
        the others, and a :class:`RestoreError` then says so (after the error that made the call stop)."""
        failures = []
        while len(self._undo) > savepoint:
            try:
                self._undo.pop()()
            except Exception as failure:  # noqa: BLE001 - undo the rest, then report it
                failures.append(failure)
        if failures:
            first = failures[0]
            raise RestoreError(
                f"speedup could not undo {len(failures)} of its changes to the model ({type(first).__name__}: "
                f"{first}); the model may not be as it was. Please report this with the model's code."
            ) from first

    def set_attr(self, obj: Any, name: str, value: Any) -> None:
        """``setattr`` that also works for ``nn.Module`` parameters, buffers and submodules."""
        previous = _lookup(obj, name)
        setattr(obj, name, value)

        def undo() -> None:
            if previous is _MISSING:
                delattr(obj, name)
            else:
                _restore(obj, name, previous)

        self._undo.append(undo)

    def set_data(self, tensor: torch.Tensor, data: torch.Tensor) -> None:
        """Swaps a parameter's or buffer's data, keeping the tensor object (optimizers hold it)."""
        previous = tensor.data
        tensor.data = data
        self._undo.append(lambda: setattr(tensor, "data", previous))

    def zero_masked(self, tensor: torch.Tensor, pattern: MaskPattern, in_place: bool = False) -> None:
        """Zeroes ``tensor`` where its mask (``pattern.mask``) is False, undoably; ``in_place``: in its
        own memory, which views of it share (the whole tensor kept for the undo).

        Whole rows of a weight (dimension 0, the usual case) are zeroed in place, keeping only those
        rows for the undo. Any other mask writes the masked tensor into new storage that the parameter then
        holds (:meth:`set_data`): one pass over the tensor, an undo that costs nothing, and no
        strided gathers (saving the zeroed columns of a large weight takes several times as long
        as multiplying it once).
        """
        data = tensor.data
        if pattern.dim is not None and bool(pattern.line.all()):
            return
        if in_place:
            self.keep_values(tensor)
            data.copy_(pattern.apply(data))
            return
        if pattern.dim != 0 or data.dim() == 1:  # a vector: a masked copy takes fewer operations
            self.set_data(tensor, pattern.apply(data))
            return
        removed = (~pattern.line.to(data.device)).nonzero().reshape(-1)
        saved = data.index_select(0, removed)
        data.index_fill_(0, removed, 0)
        self._undo.append(lambda: data.index_copy_(0, removed, saved))

    def keep_values(self, tensor: torch.Tensor) -> None:
        """Keeps a copy of ``tensor``'s values, written back on rollback: something is about to write
        into its memory (the model itself, renormalising an embedding's rows in place)."""
        saved = tensor.detach().clone()

        def undo() -> None:
            if tensor.shape == saved.shape:
                tensor.data.copy_(saved)
            else:  # resized in place (a quantization observer's statistics, sized on the first call)
                tensor.data = saved

        self._undo.append(undo)

    def keep_attributes(self, model: nn.Module) -> None:
        """Restores on rollback the plain attributes of every module of ``model`` (what its ``forward``
        writes there while it is run: a call counter, a cache held as an attribute), adding back those
        it removed and removing those it added. Nothing else tracks them."""
        saved = [(module, {k: v for k, v in module.__dict__.items() if not k.startswith("_")})
                 for module in model.modules()]

        def undo() -> None:
            for module, attributes in saved:
                for name in [k for k in module.__dict__ if not k.startswith("_") and k not in attributes]:
                    del module.__dict__[name]
                module.__dict__.update(attributes)

        self._undo.append(undo)

    def keep_modules(self, module: nn.Module) -> None:
        """Restores on rollback ``module`` and its submodules as they are now: their attributes, their
        tables of parameters, buffers and submodules, and which data each tensor holds (code outside
        speedup, a user's replacement function, may change any of them in place)."""
        saved = []
        for part in module.modules():
            tables = [part.__dict__[name] for name in ("_parameters", "_buffers", "_modules")]
            tensors = [(t, t.data) for t in list(part._parameters.values()) + list(part._buffers.values())
                       if t is not None]
            saved.append((part, dict(part.__dict__), [(table, dict(table)) for table in tables], tensors))

        def undo() -> None:
            for part, attributes, tables, tensors in saved:
                part.__dict__.clear()
                part.__dict__.update(attributes)
                for table, entries in tables:
                    table.clear()
                    table.update(entries)
                for tensor, data in tensors:
                    tensor.data = data

        self._undo.append(undo)

    def set_training(self, model: nn.Module, mode: bool) -> None:
        flags = [(m, m.training) for m in model.modules()]
        model.train(mode)

        def undo() -> None:
            for module, flag in flags:
                module.training = flag

        self._undo.append(undo)

    def on_rollback(self, undo: Callable[[], None]) -> None:
        """Any other change, made by the caller: ``undo`` runs on rollback."""
        self._undo.append(undo)


def _lookup(obj: Any, name: str) -> Any:
    if isinstance(obj, nn.Module):
        for table in (obj._parameters, obj._buffers, obj._modules):
            if name in table:
                return table[name]
    if name in getattr(obj, "__dict__", {}):
        return obj.__dict__[name]
    return getattr(obj, name, _MISSING)  # a property or mapped name (a config's aliases): restored by setattr


def _restore(obj: Any, name: str, previous: Any) -> None:
    if isinstance(obj, nn.Module):
        for table in (obj._parameters, obj._buffers, obj._modules):
            if name in table:
                table[name] = previous
                return
        if isinstance(previous, nn.Module):
            obj._modules[name] = previous
            return
    setattr(obj, name, previous)
