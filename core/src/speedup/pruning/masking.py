"""From allocated units to masks in NNI's layout ``{module: {parameter: 0/1 tensor}}``.

Masks are boolean (``True`` = kept): a quarter of the memory of float masks, and what the speedup
reads fastest; ``mask.float()`` gives NNI's float masks, and ``weight * mask`` works either way.

A removed unit of a single target zeroes its block (and, for output channels, the same entries of
the module's bias). A removed channel of a traced dependency group zeroes every parameter slice
tied to it: the conv's rows, its bias, the BatchNorm after it, the columns of every layer reading it,
so that the channel is exactly zero everywhere and the speedup can remove all of it. Parameters of
modules the config list excludes are left unmasked. ``align`` entries then copy masks across.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..errors import ConfigError
from .allocation import Candidate
from .config import Selected
from .targets import Target

Masks = dict[str, dict[str, torch.Tensor]]


def build_masks(candidates: list[Candidate], removed: dict[str, torch.Tensor], excluded: set[str],
                model: nn.Module) -> Masks:
    masks: Masks = {}
    for candidate in candidates:
        gone = removed[candidate.key]
        if not bool(gone.any()):
            continue
        if candidate.group is not None:
            _mask_group(masks, candidate, gone, excluded, model)
            continue
        for target in candidate.targets:
            _mask_target(masks, target, gone)
    return masks


def align_masks(masks: Masks, aligned: list[Selected], model: nn.Module) -> None:
    """Each aligned module takes the kept slices of another module's mask along the given dims."""
    for selected in aligned:
        align, entry = selected.entry.align, selected.entry
        source = masks.get(align.module_name, {}).get(align.target_name)
        if source is None:
            raise ConfigError(f"{entry.where('align')}: '{align.module_name}.{align.target_name}' has no mask to align "
                              f"'{selected.name}' with (is it selected by an earlier entry, with a ratio above 0?)")
        for name in entry.target_names or _default_names(selected.module):
            tensor = getattr(selected.module, name, None)
            if not isinstance(tensor, torch.Tensor):
                raise ConfigError(f"{entry.where('target_names')}: '{selected.name}' has no tensor '{name}'")
            for dim in align.dims:
                if dim >= tensor.dim() or dim >= source.dim() or tensor.shape[dim] != source.shape[dim]:
                    raise ConfigError(f"{entry.where('align')}: dimension {dim} of '{selected.name}.{name}' "
                                      f"{tuple(tensor.shape)} does not match '{align.module_name}.{align.target_name}' "
                                      f"{tuple(source.shape)}")
                _and(masks, selected.name, name, tensor, _along(_slices_kept(source, dim), dim, tensor))


def _default_names(module: nn.Module) -> list[str]:
    return [n for n in ("weight", "bias") if isinstance(getattr(module, n, None), torch.Tensor)]


def _mask_target(masks: Masks, target: Target, gone: torch.Tensor) -> None:
    tensor = target.tensor
    keep = target.blocks.expand(~gone, tensor.shape)
    _and(masks, target.module_name, target.parameter, tensor, keep)
    dim = target.blocks.channel_dim
    channels = _slices_kept(keep, dim) if dim is not None else None
    for follower in target.followers():
        other = getattr(target.module, follower)
        _and(masks, target.module_name, follower, other, _along(channels, 0, other))


def _mask_group(masks: Masks, candidate: Candidate, gone: torch.Tensor, excluded: set[str], model: nn.Module) -> None:
    members = torch.nonzero(gone).flatten()
    for member in candidate.group.members:
        module_name, _, attr = member.parameter.rpartition(".")
        if module_name in excluded:
            continue
        tensor = model.get_parameter(member.parameter)
        _and(masks, module_name, attr, tensor, _along(~member.removed_by(members), member.dim, tensor))


def _slices_kept(mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Boolean per index of ``dim``: whether the mask keeps anything of that slice."""
    return mask.ne(0).movedim(dim, 0).reshape(mask.shape[dim], -1).any(1)


def _along(kept: Optional[torch.Tensor], dim: int, tensor: torch.Tensor) -> torch.Tensor:
    shape = [1] * tensor.dim()
    shape[dim] = -1
    return kept.reshape(shape).expand(tensor.shape)


def _and(masks: Masks, module: str, attr: str, tensor: torch.Tensor, keep: torch.Tensor) -> None:
    entry = masks.setdefault(module, {})
    keep = keep.bool()
    entry[attr] = entry[attr] & keep if attr in entry else keep.contiguous()
