"""Targets: what is pruned, cut into units that are scored and removed whole.

A :class:`Target` is one parameter of one selected module cut into :class:`Blocks`: a block size
per dimension. Output channels of a conv weight ``(O, I, kh, kw)`` are blocks ``(1, I, kh, kw)``
(``O`` units), its input channels ``(O, 1, kh, kw)``, a fine-grained target ``(1, 1, 1, 1)``, and a
block-sparse target any sizes that divide the dimensions. Conceptual units larger than one tensor
(an attention head spans q, k, v and the output projection; a channel spans a conv, its BatchNorm
and every layer reading it) come from the traced dependency groups, see :mod:`.allocation`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..errors import ConfigError
from .config import ConfigEntry, Selected
from ..plugins.pruning_registry import ChannelLayout, PruningRegistry


@dataclass(frozen=True)
class Blocks:
    """A block size per dimension of a parameter; units are the blocks, in row-major order."""

    sizes: tuple[int, ...]
    channel_dim: Optional[int] = None
    """Set when the blocks are whole slices along this one dimension (units are channels)."""

    def grid(self, shape: torch.Size) -> tuple[int, ...]:
        return tuple(n // b for n, b in zip(shape, self.sizes))

    def blockwise(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` as ``(units, entries per block)``: row ``u`` holds the entries of unit ``u``."""
        split = []
        for n, b in zip(tensor.shape, self.sizes):
            split += [n // b, b]
        blocks = tensor.reshape(split).permute(*range(0, 2 * tensor.dim(), 2), *range(1, 2 * tensor.dim(), 2))
        return blocks.reshape(math.prod(self.grid(tensor.shape)), -1)

    def expand(self, unit_values: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """A tensor of ``shape`` holding each unit's value on every entry of its block."""
        grid = unit_values.reshape(self.grid(shape))
        for d, b in enumerate(self.sizes):
            if b > 1:
                grid = grid.repeat_interleave(b, dim=d)
        return grid


def channel_blocks(shape: torch.Size, dim: int) -> Blocks:
    """Whole slices along ``dim``: one unit per channel."""
    return Blocks(tuple(1 if d == dim else n for d, n in enumerate(shape)), dim)


@dataclass
class Target:
    """One parameter of one selected module, cut into units."""

    module_name: str
    module: nn.Module
    parameter: str
    blocks: Blocks
    layout: Optional[ChannelLayout]
    entry: ConfigEntry
    heads_only: bool = False
    """Granularity ``head``: units must be attention heads of the traced dependency groups."""

    @property
    def name(self) -> str:
        return f"{self.module_name}.{self.parameter}" if self.module_name else self.parameter

    @property
    def tensor(self) -> torch.Tensor:
        return getattr(self.module, self.parameter)

    @property
    def units(self) -> int:
        return math.prod(self.blocks.grid(self.tensor.shape))

    @property
    def is_output_channels(self) -> bool:
        layout = self.layout
        return (layout is not None and self.parameter == layout.weight and layout.weight_out is not None
                and self.blocks.channel_dim == _dim(layout.weight_out, self.tensor))

    def followers(self) -> list[str]:
        """Parameters of the module that lose the same output channels (a bias), when it has them."""
        if not self.is_output_channels:
            return []
        size = self.tensor.shape[self.blocks.channel_dim]
        return [p for p in self.layout.parameters
                if isinstance(getattr(self.module, p, None), torch.Tensor) and getattr(self.module, p).dim() >= 1
                and getattr(self.module, p).shape[0] == size]


def targets_of(selected: Selected, registry: PruningRegistry) -> list[Target]:
    """The targets of one selected module under its entry's ``target_names`` and ``granularity``."""
    module, entry = selected.module, selected.entry
    layout = registry.layout(module)
    names = entry.target_names or ((layout.weight,) if layout is not None else ("weight",))
    targets = []
    for parameter in names:
        tensor = getattr(module, parameter, None)
        if not isinstance(tensor, torch.Tensor):
            raise ConfigError(f"{entry.where('target_names')}: module '{selected.name}' ({type(module).__name__}) has "
                              f"no tensor '{parameter}'")
        blocks, heads = _blocks(selected, parameter, tensor, layout, registry)
        targets.append(Target(selected.name, module, parameter, blocks, layout, entry, heads))
    return targets


def _blocks(selected: Selected, parameter: str, tensor: torch.Tensor, layout: Optional[ChannelLayout],
            registry: PruningRegistry) -> tuple[Blocks, bool]:
    entry = selected.entry
    granularity = entry.granularity
    if isinstance(granularity, tuple):
        if len(granularity) != tensor.dim():
            raise ConfigError(f"{entry.where('granularity')}: {len(granularity)} block sizes for "
                              f"'{selected.name}.{parameter}' of {tensor.dim()} dimensions {tuple(tensor.shape)}")
        sizes = tuple(n if b == -1 else b for n, b in zip(tensor.shape, granularity))
        if any(n % b for n, b in zip(tensor.shape, sizes)):
            raise ConfigError(f"{entry.where('granularity')}: blocks {sizes} do not divide '{selected.name}.{parameter}' "
                              f"of shape {tuple(tensor.shape)}")
        return Blocks(sizes), False
    try:
        granularity_fn = registry.granularity(granularity)
    except KeyError as exc:
        raise ConfigError(f"{entry.where('granularity')}: {exc.args[0]}") from None
    return granularity_fn(selected, parameter, tensor, layout), granularity == "head"


def _dim(dim: int, tensor: torch.Tensor) -> int:
    return dim % tensor.dim()


def _channel_granularity(side: str):
    """``out_channel`` / ``in_channel``: whole slices along the layout's weight dimension for that side."""

    def granularity(selected: Selected, parameter: str, tensor: torch.Tensor, layout: Optional[ChannelLayout]) -> Blocks:
        dim = None
        if layout is not None:
            dim = layout.weight_out if side == "out" else layout.weight_in
            if parameter != layout.weight and side == "out" and parameter in layout.parameters:
                dim = 0
            elif parameter != layout.weight:
                dim = None
        if dim is None:
            raise ConfigError(f"{selected.entry.where('granularity')}: '{side}_channel' is not defined for "
                              f"'{selected.name}.{parameter}' ({type(selected.module).__name__}): no channel layout is "
                              "registered for that parameter. Use block sizes, or register a layout "
                              "(registry.add_channels in a plugin).")
        return channel_blocks(tensor.shape, _dim(dim, tensor))

    return granularity


out_channel = _channel_granularity("out")
in_channel = _channel_granularity("in")


def head(selected: Selected, parameter: str, tensor: torch.Tensor, layout: Optional[ChannelLayout]) -> Blocks:
    """Output channels scored per attention head: the traced dependency groups say which rows form a head."""
    return out_channel(selected, parameter, tensor, layout)


def element(selected: Selected, parameter: str, tensor: torch.Tensor, layout: Optional[ChannelLayout]) -> Blocks:
    """Fine-grained: every entry is a unit (masks the speedup cannot remove unless whole rows line up)."""
    return Blocks((1,) * tensor.dim())
