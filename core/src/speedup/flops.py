"""Counting FLOPs while the tracer runs, cheaply.

torch's ``flop_registry`` formulas go through pytree for every call; the operators that dominate
(convolutions and matrix products) are counted here directly from shapes, with the same formulas
(two FLOPs per multiply-accumulate), and the registry covers the rest.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

aten = torch.ops.aten


def convolution(positions: int, weight: torch.Tensor) -> int:
    """FLOPs of a convolution whose weight meets the input at ``positions`` places (samples times
    output positions; input positions for a transposed one)."""
    return 2 * positions * math.prod(weight.shape)


def _conv(args: tuple, out: Any) -> int:
    x, weight, transposed = args[0], args[1], bool(args[6])
    spatial = (x.shape if transposed else out.shape)[2:]
    return convolution(x.shape[0] * math.prod(spatial), weight)


def _mm(args: tuple, out: Any) -> int:
    a, b = args[-2], args[-1]
    return 2 * math.prod(a.shape) * b.shape[-1]


_FAST = {
    aten.convolution: _conv,
    aten.mm: lambda args, out: _mm(args, out),
    aten.addmm: lambda args, out: _mm(args[1:3], out),
    aten.bmm: lambda args, out: _mm(args, out),
    aten.baddbmm: lambda args, out: _mm(args[1:3], out),
}


def count(func: Any, args: tuple, kwargs: dict, out: Any) -> int:
    packet = func.overloadpacket
    fast = _FAST.get(packet)
    if fast is not None and len(args) >= 2:
        try:
            return int(fast(args, out))
        except (AttributeError, IndexError, TypeError):
            pass
    formula = flop_registry.get(packet)
    return int(formula(*args, **kwargs, out_val=out)) if formula is not None else 0


def counted(func: Any) -> bool:
    packet = getattr(func, "overloadpacket", None)
    return packet in _FAST or packet in flop_registry


class FlopCounter(TorchDispatchMode):
    """Counts FLOPs of whatever runs under it, and nothing else (for the verification pass)."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False  # never compiled; see speedup.tracer._Recorder

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if counted(func):
            self.total += count(func, args, kwargs, out)
        return out
