"""The per-channel scale and shift of a norm written by hand, whatever the code calls them.

Research code names them ``weight``/``bias``, ``gamma``/``beta``, ``g``/``b``, ``scale``/``shift``...,
holds them as parameters or as buffers (a shift fixed at zero), as vectors ``(C,)`` or laid out to
broadcast (``(1, C, 1, 1)``, ``(C, 1, 1)``, ``(1, 1, C)``). Recognisers never read the names: they
run the module with random values in each role and keep the reading whose result is the norm's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from ..cloning import clone_module
from ..graph import Node, TensorValue
from .toolkit import param_data


@dataclass(frozen=True)
class NormVectors:
    """Which of a norm's tensors scales its channels and which shifts them (None: no shift), and the
    axis of those tensors that runs over the channels (the others have size one)."""

    scale: str = "weight"
    shift: Optional[str] = "bias"
    axis: int = 0

    def names(self) -> tuple[str, ...]:
        return (self.scale,) if self.shift is None else (self.scale, self.shift)

    def link(self, node: Node, link: Callable[[TensorValue, int], None]) -> None:
        """Calls ``link(tensor, axis)`` for each of the call's vectors the module holds."""
        for name in self.names():
            if name in node.params:
                link(node.params[name], self.axis)

    def values(self, node: Node) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """The scale and the shift of the call as vectors over the channels (None where absent)."""
        scale = param_data(node, self.scale)
        shift = param_data(node, self.shift) if self.shift is not None else None
        return (None if scale is None else scale.reshape(-1)), (None if shift is None else shift.reshape(-1))


TORCH_LAYOUT = NormVectors()
"""torch's norms: ``weight`` and ``bias``, vectors."""


def held_vectors(module: nn.Module) -> dict[str, torch.Tensor]:
    """A leaf's tensors (parameters and buffers, by name) where it holds one or two, floating, of one
    shape with a single axis of at least two entries; empty for any other module. Children that are
    ``nn.Identity`` leave it a leaf (timm's ``RmsNormAct2d`` without its activation)."""
    held = {name: t for name, t in list(module._parameters.items()) + list(module._buffers.items()) if t is not None}
    if not all(type(child) is nn.Identity for child in module._modules.values()) or not 1 <= len(held) <= 2:
        return {}
    shapes = {tuple(t.shape) for t in held.values()}
    shape = next(iter(shapes))
    if len(shapes) != 1 or sum(size != 1 for size in shape) != 1 or max(shape) < 2:
        return {}
    if not all(t.is_floating_point() for t in held.values()):
        return {}
    return held


def readings(module: nn.Module, shift: bool) -> list[NormVectors]:
    """Each way to read the vectors ``module`` holds as a scale, and a shift where ``shift`` allows one:
    one vector is a scale; two are a scale and a shift, either way round."""
    held = held_vectors(module)
    if not held:
        return []
    shape = next(iter(held.values())).shape
    axis = next(d for d, size in enumerate(shape) if size != 1)
    names = list(held)
    if len(names) == 1:
        return [NormVectors(names[0], None, axis)]
    if not shift:
        return []
    return [NormVectors(names[0], names[1], axis), NormVectors(names[1], names[0], axis)]


def run_with(module: nn.Module, vectors: dict[str, torch.Tensor], probe: torch.Tensor,
             attributes: Optional[dict] = None) -> Optional[torch.Tensor]:
    """The module's own ``forward`` on ``probe`` with ``vectors`` (by name, as channel vectors) in place
    of the tensors it holds and ``attributes`` set: on a copy, without hooks; None where it raises (a
    module this probe does not describe, or one that cannot run here: meta tensors) or returns
    something else than a tensor."""
    copy_, reference = clone_module(module), probe
    copy_.__dict__.update(attributes or {})
    for name, vector in vectors.items():
        reference = getattr(module, name)
        table = copy_._parameters if name in module._parameters else copy_._buffers
        table[name] = vector.reshape(reference.shape).to(reference)
    try:
        with torch.no_grad():
            result = type(module).forward(copy_, probe.to(reference))
    except Exception:  # noqa: BLE001 - see above
        return None
    return result if isinstance(result, torch.Tensor) else None


def probe_matches(result: Optional[torch.Tensor], expected: torch.Tensor, scale: float = 1.0) -> bool:
    """Whether a probe's result (None: the module did not take the probe) is the expected one, within
    the round-off of the dtype, on a probe of magnitude ``scale``."""
    tolerance = 1e-4 if expected.dtype in (torch.float32, torch.float64) else 2e-2
    return (result is not None and result.shape == expected.shape
            and bool(torch.allclose(result, expected, rtol=tolerance, atol=tolerance * scale)))
