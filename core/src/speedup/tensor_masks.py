"""Masks on module inputs and outputs (NNI 3.0's ``_input_*`` / ``_output_*`` targets).

The masked model multiplies the targeted tensor by its mask. That multiplication is installed as a
forward hook whose mask lives in a :class:`TensorMaskHolder` buffer, so that the tracer records it
as an ordinary ``mul`` by a sliceable tensor: the analysis sees the zeros, and the replacement
slices the mask with the channels around it. The sped-up model keeps the hook only where the
sliced mask still holds a zero (entries that could not be removed must stay zero).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from .errors import MaskError
from .masks import TensorMask
from .transaction import Transaction


class TensorMaskHolder(nn.Module):
    """Holds one input/output mask as a buffer (so it moves with ``.to()`` and can be sliced)."""

    def __init__(self, mask: torch.Tensor, target: str, module_name: str, batch_dim: int = 0):
        super().__init__()
        self.register_buffer("mask", mask)
        self.target = target
        self.module_name = module_name
        self.batch_dim = batch_dim

    def apply(self, tensor: Any) -> Any:
        if not isinstance(tensor, torch.Tensor):
            raise MaskError(
                f"the mask '{self.target}' of '{self.module_name}' targets a {type(tensor).__name__}, not a tensor."
            )
        mask = self.mask
        with _unrecorded():
            per_sample = self._varies_per_sample(mask, tensor)
            fits = _broadcasts_to(mask.shape, tensor.shape)
        if per_sample is True:
            raise MaskError(
                f"the mask '{self.target}' of '{self.module_name}' differs between samples along the batch dimension "
                f"{self.batch_dim}; structured speedup needs the same mask for every sample. Give it size 1 there."
            )
        if per_sample is False:
            mask = mask.narrow(self.batch_dim, 0, 1)  # the same for every sample: one copy broadcasts
            with _unrecorded():
                fits = _broadcasts_to(mask.shape, tensor.shape)
        if not fits:
            raise MaskError(
                f"the mask '{self.target}' of '{self.module_name}' has shape {tuple(self.mask.shape)}, which does not "
                f"broadcast to that tensor's shape {tuple(tensor.shape)}. A mask has the tensor's shape, or fewer "
                "dimensions lined up from the right, or size 1 where it is the same for all entries."
            )
        return tensor * mask.to(device=tensor.device, dtype=tensor.dtype)

    def _varies_per_sample(self, mask: torch.Tensor, tensor: torch.Tensor):
        """``None`` if the mask has no batch dimension of its own, else whether it differs along it."""
        b = self.batch_dim
        if mask.dim() != tensor.dim() or mask.dim() <= b or mask.shape[b] == 1 or mask.shape[b] != tensor.shape[b]:
            return None
        return not bool((mask == mask.narrow(b, 0, 1)).all())


def _broadcasts_to(shape: torch.Size, target: torch.Size) -> bool:
    try:
        return torch.broadcast_shapes(shape, target) == target
    except RuntimeError:
        return False


def _unrecorded():
    """Checks on a mask must not appear in the recorded graph (they would pin its channels)."""
    from torch.utils._python_dispatch import _disable_current_modes

    return _disable_current_modes()


def install(model: nn.Module, masks: list[TensorMask], tx: Transaction) -> list[tuple[str, TensorMaskHolder]]:
    """Hooks every input/output mask into the model; returns the holders with their qualified names."""
    modules = dict(model.named_modules())
    holders = []
    for spec in masks:
        module = modules[spec.module]
        holder = TensorMaskHolder(spec.mask, spec.target, spec.module, spec.batch_dim)
        if spec.kind == "input":
            handle = module.register_forward_pre_hook(_InputMask(holder, spec.key), with_kwargs=True)
        else:
            handle = module.register_forward_hook(_OutputMask(holder, spec.key))
        tx.on_rollback(handle.remove)
        holder.handle = handle
        name = f"{spec.module}.{spec.target}" if spec.module else spec.target
        holders.append((name, holder))
    return holders


class _InputMask:
    """Forward pre-hook: ``_input_<i>`` masks positional input ``i``; ``_input_<name>`` the argument
    ``name`` of ``forward``, whether it was passed by position or by keyword. A plain object of this
    module, so that a model keeping it still pickles."""

    def __init__(self, holder: TensorMaskHolder, key):
        self.holder, self.key = holder, key

    def __call__(self, module, args, kwargs):
        holder, key = self.holder, self.key
        position = key if isinstance(key, int) else _position_of(module, key)
        if position is not None and position < len(args):
            args = args[:position] + (holder.apply(args[position]),) + args[position + 1:]
        elif isinstance(key, str) and key in kwargs:
            kwargs = dict(kwargs, **{key: holder.apply(kwargs[key])})
        else:
            raise MaskError(f"'{holder.module_name}' was not called with input '{key}' for the mask '{holder.target}' "
                            f"(it got {len(args)} positional and {sorted(kwargs)} keyword arguments).")
        return args, kwargs


def _position_of(module: nn.Module, name: str):
    """The position of argument ``name`` in ``module.forward``, if it can be passed positionally."""
    try:
        parameters = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    for position, parameter in enumerate(parameters):
        if parameter.name == name:
            positional = parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD)
            return position if positional else None
    return None


class _OutputMask:
    """Forward hook: ``_output_<i>`` masks output ``i`` (a tensor, an entry of a tuple or a dict)."""

    def __init__(self, holder: TensorMaskHolder, key):
        self.holder, self.key = holder, key

    def __call__(self, module, args, output):
        holder, key = self.holder, self.key
        if isinstance(output, torch.Tensor) and key == 0:
            return holder.apply(output)
        if isinstance(output, tuple) and isinstance(key, int) and key < len(output):
            return output[:key] + (holder.apply(output[key]),) + output[key + 1:]
        if isinstance(output, dict) and key in output:
            output[key] = holder.apply(output[key])
            return output
        raise MaskError(f"'{holder.module_name}' has no output '{key}' for the mask '{holder.target}'.")


def drop_all_ones(holders: list[tuple[str, TensorMaskHolder]], tx: Transaction) -> None:
    """After the speedup, a mask left with no zero does nothing: remove its hook."""
    for _, holder in holders:
        if bool(holder.mask.all()):
            holder.handle.remove()
