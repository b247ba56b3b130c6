"""torchvision's Swin attention (``ShiftedWindowAttention``, ``ShiftedWindowAttentionV2``, and the video
models' ``ShiftedWindowAttention3d``).

Each attention module is recorded as one node: inside it, torchvision pads, rolls and partitions
windows with operators that cannot shrink on their own, and it derives ``head_dim`` from the input
width (``C // num_heads``), which is wrong as soon as heads or features go. The rule removes
whole heads (their rows of ``qkv``, columns of ``proj``, column of the position bias table and, in
V2, entry of ``logit_scale`` and row of the last ``cpb_mlp`` layer), input features (columns of
``qkv``) and output features (rows of ``proj``) independently, and rebuilds the module as a
:class:`PrunedShiftedWindowAttention` (or its V2 and 3D kinds) that keeps ``num_heads`` and ``head_dim``
explicit.

As for ``nn.MultiheadAttention``, a head whose value rows are all masked outputs its value bias at
every token (softmax rows sum to one), so it goes and its contribution is folded into
``proj.bias``. Unlike there, an input feature holding a non-zero constant is kept: windows are
padded with zero tokens, which hold zero in every feature, so the constant's contribution is not
the same at every token and cannot become a bias.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from speedup.graph import Node, TensorValue
from speedup.plugins.registry import RuleRegistry
from speedup.propagation import Analysis
from speedup.replacement import ModulePlan
from speedup.rule import ModuleRule
from speedup.rules.heads import Heads
from speedup.rules.toolkit import NonzeroPattern, added_to_bias, clone_module, first_input, foldable

_SWIN = "torchvision.models.swin_transformer"


class PrunedShiftedWindowAttention(nn.Module):
    """Swin (V1) window attention after whole heads, input or output features were removed.

    Computes what ``torchvision``'s ``ShiftedWindowAttention`` computes for the remaining heads:
    the input is padded to whole windows, cyclically shifted (with a mask keeping tokens of
    different regions apart), split into windows, attended with a relative position bias and
    projected back, then un-shifted and cropped. ``head_dim`` is stored rather than derived from
    the input width, since input width, output width and ``num_heads * head_dim`` now differ.
    """

    def __init__(self, qkv: nn.Linear, proj: nn.Linear, num_heads: int, head_dim: int, window_size: list[int],
                 shift_size: list[int], attention_dropout: float, dropout: float,
                 relative_position_index: torch.Tensor, relative_position_bias_table: Optional[nn.Parameter] = None):
        super().__init__()
        self.qkv, self.proj = qkv, proj
        self.num_heads, self.head_dim = num_heads, head_dim
        self.window_size, self.shift_size = list(window_size), list(shift_size)
        self.attention_dropout, self.dropout = attention_dropout, dropout
        self.register_buffer("relative_position_index", relative_position_index)
        if relative_position_bias_table is not None:
            self.relative_position_bias_table = relative_position_bias_table

    def position_bias(self) -> torch.Tensor:
        """``(1, heads, tokens, tokens)``: the bias each head adds to its attention logits."""
        return self._by_token_pair(self.relative_position_bias_table)

    def _by_token_pair(self, table: torch.Tensor) -> torch.Tensor:
        """Looks a ``(relative positions, heads)`` table up for every pair of tokens of a window."""
        return _per_head(table[self.relative_position_index], self.window_size[0] * self.window_size[1])

    def qkv_bias(self) -> Optional[torch.Tensor]:
        return self.qkv.bias

    def logits(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Scaled dot products of queries and keys, per head."""
        return (q * self.head_dim ** -0.5) @ k.transpose(-2, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[1:3]
        x = F.pad(x, _padding_to_windows([height, width], self.window_size))
        # A window as large as the (padded) map covers all of it: shifting would only wrap it around.
        shift = [s if w < n else 0 for s, w, n in zip(self.shift_size, self.window_size, x.shape[1:3])]
        out = self._attend_in_windows(x, self.window_size, shift, self.position_bias())
        return out[:, :height, :width, :].contiguous()

    def _attend_in_windows(self, x: torch.Tensor, window: list[int], shift: list[int],
                           position_bias: torch.Tensor) -> torch.Tensor:
        """Attention within the windows of ``x`` (``(batch, *map, features)``, the map a whole number of
        windows), cyclically shifted by ``shift`` first and back after."""
        axes = tuple(range(1, x.dim() - 1))
        if sum(shift) > 0:
            x = torch.roll(x, shifts=tuple(-s for s in shift), dims=axes)
        windows, grid = _partition(x, window)
        count, tokens = windows.shape[0], windows.shape[1]

        qkv = F.linear(windows, self.qkv.weight, self.qkv_bias())
        q, k, v = qkv.reshape(count, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        attention = self.logits(q, k) + position_bias
        if sum(shift) > 0:
            mask = _region_mask(list(x.shape[1:-1]), window, shift, x)
            attention = attention.view(x.shape[0], mask.shape[0], self.num_heads, tokens, tokens) + mask[None, :, None]
            attention = attention.view(count, self.num_heads, tokens, tokens)
        attention = F.dropout(F.softmax(attention, dim=-1), p=self.attention_dropout, training=self.training)
        out = (attention @ v).transpose(1, 2).reshape(count, tokens, self.num_heads * self.head_dim)
        out = F.dropout(self.proj(out), p=self.dropout, training=self.training)

        out = _merged(out, x.shape[0], grid, window)
        if sum(shift) > 0:
            out = torch.roll(out, shifts=tuple(shift), dims=axes)
        return out


class PrunedShiftedWindowAttentionV2(PrunedShiftedWindowAttention):
    """Swin V2 window attention after heads or features were removed: cosine attention with a
    per-head learned temperature, and a position bias produced by a small MLP (``cpb_mlp``)."""

    def __init__(self, qkv: nn.Linear, proj: nn.Linear, num_heads: int, head_dim: int, window_size: list[int],
                 shift_size: list[int], attention_dropout: float, dropout: float,
                 relative_position_index: torch.Tensor, logit_scale: nn.Parameter, cpb_mlp: nn.Sequential,
                 relative_coords_table: torch.Tensor):
        super().__init__(qkv, proj, num_heads, head_dim, window_size, shift_size, attention_dropout, dropout,
                         relative_position_index)
        self.logit_scale = logit_scale
        self.cpb_mlp = cpb_mlp
        self.register_buffer("relative_coords_table", relative_coords_table)

    def position_bias(self) -> torch.Tensor:
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        return 16 * torch.sigmoid(self._by_token_pair(table))

    def qkv_bias(self) -> Optional[torch.Tensor]:
        """The ``qkv`` bias with its key part zeroed, as torchvision does on every call (V2 has no key bias)."""
        bias = self.qkv.bias
        if bias is None:
            return None
        length = bias.numel() // 3
        return torch.cat([bias[:length], bias.new_zeros(length), bias[2 * length:]])

    def logits(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        cosine = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        return cosine * torch.clamp(self.logit_scale, max=math.log(100.0)).exp()


class PrunedShiftedWindowAttention3d(PrunedShiftedWindowAttention):
    """Video Swin window attention (over time, height and width) after heads or features were removed.

    As torchvision's ``ShiftedWindowAttention3d``: along an axis no longer than its window, the window
    is the whole axis and does not shift, and the position bias is read from the top-left corner of
    the full window's index table."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sizes = list(x.shape[1:4])
        window = [min(w, n) for w, n in zip(self.window_size, sizes)]
        shift = [s if w < n else 0 for s, w, n in zip(self.shift_size, self.window_size, sizes)]
        x = F.pad(x, _padding_to_windows(sizes, window))
        out = self._attend_in_windows(x, window, shift, self.position_bias_within(window))
        return out[:, :sizes[0], :sizes[1], :sizes[2], :].contiguous()

    def position_bias_within(self, window: list[int]) -> torch.Tensor:
        tokens = math.prod(window)
        return _per_head(self.relative_position_bias_table[self.relative_position_index[:tokens, :tokens].flatten()],
                         tokens)


def _per_head(looked_up: torch.Tensor, tokens: int) -> torch.Tensor:
    """``(1, heads, tokens, tokens)`` from a bias looked up for every pair of tokens, ``(pairs, heads)``."""
    return looked_up.view(tokens, tokens, -1).permute(2, 0, 1).contiguous().unsqueeze(0)


def _padding_to_windows(sizes: list[int], window: list[int]) -> list[int]:
    """``F.pad``'s argument padding the map axes of a ``(batch, *map, features)`` tensor at their ends to
    whole windows (the features not at all)."""
    padding = [0, 0]
    for size, length in zip(reversed(sizes), reversed(window)):
        padding += [0, (-size) % length]
    return padding


def _partition(x: torch.Tensor, window: list[int]) -> tuple[torch.Tensor, list[int]]:
    """``(batch * windows, tokens per window, features)``: the windows of ``x`` (``(batch, *map,
    features)``, the map a whole number of windows), in row-major order; and the windows per axis."""
    grid = [size // length for size, length in zip(x.shape[1:-1], window)]
    axes = len(window)
    split = x.view([x.shape[0]] + [n for pair in zip(grid, window) for n in pair] + [x.shape[-1]])
    order = [0] + [1 + 2 * i for i in range(axes)] + [2 + 2 * i for i in range(axes)] + [2 * axes + 1]
    return split.permute(order).reshape(x.shape[0] * math.prod(grid), math.prod(window), x.shape[-1]), grid


def _merged(windows: torch.Tensor, batch: int, grid: list[int], window: list[int]) -> torch.Tensor:
    """The map the windows of :func:`_partition` came from: ``(batch, *map, features)``."""
    axes = len(window)
    split = windows.view([batch] + list(grid) + list(window) + [-1])
    order = [0] + [n for i in range(axes) for n in (1 + i, 1 + axes + i)] + [2 * axes + 1]
    return split.permute(order).reshape([batch] + [g * w for g, w in zip(grid, window)] + [-1])


def _region_mask(sizes: list[int], window_size: list[int], shift: list[int], like: torch.Tensor) -> torch.Tensor:
    """``(windows, tokens, tokens)``: -100 between tokens that the cyclic shift brought together from
    different regions of the map, 0 elsewhere.

    Along each axis the shifted map has three regions, ``[0, -window)``, ``[-window, -shift)`` and
    ``[-shift, end)``, assigned in that order (a later region wins where they overlap, and with no
    shift the last one is the whole axis); a token's region is the tuple of its axes' regions.
    """
    label = torch.zeros(sizes, dtype=torch.long, device=like.device)
    for axis, (size, window, offset) in enumerate(zip(sizes, window_size, shift)):
        region = torch.zeros(size, dtype=torch.long, device=like.device)
        for index, (start, stop) in enumerate(((0, -window), (-window, -offset), (-offset, None))):
            region[start:stop] = index
        label = label * 3 + region.view([-1] + [1] * (len(sizes) - 1 - axis))
    label, _ = _partition(label[None, ..., None], window_size)
    label = label.squeeze(-1)
    apart = label[:, None, :] != label[:, :, None]
    return torch.zeros(apart.shape, dtype=like.dtype, device=like.device).masked_fill(apart, -100.0)


class _Layout:
    """Where everything of one Swin attention call lives."""

    def __init__(self, node: Node):
        self.module = node.module
        self.x, self.out = first_input(node), node.outputs[0]
        self.params = node.params
        self.heads = self.module.num_heads
        self.inner = self.params["qkv.weight"].shape[0] // 3
        self.head_dim = self.inner // self.heads
        self.cosine = "logit_scale" in self.params
        self.view = Heads.fused(self.params, "qkv", "proj", self.heads, self.head_dim)

    def per_head(self) -> list[tuple[TensorValue, int]]:
        """Parameters with one entry per head along one dimension."""
        names = (("relative_position_bias_table", 1), ("logit_scale", 0), ("cpb_mlp.2.weight", 0))
        return [(self.params[name], dim) for name, dim in names if name in self.params]


class ShiftedWindowAttentionRule(ModuleRule):
    """Heads, input features and output features of Swin window attention (V1 and V2)."""

    lazy_masks = True  # reads parameters through the node's values and the plan only

    def couple(self, node: Node, ctx: Analysis) -> None:
        layout = _Layout(node)
        params = layout.params
        heads = layout.view.couple_fused(ctx, layout.x, layout.out)
        for value, dim in layout.per_head():
            ctx.tie(ctx.atoms(value, dim), heads)
        if layout.cosine:  # the hidden units of cpb_mlp
            ctx.link(params["cpb_mlp.0.weight"], 0, params["cpb_mlp.2.weight"], 1)
            ctx.link(params["cpb_mlp.0.bias"], 0, params["cpb_mlp.0.weight"], 0)
        for d in range(layout.x.ndim - 1):  # batch and the map's axes
            ctx.link(layout.x, d, layout.out, d)

    def forward(self, node: Node, ctx: Analysis) -> None:
        layout = _Layout(node)
        layout.view.forward(ctx, layout.out)

    def backward(self, node: Node, ctx: Analysis) -> None:
        layout = _Layout(node)
        if not ctx.is_demanded(layout.out):
            return
        heads, read = layout.view.backward_fused(ctx, layout.out)
        if layout.cosine:
            ctx.keep(layout.params["cpb_mlp.0.weight"], 0, _needed_hidden_units(layout, ctx, heads))
        ctx.demand(layout.x, {0: ctx.demanded(layout.out, 0), -1: read & ~_zero_inputs(ctx, node, layout.x)})

    def replace(self, module: nn.Module, plan: ModulePlan) -> nn.Module:
        layout = _Layout(plan.calls[0])
        kept_rows = plan.kept_param("qkv.weight", 0)
        head_rows = layout.view.head_of(3 * layout.inner)
        kept_heads = torch.arange(layout.heads) if kept_rows is None else torch.unique(head_rows[kept_rows])
        qkv = _sliced_linear(module.qkv, plan, "qkv", plan.param("qkv.bias"))
        proj = _sliced_linear(module.proj, plan, "proj", _folded_proj_bias(module, plan, layout, kept_heads))
        common = (qkv, proj, int(kept_heads.numel()), layout.head_dim, module.window_size, module.shift_size,
                  module.attention_dropout, module.dropout, module.relative_position_index)
        if layout.cosine:
            cpb_mlp = clone_module(module.cpb_mlp)
            cpb_mlp[0] = _sliced_linear(module.cpb_mlp[0], plan, "cpb_mlp.0", plan.param("cpb_mlp.0.bias"))
            cpb_mlp[2] = _sliced_linear(module.cpb_mlp[2], plan, "cpb_mlp.2", plan.param("cpb_mlp.2.bias"))
            new = PrunedShiftedWindowAttentionV2(*common, plan.param("logit_scale"), cpb_mlp,
                                                 module.relative_coords_table)
        else:
            kind = PrunedShiftedWindowAttention3d if len(module.window_size) == 3 else PrunedShiftedWindowAttention
            new = kind(*common, plan.param("relative_position_bias_table"))
        new.train(module.training)
        return new


def _needed_hidden_units(layout: _Layout, ctx: Analysis, heads: torch.Tensor) -> torch.Tensor:
    """Hidden units of ``cpb_mlp`` read by a kept head that are not zero after the ReLU (a unit whose
    weights are masked is ``relu(bias)``, zero when its bias is not positive)."""
    params = layout.params
    read = NonzeroPattern.of(ctx, params["cpb_mlp.2.weight"]).columns_read_by(heads)
    varying = NonzeroPattern.of(ctx, params["cpb_mlp.0.weight"]).rows
    return read & (varying | (params["cpb_mlp.0.bias"].host() > 0))


def _zero_inputs(ctx: Analysis, node: Node, x: TensorValue) -> torch.Tensor:
    """Input features that are zero in every call. Only these can go without being read: the zero
    tokens padding the windows hold zero in every feature, so a non-zero constant is not a bias."""
    consts = ctx.const(x, -1)
    if consts is None:
        return torch.zeros(x.shape[-1], dtype=torch.bool)
    return foldable(ctx, node, x, -1) & consts.zero


def _sliced_linear(linear: nn.Linear, plan: ModulePlan, prefix: str, bias: Optional[torch.Tensor]) -> nn.Linear:
    """A copy of ``linear`` holding its kept rows and columns and the given bias."""
    new = clone_module(linear)
    new.weight = plan.param(f"{prefix}.weight")
    new.bias = bias
    new.out_features, new.in_features = new.weight.shape
    return new


def _folded_proj_bias(module: nn.Module, plan: ModulePlan, layout: _Layout,
                      kept_heads: torch.Tensor) -> Optional[torch.Tensor]:
    """``proj.bias`` of the kept outputs, plus the constant output of every removed head."""
    weight = plan.masked("proj.weight")
    extra = layout.view.removed_contribution(weight, plan.kept(layout.out, -1), kept_heads)
    return added_to_bias(plan.param("proj.bias"), extra, module.proj.weight)


def register(registry: RuleRegistry) -> None:
    rule = ShiftedWindowAttentionRule()
    registry.add_module(f"{_SWIN}.ShiftedWindowAttention", rule)
    registry.add_module(f"{_SWIN}.ShiftedWindowAttentionV2", rule)
    registry.add_module("torchvision.models.video.swin_transformer.ShiftedWindowAttention3d", rule)
    # The rebuilt modules keep the same attributes, so a sped-up model can be sped up again.
    for kind in (PrunedShiftedWindowAttention, PrunedShiftedWindowAttentionV2, PrunedShiftedWindowAttention3d):
        registry.add_module(kind, rule)
