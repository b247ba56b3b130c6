"""Normalisation layers.

Per-channel norms (BatchNorm, InstanceNorm) treat channels independently: a channel simply goes,
and a constant channel stays constant (its value is found by running the layer itself on it).
Norms whose statistics span the hidden dimension (LayerNorm, RMSNorm, GroupNorm) read every entry:
a live entry is always needed for the statistics. They can still drop an entry holding a constant,
by counting it in the statistics (:mod:`speedup.modules`); a GroupNorm losing whole groups stays
torch's own.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..graph import Node, TensorValue
from ..modules import ChannelGather, ConstantAwareGroupNorm, ConstantAwareLayerNorm, GatheredNorm
from ..propagation import Analysis
from ..replacement import ModulePlan
from ..rule import DimConst, ModuleRule, OpRule, bind
from .norm_vectors import TORCH_LAYOUT, NormVectors, held_vectors, probe_matches, run_with
from .toolkit import clone_module, demand_computed, equal_parts, first_input, foldable, param_data

_CHANNEL_PARAMS = ("weight", "bias", "running_mean", "running_var")


class ChannelNormRule(ModuleRule):
    """``BatchNormNd`` and ``InstanceNormNd``: dimension 1 holds independent channels."""

    subclasses = True
    unrecorded_forward = True  # torch's own forward: a norm over its input and its vectors
    lazy_masks = True  # reads parameters through the node's values and the plan only

    def couple(self, node: Node, ctx: Analysis) -> None:
        x, out = first_input(node), node.outputs[0]
        statistics = _statistics_dims(node.module, x.ndim)
        for d in range(x.ndim):
            ctx.link(x, d, out, d)
            if d in statistics:
                ctx.pin(x, d)  # every entry counts in the statistics
        for name in _CHANNEL_PARAMS:
            if name in node.params and node.params[name].ndim == 1:
                ctx.link(node.params[name], 0, out, 1)

    def forward(self, node: Node, ctx: Analysis) -> None:
        x, out = first_input(node), node.outputs[0]
        consts = ctx.const(x, 1)
        if _plain_batchnorm(node.module):
            scale, shift, fixed = _batchnorm_affine(ctx, node.module)
            if consts is None:
                if fixed is not None:
                    ctx.set_const(out, 1, DimConst.where(fixed & torch.isfinite(shift), shift))
                return
            value = torch.addcmul(shift, consts.value, scale)
            mask = consts.mask if fixed is None else consts.mask | fixed
            ctx.set_const(out, 1, DimConst.where(mask & torch.isfinite(value), value))
            return
        weight, bias = param_data(node, "weight"), param_data(node, "bias")
        # A channel whose scale is masked is its shift, whatever the input.
        zero_scale = weight == 0 if weight is not None and bias is not None else None
        if consts is None:
            if zero_scale is not None and bool(zero_scale.any()):
                ctx.set_const(out, 1, DimConst.where(zero_scale & torch.isfinite(bias), bias))
            return
        value = _run_on_constants(node.module, x.ndim, consts)
        mask = consts.mask
        if zero_scale is not None:
            value = torch.where(zero_scale & ~mask, bias.to(torch.float64), value)
            mask = mask | zero_scale
        ctx.set_const(out, 1, DimConst.where(mask & torch.isfinite(value), value))

    def backward(self, node: Node, ctx: Analysis) -> None:
        x, out = first_input(node), node.outputs[0]
        if ctx.is_demanded(out):
            ctx.demand(x, {d: ctx.demanded(out, d) for d in range(x.ndim)})

    def replace(self, module: nn.Module, plan: ModulePlan) -> nn.Module:
        new = clone_module(module)
        for name in _CHANNEL_PARAMS:
            if getattr(module, name, None) is not None:
                setattr(new, name, plan.param(name))
        new.num_features = plan.count(plan.output(), 1)
        return new


def _statistics_dims(module: nn.Module, ndim: int) -> list[int]:
    """The dimensions a per-channel norm computes its statistics over (none with running statistics
    in eval mode): each sample's positions for InstanceNorm, the whole batch's for BatchNorm."""
    if not module.training and getattr(module, "running_mean", None) is not None:
        return []
    first = 2 if isinstance(module, nn.modules.instancenorm._InstanceNorm) else 0
    return [d for d in range(first, ndim) if d != 1]


def _plain_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and not module.training and module.running_mean is not None


def _batchnorm_affine(ctx: Analysis, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """``(scale, shift, fixed)`` of a plain BatchNorm (computed once for all of the graph's):
    ``y = x * scale + shift``, and the channels whose scale is zero (``None`` if none), which are
    their shift whatever the input."""
    return ctx.memo("batchnorm-affine", lambda: _batchnorm_affines(ctx.graph.module_calls.values()))[id(module)]


def _batchnorm_affines(module_calls) -> dict[int, tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]]:
    """:func:`_batchnorm_affine` of every BatchNorm in eval mode of the graph, in float64, by module id.

    Computed for all of them at once, each of their tensors concatenated: a network has hundreds of
    BatchNorms, and a dozen operations on each small vector cost more than the arithmetic.
    """
    norms = [calls[0].module for calls in module_calls if _plain_batchnorm(calls[0].module)]
    if not norms:
        return {}
    sizes = [m.running_mean.numel() for m in norms]

    def joined(tensors: list[torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():  # one concatenation of the vectors as they are, one conversion
            return torch.cat([t.cpu() for t in tensors]).to(torch.float64)

    variance, mean = joined([m.running_var for m in norms]), joined([m.running_mean for m in norms])
    eps = torch.tensor([m.eps for m in norms], dtype=torch.float64).repeat_interleave(torch.tensor(sizes))
    ones, zeros = torch.ones(max(sizes)), torch.zeros(max(sizes))
    weight = joined([m.weight if m.weight is not None else ones[:n] for m, n in zip(norms, sizes)])
    bias = joined([m.bias if m.bias is not None else zeros[:n] for m, n in zip(norms, sizes)])
    scale, shift = _affine(variance, mean, weight, bias, eps)
    fixed = scale == 0
    counts = torch.segment_reduce(fixed.to(torch.float64), "sum", lengths=torch.tensor(sizes)).tolist()
    return {id(m): (s, b, f if n else None)
            for m, s, b, f, n in zip(norms, scale.split(sizes), shift.split(sizes), fixed.split(sizes), counts)}


def _affine(variance: torch.Tensor, mean: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
            eps) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` of batch normalisation with these statistics: ``y = x * scale + shift``."""
    scale = (variance + eps).rsqrt() * weight
    return scale, torch.addcmul(bias, mean, scale, value=-1)


def _run_on_constants(module: nn.Module, ndim: int, consts: DimConst) -> torch.Tensor:
    """The layer's own output for channels holding constants (eval mode, no hooks)."""
    probe = torch.zeros((1, consts.mask.numel()) + (2,) * max(ndim - 2, 0))
    ref = next(iter(module.parameters()), None)
    if ref is None:
        ref = next(iter(module.buffers()), torch.zeros(()))
    probe = probe.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else torch.float32)
    probe[0] = consts.value.to(probe.dtype).reshape(-1, *([1] * (probe.dim() - 2)))
    with torch.no_grad():
        result = type(module).forward(module, probe)
    return result[0].reshape(consts.mask.numel(), -1)[:, 0].to(torch.float64).cpu()


class LayerNormRule(ModuleRule):
    """``LayerNorm`` (and ``RMSNorm``) over one dimension, the last by default.

    Entries of the normalised dimension can go: a removed entry holding a constant still counts in
    the statistics, which the constant-aware replacement adds back. Normalising over several
    dimensions keeps them all. Subclasses normalising another dimension (torchvision's
    ``LayerNorm2d`` normalises channels, dimension 1) override :meth:`normalized_dim`.
    """

    subclasses = True
    lazy_masks = True  # reads parameters through the node's values and the plan only
    vectors = TORCH_LAYOUT

    def normalized_dim(self, node: Node) -> Optional[int]:
        """The one dimension normalised over (negative: from the end), or None for several."""
        return -1 if len(node.module.normalized_shape) == 1 else None

    def _free_dims(self, node: Node, ndim: int) -> list[int]:
        """Dimensions that map one to one (all, when a single dimension is normalised)."""
        if self.normalized_dim(node) is not None:
            return list(range(ndim))
        return list(range(ndim - len(node.module.normalized_shape)))

    def couple(self, node: Node, ctx: Analysis) -> None:
        x, out = first_input(node), node.outputs[0]
        dim = self.normalized_dim(node)
        normalized = None if dim is None else dim % x.ndim
        for d in self._free_dims(node, x.ndim):
            # Outputs may go where their inputs stay (see replace); pruning offers them together.
            if d != normalized or ctx.offering:
                ctx.link(x, d, out, d)
        if dim is None:
            return
        self.vectors.link(node, lambda vector, axis: ctx.link(vector, axis, x, dim))
        if not ctx.offering:  # an output entry may go alone; it is computed from its input entry
            inputs, own = ctx.atoms(x, dim), ctx.atoms(out, dim)
            if inputs is not None:
                ctx.require(own, inputs)

    def forward(self, node: Node, ctx: Analysis) -> None:
        out = node.outputs[0]
        weight, bias = self.vectors.values(node)
        dim = self.normalized_dim(node)
        if dim is None or weight is None:
            return
        shift = bias.to(torch.float64) if bias is not None else torch.zeros(weight.numel(), dtype=torch.float64)
        ctx.set_const(out, dim, DimConst.where(weight == 0, shift))

    def backward(self, node: Node, ctx: Analysis) -> None:
        x, out = first_input(node), node.outputs[0]
        if not ctx.is_demanded(out):
            return
        dim = self.normalized_dim(node)
        masks = {d: ctx.demanded(out, d) for d in self._free_dims(node, x.ndim)}
        if dim is not None:
            # Every varying entry feeds the statistics; a constant one is counted without being read.
            masks[dim % x.ndim] = ctx.demanded(out, dim) | ~foldable(ctx, node, x, dim)
        ctx.demand(x, masks)

    def replace(self, module: nn.Module, plan: ModulePlan) -> nn.Module:
        """The norm over the kept input entries (counting removed constants in its statistics), followed
        by a gather of the outputs kept where fewer are: every varying input entry feeds the statistics,
        while an output entry goes where it is unused or a constant its consumers fold (its weight is
        masked), and those consumers then shrink."""
        new = _with_sliced_affine(module, plan, self.vectors)
        dim = self.normalized_dim(plan.calls[0])
        new.normalized_shape = (plan.count(plan.input(), dim),)
        removed, values = plan.removed_input_constants(dim)
        if removed.numel():
            new = self.constant_aware(new, plan.input().shape[dim], values)
        return _passing_kept_outputs(new, plan, dim)

    def constant_aware(self, new: nn.Module, full_size: int, values: torch.Tensor) -> nn.Module:
        """``new`` made to count the removed constant entries ``values`` in its statistics."""
        return ConstantAwareLayerNorm.convert(new, full_size, values)


def _passing_kept_outputs(norm: nn.Module, plan: ModulePlan, dim: int) -> nn.Module:
    """``norm``, followed by a :class:`~speedup.modules.ChannelGather` of its kept outputs along ``dim``
    (a :class:`~speedup.modules.GatheredNorm`) where it keeps fewer outputs than inputs there."""
    kept_in, kept_out = plan.kept(plan.input(), dim), plan.kept(plan.output(), dim)
    if kept_out is None or (kept_in is not None and kept_in.numel() == kept_out.numel()):
        return norm  # the outputs kept are the inputs kept: an output entry needs its input entry
    position = torch.arange(plan.input().shape[dim])
    if kept_in is not None:
        position = torch.full_like(position, -1)
        position[kept_in.cpu()] = torch.arange(kept_in.numel())
    picked = position[kept_out.cpu()]
    return GatheredNorm(norm, ChannelGather(picked.to(plan.input().device), dim))


def _rms_norm_zeros(node: Node, ctx: Analysis, scale: Optional[torch.Tensor], dim: int = -1) -> None:
    """An RMS norm's zero outputs: where its input is zero (there is no mean to subtract) or its scale is."""
    x, out = first_input(node), node.outputs[0]
    consts = ctx.const(x, dim)
    zero = consts.zero if consts is not None else torch.zeros(x.shape[dim], dtype=torch.bool)
    if scale is not None:
        zero = zero | (scale == 0)
    if bool(zero.any()):
        ctx.set_const(out, dim, DimConst.where(zero, torch.zeros(zero.numel(), dtype=torch.float64)))


class RMSNormRule(LayerNormRule):
    """``nn.RMSNorm`` over the last dimension."""

    def forward(self, node: Node, ctx: Analysis) -> None:
        if self.normalized_dim(node) is not None:
            _rms_norm_zeros(node, ctx, param_data(node, "weight"))

    def constant_aware(self, new: nn.Module, full_size: int, values: torch.Tensor) -> nn.Module:
        from ..modules import ConstantAwareRMSNorm

        return ConstantAwareRMSNorm.convert(new, full_size, values)


class GroupNormRule(ModuleRule):
    """``GroupNorm``: statistics per group of channels and sample. A varying channel is needed by
    every channel of its group; a channel holding a constant may go, counted in its group's
    statistics by the constant-aware replacement (:class:`~speedup.modules.ConstantAwareGroupNorm`),
    unless whole groups go (then torch's own GroupNorm, with fewer groups). Pruning is offered whole
    groups where there are several (see :attr:`~speedup.propagation.Analysis.offering`)."""

    subclasses = True
    unrecorded_forward = True  # torch's own forward: a norm over its input and its vectors
    lazy_masks = True  # reads parameters through the node's values and the plan only

    def couple(self, node: Node, ctx: Analysis) -> None:
        vectors = [node.params[name] for name in ("weight", "bias") if name in node.params]
        groups = node.module.num_groups
        _couple_groups(ctx, first_input(node), node.outputs[0], groups if ctx.offering and groups > 1 else None, vectors)

    def forward(self, node: Node, ctx: Analysis) -> None:
        module = node.module
        _group_constants(ctx, first_input(node), node.outputs[0], module.num_groups,
                         param_data(node, "weight"), param_data(node, "bias"), module.eps)

    def backward(self, node: Node, ctx: Analysis) -> None:
        x, out = first_input(node), node.outputs[0]
        if not ctx.is_demanded(out):
            return
        masks = {d: ctx.demanded(out, d) for d in range(x.ndim)}
        # Every varying channel of a group anything is needed of feeds its statistics; a constant one
        # is counted without being read.
        groups = node.module.num_groups
        needed = masks[1].reshape(groups, -1).any(1).repeat_interleave(x.shape[1] // groups)
        masks[1] = masks[1] | (needed & ~foldable(ctx, node, x, 1))
        ctx.demand(x, masks)

    def replace(self, module: nn.GroupNorm, plan: ModulePlan) -> nn.Module:
        new = _with_sliced_affine(module, plan)
        per_group = module.num_channels // module.num_groups
        new.num_channels = plan.count(plan.output(), 1)
        kept = plan.kept(plan.input(), 1)
        if kept is None:
            return new
        kept_groups = kept // per_group
        if bool((torch.bincount(kept_groups, minlength=module.num_groups) % per_group == 0).all()):
            new.num_groups = new.num_channels // per_group  # whole groups went: torch's own norm
            return new
        removed, values = plan.removed_input_constants(1)
        return ConstantAwareGroupNorm.convert(new, per_group, kept_groups, removed // per_group, values)


_GROUP_NORM = GroupNormRule()


def recognise_group_norm(module: nn.Module) -> Optional[ModuleRule]:
    """A ``GroupNorm`` subclass whose own ``forward`` computes what ``nn.GroupNorm``'s does (timm's
    ``GroupNorm`` and ``GroupNorm1``: ``F.group_norm`` with the module's attributes), claimed as one.

    Candidates are leaves holding a weight, an optional bias and nothing else; each is run on a probe and
    claimed where the result is ``F.group_norm``'s. A subclass that adds work (an activation) is
    traced through (:class:`GroupNormOpRule`).
    """
    if not isinstance(module, nn.GroupNorm) or set(held_vectors(module)) != {"weight", "bias"}:
        return None
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(2, module.num_channels, 3, 5, generator=generator)
    weight, bias = torch.rand(2, module.num_channels, generator=generator).add_(0.5)
    result = run_with(module, {"weight": weight, "bias": bias}, probe)
    expected = F.group_norm(probe, module.num_groups, weight, bias, module.eps).to(module.weight)
    return _GROUP_NORM if probe_matches(result, expected) else None


class GroupNormOpRule(OpRule):
    """``F.group_norm`` called directly (``aten.native_group_norm``): what a GroupNorm subclass with
    a ``forward`` of its own runs where it is not claimed as one (timm's ``GroupNormAct``, with its
    activation; see :func:`recognise_group_norm`).

    As :class:`GroupNormRule`: only whole groups go, with the affine vectors the call reads. The
    call's group count is the caller's: a GroupNorm subclass keeps ``num_groups`` in step (see
    :func:`_group_count`); code passing a count of its own keeps every group when verified.
    """

    def couple(self, node: Node, ctx: Analysis) -> None:
        args = bind(node)
        x = args["input"]
        vectors = [args[name] for name in ("weight", "bias")
                   if isinstance(args.get(name), TensorValue) and args[name].shape == (x.shape[1],)]
        _couple_groups(ctx, x, node.outputs[0], args["group"], vectors)

    def forward(self, node: Node, ctx: Analysis) -> None:
        args = bind(node)
        vectors = [args.get(name) for name in ("weight", "bias")]
        data = [v.host() if isinstance(v, TensorValue) else None for v in vectors]
        if any(isinstance(v, TensorValue) and d is None for v, d in zip(vectors, data)):
            return  # a vector computed during the call: no channel is known
        _group_constants(ctx, args["input"], node.outputs[0], args["group"], *data, args["eps"])

    def backward(self, node: Node, ctx: Analysis) -> None:
        args = bind(node)
        _demand_whole_groups(ctx, args["input"], node.outputs[0], args["group"])
        _demand_computed_vectors(ctx, args, node.outputs[0], ("weight", "bias"))

    def departs(self, node: Node, again: Node) -> Optional[str]:
        args = bind(node)
        x, groups = args["input"], args["group"]
        planned = x.planned_shape()[1] // (x.shape[1] // groups)
        called = bind(again)["group"]
        return None if called == planned else f"called with {called} groups where {planned} were planned"


def _couple_groups(ctx: Analysis, x: TensorValue, out: TensorValue, groups: Optional[int],
                   vectors: list[TensorValue]) -> None:
    """Channels go by whole groups (each position within a group is pinned), or one by one where
    ``groups`` is None; batch entries go freely; the other dimensions keep their size (every entry
    counts in the statistics)."""
    ctx.link(x, 0, out, 0)
    cut = equal_parts(ctx, x, 1, x.shape[1] // groups) if groups is not None else None
    if cut is not None:
        ctx.table.pin(cut[1])
    ctx.link(x, 1, out, 1)
    for vector in vectors:
        ctx.link(vector, 0, out, 1)


def _group_constants(ctx: Analysis, x: TensorValue, out: TensorValue, groups: int, weight: Optional[torch.Tensor],
                     bias: Optional[torch.Tensor], eps: float) -> None:
    """Constant output channels: those of groups whose channels all hold constants (they normalise to
    constants), and those whose scale is zero (their shift). ``weight``/``bias`` None: no affine."""
    channels = x.shape[1]
    mask = torch.zeros(channels, dtype=torch.bool)
    value = torch.zeros(channels, dtype=torch.float64)
    consts = ctx.const(x, 1)
    if consts is not None:
        whole = consts.mask.reshape(groups, -1).all(1).repeat_interleave(channels // groups)
        if bool(whole.any()):
            mask = whole
            # Every position of a constant channel holds its value: the group's statistics are its channels'.
            per_group = torch.where(whole, consts.value, 0.0).reshape(groups, -1)
            mean = per_group.mean(1, keepdim=True)
            spread = per_group.var(1, unbiased=False, keepdim=True)
            value = ((per_group - mean) / torch.sqrt(spread + eps)).reshape(-1)
            if weight is not None:
                value = value * weight.to(torch.float64)
            if bias is not None:
                value = value + bias.to(torch.float64)
    if weight is not None:
        shift = bias.to(torch.float64) if bias is not None else torch.zeros(channels, dtype=torch.float64)
        value = torch.where(weight == 0, shift, value)
        mask = mask | (weight == 0)
    ctx.set_const(out, 1, DimConst.where(mask & torch.isfinite(value), value))


def _demand_whole_groups(ctx: Analysis, x: TensorValue, out: TensorValue, groups: int) -> None:
    if not ctx.is_demanded(out):
        return
    need = ctx.demanded(out, 1).reshape(groups, -1).any(1).repeat_interleave(x.shape[1] // groups)
    masks = {d: ctx.demanded(out, d) for d in range(x.ndim)}
    masks[1] = need
    ctx.demand(x, masks)


class BatchNormOpRule(OpRule):
    """``F.batch_norm`` called directly (``aten.native_batch_norm`` and its eval-mode twin): what a
    BatchNorm subclass with a ``forward`` of its own runs, as timm's ``BatchNormAct2d`` does.

    Channels (dimension 1) are independent whatever the mode (on the batch's statistics, every entry
    of the other dimensions counts: they keep their size); the affine parameters and running
    statistics the call reads are sliced with them. Constant channels stay constant in eval mode
    (its affine map); on the batch's statistics, a zero channel or one whose scale is zero is its
    shift (another constant would be normalised with round-off).
    A call that updates running statistics in place keeps every channel.
    """

    def couple(self, node: Node, ctx: Analysis) -> None:
        args = bind(node)
        x, out = args["input"], node.outputs[0]
        if _updates_statistics(args):
            return  # every dimension keeps its size
        for d in range(x.ndim):
            ctx.link(x, d, out, d)
            if args.get("training", False) and d != 1:
                ctx.pin(x, d)  # every entry counts in the batch's statistics
        for name in _CHANNEL_PARAMS:
            if isinstance(args.get(name), TensorValue) and args[name].ndim == 1:
                ctx.link(args[name], 0, out, 1)
        for saved in node.outputs[1:]:  # the batch statistics, saved in training mode
            if saved.ndim == 1 and saved.shape[0] == x.shape[1]:
                ctx.link(saved, 0, out, 1)

    def forward(self, node: Node, ctx: Analysis) -> None:
        args = bind(node)
        if _updates_statistics(args):
            return
        x, out = args["input"], node.outputs[0]
        channels = x.shape[1]
        absent = {"weight": torch.ones(channels, dtype=torch.float64), "bias": torch.zeros(channels, dtype=torch.float64)}
        data = {name: _vector(args.get(name), absent.get(name)) for name in _CHANNEL_PARAMS}
        weight, bias = data["weight"], data["bias"]
        if bias is None:
            return  # a shift computed during the call: no channel is known
        mask, value = torch.zeros(channels, dtype=torch.bool), bias
        if weight is not None:
            mask = weight == 0  # a channel whose scale is zero is its shift
        consts = ctx.const(x, 1)
        if consts is not None and args.get("training", False):
            # On the batch's statistics a zero channel has mean and variance exactly 0: its shift.
            mask = mask | consts.zero
        elif consts is not None and weight is not None and data["running_var"] is not None and data["running_mean"] is not None:
            scale, shift = _affine(data["running_var"], data["running_mean"], weight, bias, args["eps"])
            value = torch.where(consts.mask & ~mask, consts.value * scale + shift, value)
            mask = mask | consts.mask
        if bool(mask.any()):
            ctx.set_const(out, 1, DimConst.where(mask & torch.isfinite(value), value))

    def backward(self, node: Node, ctx: Analysis) -> None:
        args = bind(node)
        x, out = args["input"], node.outputs[0]
        if _updates_statistics(args):
            ctx.demand_all(x)
        elif ctx.is_demanded(out):
            batch_statistics = args.get("training", False)
            ctx.demand(x, {d: ctx.demanded(out, d) for d in range(x.ndim) if d == 1 or not batch_statistics})
        _demand_computed_vectors(ctx, args, out, _CHANNEL_PARAMS)


def _demand_computed_vectors(ctx: Analysis, args: dict, out: TensorValue, names: tuple[str, ...]) -> None:
    """A norm's per-channel vectors the model computes (a scale modulated by the input) are needed for
    the channels of the output kept."""
    if ctx.is_demanded(out):
        for name in names:
            demand_computed(ctx, args.get(name), {0: ctx.demanded(out, 1)})


class LayerNormOpRule(OpRule):
    """``F.layer_norm`` called in a module's own code (``aten.native_layer_norm``): the normalised
    dimensions keep their size (the call would normalise fewer entries: only a module can count removed
    ones, see :class:`LayerNormRule` and :func:`~.written_norms.recognise_layer_norm`); the others pass through. A
    constant row normalises to the bias."""

    def _layout(self, node: Node) -> tuple[TensorValue, int]:
        """The input, and its first normalised dimension."""
        args = bind(node)
        return args["input"], args["input"].ndim - len(args["normalized_shape"])

    def couple(self, node: Node, ctx: Analysis) -> None:
        (x, first), out = self._layout(node), node.outputs[0]
        for d in range(x.ndim):
            ctx.link(x, d, out, d)
            if d >= first:
                ctx.pin(x, d)
        for saved in node.outputs[1:]:  # mean and rstd: the leading dimensions, ones after
            for d in range(min(first, saved.ndim)):
                if saved.shape[d] == x.shape[d]:
                    ctx.link(saved, d, out, d)

    def forward(self, node: Node, ctx: Analysis) -> None:
        """A constant slice of a leading dimension is made of constant rows, each normalised to the
        bias: a constant where the bias is one value (zero without a bias)."""
        (x, first), out = self._layout(node), node.outputs[0]
        bias = bind(node).get("bias")
        if bias is None:
            value = 0.0
        else:
            data = bias.host() if isinstance(bias, TensorValue) else None
            if data is None or not bool((data == data.reshape(-1)[0]).all()):
                return
            value = float(data.reshape(-1)[0])
        for d in range(first):
            consts = ctx.const(x, d)
            if consts is not None:
                ctx.set_const(out, d, DimConst.where(consts.mask, torch.full_like(consts.value, value)))

    def backward(self, node: Node, ctx: Analysis) -> None:
        (x, first), out = self._layout(node), node.outputs[0]
        if ctx.is_demanded(out):
            ctx.demand(x, {d: ctx.demanded(out, d) for d in range(first)})
            args = bind(node)
            demand_computed(ctx, args.get("weight"))  # over the normalised dimensions, which keep their sizes
            demand_computed(ctx, args.get("bias"))


def _vector(arg, absent: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A batch-norm argument's values in float64; ``absent`` where the call has none (no affine), None
    where it is computed during the call (unknown)."""
    if isinstance(arg, TensorValue):
        data = arg.host()
        return None if data is None else data.reshape(-1).to(torch.float64)
    return absent


def _updates_statistics(args: dict) -> bool:
    """Whether a batch-norm call writes its running statistics (training mode with statistics)."""
    return bool(args.get("training", False)) and isinstance(args.get("running_mean"), TensorValue)


def _with_sliced_affine(module: nn.Module, plan: ModulePlan, vectors: NormVectors = TORCH_LAYOUT) -> nn.Module:
    new = clone_module(module)
    for name in vectors.names():
        if getattr(module, name, None) is not None:
            setattr(new, name, plan.param(name))
    return new


def register(registry) -> None:
    channel = ChannelNormRule()
    for module_type in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
                        nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d):
        registry.add_module(module_type, channel)
    registry.add_module(nn.LayerNorm, LayerNormRule())
    if hasattr(nn, "RMSNorm"):
        registry.add_module(nn.RMSNorm, RMSNormRule())
    registry.add_module(nn.GroupNorm, _GROUP_NORM)
    registry.add_recogniser(recognise_group_norm)
    registry.add_op("aten.native_batch_norm", BatchNormOpRule())
    registry.add_op("aten._native_batch_norm_legit_no_training", BatchNormOpRule())
    registry.add_op("aten._native_batch_norm_legit", BatchNormOpRule())
    registry.add_op("aten.native_layer_norm", LayerNormOpRule())
    registry.add_op("aten.native_group_norm", GroupNormOpRule())
    # A subclass traced through (its own forward) keeps num_features in step with its vectors.
    registry.add_sizes(nn.modules.batchnorm._NormBase, _channel_count)
    registry.add_sizes(nn.GroupNorm, _group_count)


def _channel_count(module: nn.Module) -> dict[str, int]:
    for name in _CHANNEL_PARAMS:
        tensor = getattr(module, name, None)
        if isinstance(tensor, torch.Tensor) and tensor.dim() == 1:
            return {"num_features": tensor.shape[0]}
    return {}


def _group_count(module: nn.GroupNorm) -> dict[str, int]:
    """A GroupNorm subclass traced through lost whole groups with its vectors: as many channels per
    group as before (nothing to say without affine vectors; a claimed GroupNorm is already in step)."""
    weight = module.weight if isinstance(module.weight, torch.Tensor) else None
    if weight is None or weight.dim() != 1 or weight.shape[0] == module.num_channels:
        return {}
    per_group = module.num_channels // module.num_groups
    if weight.shape[0] % per_group:
        return {}
    return {"num_channels": weight.shape[0], "num_groups": weight.shape[0] // per_group}
