"""Scheduling: prune at once, or in steps with fine-tuning in between.

A :class:`Schedule` gives the fraction of the final sparsity reached after each step. One-shot is
one step; linear grows the sparsity evenly; AGP (automated gradual pruning, Zhu & Gupta 2017)
prunes fast first and slowly at the end: ``1 - (1 - k / steps)^3`` after step ``k``. Units removed
at one step stay removed at the next.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


class Schedule:
    """The fraction of the final sparsity reached after each step, increasing to 1."""

    def fractions(self) -> list[float]:
        raise NotImplementedError


class OneShot(Schedule):
    def fractions(self) -> list[float]:
        return [1.0]


class Linear(Schedule):
    def __init__(self, steps: int = 4):
        self.steps = _steps(steps)

    def fractions(self) -> list[float]:
        return [k / self.steps for k in range(1, self.steps + 1)]


class AGP(Schedule):
    def __init__(self, steps: int = 4):
        self.steps = _steps(steps)

    def fractions(self) -> list[float]:
        return [1.0 - (1.0 - k / self.steps) ** 3 for k in range(1, self.steps + 1)]


def _steps(steps: int) -> int:
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"a schedule needs a whole number of steps >= 1, got {steps!r}")
    return steps


@contextlib.contextmanager
def masks_applied(model: nn.Module, masks: dict[str, dict[str, torch.Tensor]]) -> Iterator[None]:
    """Multiplies the masked parameters by their masks, and again before every forward while inside.

    So fine-tuning trains the masked model: an optimizer step cannot bring a pruned entry back. On
    leaving, the hooks go; the parameters stay masked (the model *is* the masked model).
    """
    modules = dict(model.named_modules())
    handles = []

    def apply(module: nn.Module, *_) -> None:
        with torch.no_grad():
            for attr, mask in masks[names[id(module)]].items():
                tensor = getattr(module, attr)
                tensor.mul_(mask.to(tensor.device, tensor.dtype))

    names = {id(modules[name]): name for name in masks}
    for name in masks:
        apply(modules[name])
        handles.append(modules[name].register_forward_pre_hook(apply))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for name in masks:
            apply(modules[name])
