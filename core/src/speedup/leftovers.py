"""Masked slices the speedup kept: whole rows, columns or channels a mask zeroed that are still there.

A mask that zeroes a whole slice of a parameter (a conv's output channel, a linear layer's input
column) asks for it to go; the speedup keeps it only when something else still needs it (the other
branch of a residual add was not masked the same way, a barrier, a returned tensor). Counting them
tells a pruning algorithm whether its masks were consistent, without reading the module table.
"""

from __future__ import annotations

import torch
from torch import nn

from .boolean import any_along
from .masks import named_tensor


def masked_but_kept(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, dict[int, int]]:
    """``{parameter: {dim: slices}}``: per dimension, how many wholly masked slices are still in ``model``.

    A dimension counts ``size now - slices with a kept entry`` (never below 0), so a parameter the
    speedup shrank along it by every wholly masked slice counts nothing.
    """
    found: dict[str, dict[int, int]] = {}
    for name, mask in masks.items():
        now = named_tensor(model, name)
        if now is None or mask.dim() != now.dim():  # the speedup removed it entirely
            continue
        nonzero = mask.ne(0)
        for dim in range(mask.dim()):
            others = tuple(d for d in range(mask.dim()) if d != dim)
            kept = int((any_along(nonzero, others) if others else nonzero).sum())
            extra = now.shape[dim] - kept
            if extra > 0 and kept < mask.shape[dim]:
                found.setdefault(name, {})[dim] = extra
    return found
