"""Every change speedup makes to the user's model, recorded so that it can be undone exactly.

On any error the model must be left as it was: same module objects, same parameter objects, same
values, same train/eval flags. So nothing is changed directly; every change goes through a
:class:`Transaction`, which remembers how to undo it.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from .masks import rows_times_rest, single_dimension

_MISSING = object()


class Transaction:
    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def savepoint(self) -> int:
        return len(self._undo)

    def rollback(self, savepoint: int = 0) -> None:
        """Undoes, newest first, every change made after ``savepoint``."""
        while len(self._undo) > savepoint:
            self._undo.pop()()

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

    def zero_masked(self, tensor: torch.Tensor, mask: torch.Tensor, structure: tuple = None) -> None:
        """Zeroes ``tensor`` where ``mask`` is False (as ``tensor * mask``), in place, undoably.

        In place, keeping only the zeroed slices for the undo where a mask varies along one
        dimension (whole rows or columns, the usual case) or is rows times a pattern every kept
        row shares (output and input channels of one layer). Any other mask keeps a copy of the
        whole tensor: gathering the zeroed elements one by one takes ten times as long as copying
        them all.
        """
        with torch.no_grad():
            dim, line = structure if structure is not None else single_dimension(mask)
            data = tensor.data
            if dim is None:
                factors = rows_times_rest(mask) if data.is_contiguous() else None
                if factors is not None:
                    self._zero_rows_and_rest(data, *(f.to(data.device) for f in factors))
                    return
                # Some entry goes: a mask that varies along no single dimension is not all ones.
                saved = data.clone()
                torch.where(mask.to(data.device), saved, torch.zeros((), dtype=data.dtype, device=data.device), out=data)
                self._undo.append(lambda: data.copy_(saved))
                return
            line = line.to(data.device)
            if bool(line.all()):
                return
            removed = (~line).nonzero().reshape(-1)
            saved = data.index_select(dim, removed)
            if dim == 0:
                data.index_fill_(0, removed, 0)
            else:
                shape = [1] * data.dim()
                shape[dim] = -1
                data.mul_(line.to(data.dtype).reshape(shape))
            self._undo.append(lambda: data.index_copy_(dim, removed, saved))

    def _zero_rows_and_rest(self, data: torch.Tensor, rows: torch.Tensor, rest: torch.Tensor) -> None:
        """Zeroes the removed rows, then the removed entries of the kept rows' shared pattern,
        keeping only those for the undo (a conv losing output and input channels)."""
        removed_rows = (~rows).nonzero().reshape(-1)
        flat = data.view(data.shape[0], -1)
        removed_rest = (~rest).nonzero().reshape(-1)
        saved_rows = flat.index_select(0, removed_rows)
        flat.index_fill_(0, removed_rows, 0)
        saved_rest = flat.index_select(1, removed_rest)
        flat.index_fill_(1, removed_rest, 0)

        def undo() -> None:
            flat.index_copy_(1, removed_rest, saved_rest)
            flat.index_copy_(0, removed_rows, saved_rows)

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
