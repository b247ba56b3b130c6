"""Convolutions (``nn.ConvNd``, ``nn.ConvTransposeNd``, and the functional ``aten.convolution``).

Channels of a grouped convolution are pairs (group, position in group): removing a group removes
its input and output channels together, removing a position removes it from every group, so the
result is still a valid grouped (or depthwise) convolution. An output channel whose weights touch
only zero inputs is its bias, everywhere.

A removed input channel holding a constant ``v`` is folded into the layer. With zero padding its
contribution is not the same everywhere (border positions see fewer taps), so the exact fold is a
per-position map: ``conv(ones, sum_c v_c W[:, c])``, which :class:`FoldedConv2d` (and its 1d/3d siblings) adds, recomputing
it for each input size. Where the contribution is uniform (no zero padding) it goes into the bias.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import nn

from .. import flops as flop_count
from ..graph import Node, Origin, TensorValue
from ..boolean import any_along
from ..propagation import Analysis
from ..replacement import ModulePlan, masked_entries
from ..rule import DimConst, ModuleRule, OpRule, bind
from ..modules import FoldedConv1d, FoldedConv2d, FoldedConv3d
from ..slicing import memory_format_of
from .toolkit import NonzeroPattern, added_to_bias, clone_module, demand_computed, first_input, foldable



class _Spec:
    """One convolution call, whether a module or ``aten.convolution``: the same analysis for both."""

    def __init__(self, x: TensorValue, out: TensorValue, weight: TensorValue, bias: Optional[TensorValue],
                 transposed: bool, groups: int, padding, padding_mode: str = "zeros"):
        self.x, self.out, self.weight, self.bias = x, out, weight, bias
        self.transposed, self.groups = transposed, groups
        spatial = weight.ndim - 2
        self.cdim = x.ndim - spatial - 1
        padding = padding if isinstance(padding, (tuple, list)) else (padding,) * spatial
        self.uniform_fold = padding_mode != "zeros" or (not transposed and all(p == 0 for p in padding))
        w = weight.shape
        self.in_per_group = w[0] // groups if transposed else w[1]
        self.out_per_group = w[1] if transposed else w[0] // groups

    @property
    def in_dim(self) -> int:
        return 0 if self.transposed else 1

    @property
    def out_dim(self) -> int:
        return 1 if self.transposed else 0

    def local_weight(self) -> torch.Tensor:
        """``(out_channels, in_per_group, *kernel)`` view of the weight, for either kind."""
        return self.local(self.weight.host())

    def selected_weight(self, rows: Optional[torch.Tensor], columns: Optional[torch.Tensor]) -> torch.Tensor:
        """``local_weight()[rows][:, columns]`` (None: all), on the CPU, reading and masking only those
        entries of a weight laid out plainly (a masked copy of a large weight costs a pass over it)."""
        if self.transposed and self.groups > 1:
            weight = self.local_weight()
            weight = weight if rows is None else weight.index_select(0, rows)
            return weight if columns is None else weight.index_select(1, columns)
        kept: list = [None] * self.weight.ndim
        kept[self.out_dim], kept[self.in_dim] = rows, columns
        weight = masked_entries(self.weight, kept).cpu()
        return weight.transpose(0, 1) if self.transposed else weight

    def local(self, w: torch.Tensor) -> torch.Tensor:
        """Any tensor laid out like the weight (``(w0, w1, ...)``), as ``(out_channels, in_per_group, ...)``."""
        if not self.transposed:
            return w
        g, ig, og = self.groups, self.in_per_group, self.out_per_group
        w = w.reshape(g, ig, og, *w.shape[2:]).transpose(1, 2)
        return w.reshape(g * og, ig, *w.shape[3:])



def couple_conv(spec: _Spec, ctx: Analysis) -> None:
    x, out, weight, bias = spec.x, spec.out, spec.weight, spec.bias
    if spec.cdim == 1:
        ctx.link(x, 0, out, 0)
    if spec.groups == 1:
        ctx.link(x, spec.cdim, weight, spec.in_dim)
        ctx.link(out, spec.cdim, weight, spec.out_dim)
    else:
        _couple_groups(spec, ctx)
    if bias is not None:
        ctx.link(bias, 0, out, spec.cdim)


def _couple_groups(spec: _Spec, ctx: Analysis) -> None:
    """Channel ``c`` of a grouped side is "group ``c // per_group`` and position ``c % per_group``"."""
    x, out, weight = spec.x, spec.out, spec.weight
    groups = ctx.fresh(spec.groups)
    x_atoms = ctx.atoms(x, spec.cdim)
    ctx.accept(x, spec.cdim)
    if x_atoms is None:
        ctx.table.pin(groups)
    local_in = ctx.atoms(weight, 1) if not spec.transposed else ctx.fresh(spec.in_per_group)
    local_out = ctx.atoms(weight, 1) if spec.transposed else ctx.fresh(spec.out_per_group)
    ctx.accept(weight, 1)
    if weight.shape[1] == 1 and (local_in is None or local_out is None):
        # A filter of one channel per group (depthwise) whose dimension of one cannot shrink (a
        # weight computed as ``kernel.unsqueeze(1)``): nothing to lose there but whole groups.
        one = ctx.fresh(1)
        ctx.table.pin(one)
        local_in, local_out = (one, local_out) if local_in is None else (local_in, one)
    if local_in is None or local_out is None:
        ctx.pin(weight, 1)
        ctx.pin(x, spec.cdim)  # the groups cannot follow its channels
        ctx.assign(out, spec.cdim, None)
        return
    # Pruning picks positions in every group where groups are wider than one channel (the layer
    # keeps its group count and its work falls with the square of the width, as with a dense
    # layer), and whole groups of a depthwise layer.
    offered = 1 if spec.in_per_group > 1 and spec.out_per_group > 1 else 0
    c = torch.arange(x.shape[spec.cdim])
    if x_atoms is not None:
        ctx.define(x_atoms, torch.stack([groups[c // spec.in_per_group], local_in[c % spec.in_per_group]], 1), offered)
    else:
        ctx.table.pin(local_in)
    o = torch.arange(out.shape[spec.cdim])
    out_atoms = ctx.fresh(out.shape[spec.cdim])
    ctx.define(out_atoms, torch.stack([groups[o // spec.out_per_group], local_out[o % spec.out_per_group]], 1), offered)
    ctx.assign(out, spec.cdim, out_atoms)
    if spec.transposed:
        ctx.link(weight, 0, x, spec.cdim)
    else:
        ctx.link(weight, 0, out, spec.cdim)


class _GroupedTaps:
    """:class:`~speedup.rules.toolkit.NonzeroPattern`'s answers for a grouped convolution, from its
    ``(groups, out_per_group, in_per_group)`` taps (is any weight of the kernel not zero)."""

    def __init__(self, taps: torch.Tensor):
        self.taps = taps.contiguous()
        self.rows = any_along(self.taps, 2).reshape(-1)
        self.cols = any_along(self.taps, 1).reshape(-1)

    def rows_reading(self, columns: torch.Tensor) -> torch.Tensor:
        groups, _, in_per_group = self.taps.shape
        return any_along(self.taps & columns.reshape(groups, 1, in_per_group), 2).reshape(-1)

    def columns_read_by(self, rows: torch.Tensor) -> torch.Tensor:
        groups, out_per_group, _ = self.taps.shape
        return any_along(self.taps & rows.reshape(groups, out_per_group, 1), 1).reshape(-1)


def _nonzero(spec: _Spec, ctx: Analysis):
    """Which output channels read which input channels through a non-zero kernel (computed once)."""
    if spec.groups == 1:
        return NonzeroPattern.of(ctx, spec.weight, spec.out_dim)
    return ctx.memo(("grouped-taps", spec.weight.index, spec.transposed, spec.groups),
                    lambda: _GroupedTaps(_grouped_taps(spec, ctx)))


def _grouped_taps(spec: _Spec, ctx: Analysis) -> torch.Tensor:
    pattern = ctx.mask_pattern(spec.weight)
    if pattern is not None:
        taps = spec.local(pattern.pair)  # from the mask: no pass over the weight
    else:
        taps = spec.local_weight().flatten(2).abs().sum(2) != 0
    return taps.reshape(spec.groups, spec.out_per_group, spec.in_per_group)


def forward_conv(spec: _Spec, ctx: Analysis) -> None:
    """Output channels reading no varying input are constant: the bias plus any uniform fold."""
    consts = ctx.const(spec.x, spec.cdim)
    nonzero = _nonzero(spec, ctx)
    has_taps = nonzero.rows
    if consts is None:
        reads_variable = has_taps
    else:
        live = ~consts.mask
        if not spec.uniform_fold:
            live |= consts.nonzero_const  # non-uniform near borders: not a constant output
        reads_variable = nonzero.rows_reading(live)
    if bool(reads_variable.all()):
        return  # every output channel varies
    n_out = reads_variable.numel()
    value = spec.bias.host().to(torch.float64) if spec.bias is not None else torch.zeros(n_out, dtype=torch.float64)
    if consts is not None and spec.uniform_fold and bool(consts.nonzero_const.any()):
        value = _add_uniform_fold(spec, consts, (~reads_variable & has_taps).nonzero().reshape(-1), value)
    ctx.set_const(spec.out, spec.cdim, DimConst.where(~reads_variable, value))


def _add_uniform_fold(spec: _Spec, consts: DimConst, rows: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Adds ``sum_c v_c * sum(W[o, c])`` to constant output rows that read constant inputs.

    Only those rows: a masked row has no tap and contributes nothing (the usual case).
    """
    if not rows.numel():
        return value
    sums = spec.selected_weight(rows, None).flatten(2).sum(2).to(torch.float64)
    inputs = (rows // spec.out_per_group)[:, None] * spec.in_per_group + torch.arange(spec.in_per_group)
    folded = torch.where(consts.nonzero_const, consts.value, 0.0)[inputs]
    value = value.clone()
    value[rows] += (sums * folded).sum(1)
    return value


def backward_conv(spec: _Spec, ctx: Analysis, foldable_inputs: torch.Tensor) -> None:
    x, out = spec.x, spec.out
    if not ctx.is_demanded(out):
        return
    need_out = ctx.demanded(out, spec.cdim)
    nonzero = _nonzero(spec, ctx)
    read = nonzero.cols if bool(need_out.all()) else nonzero.columns_read_by(need_out)
    masks = {spec.cdim: read & ~foldable_inputs}
    if spec.cdim == 1:
        masks[0] = ctx.demanded(out, 0)
    ctx.demand(x, masks)


def _module_spec(node: Node) -> _Spec:
    module = node.module
    return _Spec(first_input(node), node.outputs[0], node.params["weight"], node.params.get("bias"),
                 module.transposed, module.groups, module.padding, module.padding_mode)


class ConvModuleRule(ModuleRule):
    lazy_masks = True  # reads parameters through the node's values and the plan only
    subclasses = True

    def couple(self, node: Node, ctx: Analysis) -> None:
        couple_conv(_module_spec(node), ctx)

    def forward(self, node: Node, ctx: Analysis) -> None:
        forward_conv(_module_spec(node), ctx)

    def backward(self, node: Node, ctx: Analysis) -> None:
        spec = _module_spec(node)
        fold = foldable(ctx, node, spec.x, spec.cdim)
        if not spec.uniform_fold and _folded_kind(node.module) is None:
            # Only the plain convolutions have an exact border-aware fold; elsewhere fold zeros only.
            consts = ctx.const(spec.x, spec.cdim)
            fold &= consts.zero if consts is not None else fold
        backward_conv(spec, ctx, fold)

    def masked_forward(self, module: nn.Module, masks: dict) -> Optional[KeptChannelsConv]:
        """The masked convolution computed on the channels its weight mask keeps, for a mask that is
        output channels times input channels of a plain, ungrouped convolution."""
        pattern = masks.get("weight")
        if (set(masks) != {"weight"} or not pattern.separable or module.groups != 1 or module.transposed
                or type(module).forward not in _PLAIN_FORWARDS):
            return None
        return KeptChannelsConv(module, pattern)

    def replace(self, module: nn.Module, plan: ModulePlan) -> nn.Module:
        spec = _module_spec(plan.calls[0])
        weight, bias = plan.param("weight"), plan.param("bias")
        kept_in, kept_out = plan.kept(spec.x, spec.cdim), plan.kept(spec.out, spec.cdim)
        n_in = spec.x.shape[spec.cdim] if kept_in is None else int(kept_in.numel())
        n_out = spec.out.shape[spec.cdim] if kept_out is None else int(kept_out.numel())
        if module.groups == 1:
            groups = 1
        else:
            groups = n_out // weight.shape[1] if spec.transposed else n_in // weight.shape[1]
        new = clone_module(module)
        new.weight, new.bias = weight, bias
        new.in_channels, new.out_channels, new.groups = n_in, n_out, groups
        if not plan.may_fold(spec.cdim):
            return new
        kernel = contribution_kernel(spec, plan, kept_out)
        if not bool(kernel.any()):
            return new  # the constants met only removed outputs
        if spec.uniform_fold:
            # No zero padding: every output position sees every tap, so the contribution is the sum.
            new.bias = added_to_bias(bias, kernel.flatten(1).sum(1), module.weight)
            return new
        if _folded_kind(new) is None:
            # A transposed convolution folds zeros only (see backward): the constants it lost reach
            # only outputs that nothing needs.
            return new
        return _fold_borders(new, kernel, spec.x.shape[spec.cdim + 1:])


_PLAIN_FORWARDS = (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward)

_GATHER_WORTH = 1 << 26
"""Multiply-accumulates by zero a masked convolution must spare for computing only its kept channels
to pay. A convolution of a new shape first costs its kernel's set-up (0.3 to 0.7 ms on this CPU with
torch 2.13, against about 1 ms per 25 million multiply-accumulates), while the masked model's own
shapes are usually set up already (the pruning ran it); below this, the recording of densenet201
took 70 ms longer in a process's first call."""


class KeptChannelsConv:
    """A masked convolution's output, for the recording, computed from the kept channels only.

    Where the weight mask keeps output channels ``rows`` times input channels ``columns``, the masked
    layer is ``conv(x[:, columns], W[rows][:, columns])`` in the kept output channels and its bias in the
    others: a quarter of the multiplications when half of each goes (the masked model multiplies the
    rest by zeros). The module's weight is read as it is (no masked copy). A convolution sparing few
    computes every channel instead (see ``_GATHER_WORTH``): with its weight as it is and the removed
    output channels set to their bias afterwards where the mask removes whole output channels, with
    the masked copy of its weight otherwise.
    """

    def __init__(self, module: nn.Module, pattern) -> None:
        self.module, self.pattern = module, pattern

    @functools.cached_property
    def kept_channels(self) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Indices of the kept output and input channels (None: all are kept)."""
        device = self.module.weight.device
        return tuple(None if bool(kept.all()) else kept.nonzero().reshape(-1).to(device)
                     for kept in (self.pattern.kept(0), self.pattern.kept(1)))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        module, weight = self.module, self.module.weight.detach()
        batched = x.dim() == weight.dim()  # an unbatched input has no dimension 0 of samples
        rows, columns = self.kept_channels if batched else (None, None)
        if rows is not None or columns is not None:
            out_channels, in_channels = weight.shape[:2]
            kept_pairs = (rows.numel() if rows is not None else out_channels) * (
                columns.numel() if columns is not None else in_channels)
            per_pair = x.numel() // in_channels * weight[0, 0].numel()  # positions times kernel taps
            if kept_pairs == 0 or per_pair * (out_channels * in_channels - kept_pairs) < _GATHER_WORTH:
                rows = columns = None  # nothing kept: no kernel of zero channels, the bias fills every one
        if rows is None and columns is None:
            # Whole output channels masked, fewer of their outputs (samples times input positions
            # each) than weights: computed with the weight as it is, then set to their bias.
            if batched and self.pattern.dim == 0 and (
                    self.removed_rows.numel() * (x.numel() // x.shape[1]) < weight.numel()):
                return self._fill_removed(module._conv_forward(x, weight, module.bias))
            return module._conv_forward(x, self.pattern.apply(weight), module.bias)
        bias = module.bias
        if columns is not None:
            weight, x = weight.index_select(1, columns), x.index_select(1, columns)
        if rows is None:
            return module._conv_forward(x, weight, bias)
        weight = weight.index_select(0, rows)
        kept = module._conv_forward(x, weight, bias.index_select(0, rows) if bias is not None else None)
        shape = (kept.shape[0], module.out_channels) + tuple(kept.shape[2:])
        out = torch.empty(shape, dtype=kept.dtype, device=kept.device, memory_format=memory_format_of(kept))
        if bias is None:
            out.zero_()
        else:
            out.copy_(bias.detach().reshape((1, -1) + (1,) * (kept.dim() - 2)).expand(shape))
        return out.index_copy_(1, rows, kept)

    @functools.cached_property
    def removed_rows(self) -> torch.Tensor:
        """Indices of the output channels the mask removes."""
        return (~self.pattern.kept(0)).nonzero().reshape(-1).to(self.module.weight.device)

    def _fill_removed(self, out: torch.Tensor) -> torch.Tensor:
        """``out`` with the output channels the mask removes set to the bias (zero without one), as
        the masked weight's zero rows make them: cheaper than masking the weight where the output
        is small (a late 1x1 convolution at batch 1), and the kept channels are computed alike."""
        removed = self.removed_rows
        bias = self.module.bias
        if bias is None:
            return out.index_fill_(1, removed, 0)
        shape = (out.shape[0], removed.numel()) + tuple(out.shape[2:])
        values = bias.detach().index_select(0, removed).reshape((1, -1) + (1,) * (out.dim() - 2))
        return out.index_copy_(1, removed, values.to(out.dtype).expand(shape))

    def flops(self, output: torch.Tensor) -> int:
        """The FLOPs of the masked module's own forward, which returned ``output``."""
        weight = self.module.weight
        channels = output.shape[output.dim() - weight.dim() + 1]  # dimension 1, or 0 for an unbatched input
        return flop_count.convolution(output.numel() // channels, weight)


def contribution_kernel(spec: _Spec, plan: ModulePlan, kept_out) -> torch.Tensor:
    """``K[o] = sum_c v_c W[o, c]`` over removed constant inputs: one single-channel kernel per kept output.

    Reads only the weight columns of inputs that hold a non-zero constant, and only kept rows.
    """
    removed, values = plan.removed_input_constants(spec.cdim)
    if spec.groups == 1:  # one constant per input channel: a matrix-vector product
        used = values != 0
        columns, constants = removed[used], values[used]
        weight = spec.selected_weight(kept_out, columns)
        return torch.matmul(weight.movedim(1, -1), constants.to(weight.dtype)).unsqueeze(1).to(torch.float64)
    v = torch.zeros(spec.x.shape[spec.cdim], dtype=torch.float64)
    v[removed] = values
    outputs = torch.arange(spec.out_per_group * spec.groups)
    if kept_out is not None:
        outputs = outputs[kept_out]
    reads = (outputs // spec.out_per_group)[:, None] * spec.in_per_group + torch.arange(spec.in_per_group)
    per_tap = v[reads]  # (kept outputs, in_per_group): the constant each weight column meets
    columns = (per_tap != 0).any(0).nonzero().reshape(-1)
    weight = spec.selected_weight(outputs, columns)
    constants = per_tap[:, columns].reshape(outputs.numel(), columns.numel(), *([1] * (weight.dim() - 2)))
    return (weight.to(torch.float64) * constants).sum(1, keepdim=True)


_FOLDED = {nn.Conv1d: FoldedConv1d, nn.Conv2d: FoldedConv2d, nn.Conv3d: FoldedConv3d}


def _folded_kind(conv: nn.Module) -> Optional[type]:
    """The folded form of a convolution, that of its torch base for a subclass keeping the base's
    ``forward`` (Hugging Face's ``EfficientNetDepthwiseConv2d``); None for transposed ones."""
    return next((_FOLDED[base] for base in type(conv).__mro__ if base in _FOLDED), None)


def _fold_borders(conv: nn.Module, kernel: torch.Tensor, spatial: tuple) -> nn.Module:
    conv.__class__ = _folded_kind(conv)
    conv.register_buffer("constant_kernel", kernel.to(device=conv.weight.device, dtype=conv.weight.dtype))
    # Computed once per input size; prime it for the recorded size so the first call costs nothing extra.
    conv._constant_map(torch.empty((1, conv.in_channels) + tuple(spatial), dtype=conv.weight.dtype,
                                   device=conv.weight.device))
    return conv


class ConvolutionOpRule(OpRule):
    """``aten.convolution`` called directly (``F.conv2d`` in a custom module): no folding."""

    def _spec(self, node: Node) -> _Spec:
        a = bind(node)
        bias = a.get("bias") if isinstance(a.get("bias"), TensorValue) else None
        return _Spec(a["input"], node.outputs[0], a["weight"], bias, a["transposed"], a["groups"], a["padding"])

    def couple(self, node: Node, ctx: Analysis) -> None:
        couple_conv(self._spec(node), ctx)

    def forward(self, node: Node, ctx: Analysis) -> None:
        spec = self._spec(node)
        if spec.bias is not None and spec.bias.data is None:
            return
        if spec.weight.data is not None:
            forward_conv(spec, ctx)
        elif not spec.transposed:
            _forward_zero_filters(spec, ctx)

    def backward(self, node: Node, ctx: Analysis) -> None:
        spec = self._spec(node)
        if spec.weight.data is None:  # computed from the input (StyleGAN's modulated convolution)
            ctx.demand_all(spec.x)
            if ctx.is_demanded(spec.out):
                demand_computed(ctx, spec.weight)
                demand_computed(ctx, spec.bias)
            return
        consts = ctx.const(spec.x, spec.cdim)
        zero = consts.zero if consts is not None else torch.zeros(spec.x.shape[spec.cdim], dtype=torch.bool)
        backward_conv(spec, ctx, zero)
        _demand_filters(spec, ctx, zero)


def _demand_filters(spec: _Spec, ctx: Analysis, zero_inputs: torch.Tensor) -> None:
    """A weight or bias the model computes (standardised, sliced, scaled) is needed where the outputs
    kept read it, from whatever computed it: the filters of the kept outputs, and (ungrouped) their
    columns meeting inputs that are not zero."""
    if not ctx.is_demanded(spec.out):
        return
    need_out = ctx.demanded(spec.out, spec.cdim)
    if spec.weight.origin is not Origin.PARAMETER:
        masks = {}
        if spec.groups == 1 or not spec.transposed:
            masks[spec.out_dim] = need_out
        if spec.groups == 1:
            masks[spec.in_dim] = _nonzero(spec, ctx).columns_read_by(need_out) & ~zero_inputs
        ctx.demand(spec.weight, masks)
    demand_computed(ctx, spec.bias, {0: need_out})


def _forward_zero_filters(spec: _Spec, ctx: Analysis) -> None:
    """A weight computed during the call (standardised, as timm's ``StdConv2d`` does): an output
    channel whose filter is known to be zero is its bias."""
    consts = ctx.const(spec.weight, 0)
    if consts is None or not bool(consts.zero.any()):
        return
    value = spec.bias.host().to(torch.float64) if spec.bias is not None else torch.zeros(consts.mask.numel(), dtype=torch.float64)
    ctx.set_const(spec.out, spec.cdim, DimConst.where(consts.zero, value))


def register(registry) -> None:
    rule = ConvModuleRule()
    for module_type in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
        registry.add_module(module_type, rule)
    registry.add_op("aten.convolution", ConvolutionOpRule())
    # A subclass traced through (its own forward, as timm's weight-standardised convolutions) keeps
    # its channel counts in step with its weight.
    registry.add_sizes(nn.modules.conv._ConvNd, _conv_sizes)


def _conv_sizes(module: nn.Module) -> dict[str, int]:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() < 3:
        return {}
    rows, columns = weight.shape[0], weight.shape[1] * module.groups
    if module.transposed:
        return {"in_channels": rows, "out_channels": columns}
    return {"in_channels": columns, "out_channels": rows}
