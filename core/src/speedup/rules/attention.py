"""``nn.MultiheadAttention``: whole heads, input features and output features.

Heads are internal to the module: no tensor it returns has a head dimension. The rule makes one
atom per head and ties every projection row and column of that head to it (rows of ``q``, ``k``,
``v`` in ``in_proj_weight``, columns of ``out_proj``). ``head_dim`` never changes.

A head whose value rows are all masked outputs its value bias, a constant: it is removed and its
contribution folded into ``out_proj.bias`` (removing it never rescales the other heads: softmax
runs per head). A head is needed when some needed output reads it through a non-zero weight, or
when the attention weights themselves are returned and used.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from ..graph import Node, TensorValue
from ..modules import PrunedMultiheadAttention
from ..propagation import Analysis
from ..replacement import ModulePlan
from ..rule import DimConst, ModuleRule
from ..slicing import gather_kept
from .heads import Heads, feature_index
from .linear import ActivationMaskedLinear
from .toolkit import NonzeroPattern, added_to_bias, foldable


class _Layout:
    """Where everything of one ``nn.MultiheadAttention`` call lives."""

    def __init__(self, node: Node):
        module: nn.MultiheadAttention = node.module
        self.module = module
        tensors = [a for a in node.args if isinstance(a, TensorValue)]
        named = node.kwargs
        self.query = named.get("query", tensors[0] if tensors else None)
        self.key = named.get("key", tensors[1] if len(tensors) > 1 else self.query)
        self.value = named.get("value", tensors[2] if len(tensors) > 2 else self.key)
        self.out = node.outputs[0]
        self.weights = node.outputs[1] if len(node.outputs) > 1 else None
        self.heads, self.embed = module.num_heads, module.embed_dim
        self.head_dim = module.head_dim
        self.params = node.params
        batched = self.query.ndim == 3
        self.batch = (0 if module.batch_first else 1) if batched else None
        self.seq = (1 if module.batch_first else 0) if batched else 0
        mask = named.get("attn_mask", tensors[4] if len(tensors) > 4 else None)
        self.per_head_mask = isinstance(mask, TensorValue) and mask.ndim == 3

    def head_of_rows(self, count: int) -> torch.Tensor:
        """Head index of each of ``count`` projection rows laid out as (q|k|v) x heads x head_dim."""
        return (torch.arange(count) % self.embed) // self.head_dim

    def projections(self) -> list[tuple[TensorValue, str, slice]]:
        """(input, weight name, rows) for q, k and v."""
        if self.module._qkv_same_embed_dim:
            e = self.embed
            return [(self.query, "in_proj_weight", slice(0, e)), (self.key, "in_proj_weight", slice(e, 2 * e)),
                    (self.value, "in_proj_weight", slice(2 * e, 3 * e))]
        return [(self.query, "q_proj_weight", slice(None)), (self.key, "k_proj_weight", slice(None)),
                (self.value, "v_proj_weight", slice(None))]

    def value_bias(self) -> Optional[torch.Tensor]:
        bias = self.params.get("in_proj_bias")
        return bias.host()[2 * self.embed:].to(torch.float64) if bias is not None else None

    def heads_view(self) -> Heads:
        _, name, rows = self.projections()[2]
        return Heads(self.heads, self.head_dim, self.params[name], rows.start or 0, self.value_bias(),
                     self.params["out_proj.weight"], self.params.get("out_proj.bias"))


class MultiheadAttentionRule(ModuleRule):
    lazy_masks = True  # reads parameters through the node's values and the plan only

    def couple(self, node: Node, ctx: Analysis) -> None:
        layout = _Layout(node)
        heads = ctx.fresh(layout.heads)
        if layout.per_head_mask:
            ctx.table.pin(heads)  # an (N * num_heads, L, S) mask is laid out per head
        for x, name, _ in layout.projections():
            ctx.link(x, -1, layout.params[name], 1)
        for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias"):
            value = layout.params.get(name)
            if value is not None:
                ctx.tie(ctx.atoms(value, 0), heads[layout.head_of_rows(value.shape[0])])
        for name in ("bias_k", "bias_v"):
            if name in layout.params:
                ctx.tie(ctx.atoms(layout.params[name], 2), heads[layout.head_of_rows(layout.embed)])
        out_weight = layout.params["out_proj.weight"]
        ctx.tie(ctx.atoms(out_weight, 1), heads[layout.head_of_rows(layout.embed)])
        ctx.link(layout.out, -1, out_weight, 0)
        if "out_proj.bias" in layout.params:
            ctx.link(layout.params["out_proj.bias"], 0, out_weight, 0)
        if layout.batch is not None:
            for x in (layout.key, layout.value, layout.out):
                if x is not layout.query:
                    ctx.link(layout.query, layout.batch, x, layout.batch)
        ctx.link(layout.query, layout.seq, layout.out, layout.seq)
        if layout.key is not layout.value:
            ctx.link(layout.key, layout.seq, layout.value, layout.seq)
        if layout.weights is not None and layout.weights.ndim == layout.query.ndim + 1:
            ctx.tie(ctx.atoms(layout.weights, -3), heads)

    def _constant_heads(self, layout: _Layout, ctx: Analysis) -> torch.Tensor:
        """Heads whose value rows are all masked, unless an extra key (``bias_k``, a zero key) sees other values."""
        if layout.module.bias_k is not None or layout.module.add_zero_attn:
            return torch.zeros(layout.heads, dtype=torch.bool)
        return layout.heads_view().constant(ctx)

    def forward(self, node: Node, ctx: Analysis) -> None:
        layout = _Layout(node)
        ctx.set_const(layout.out, -1, layout.heads_view().output_constants(ctx, self._constant_heads(layout, ctx)))

    def backward(self, node: Node, ctx: Analysis) -> None:
        layout = _Layout(node)
        out_needed = ctx.is_demanded(layout.out)
        weights_needed = layout.weights is not None and ctx.is_demanded(layout.weights)
        if not out_needed and not weights_needed:
            return
        heads = layout.heads_view().needed(ctx, ctx.demanded(layout.out, -1), self._constant_heads(layout, ctx))
        if weights_needed:
            heads = torch.ones_like(heads)
        for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
            value = layout.params.get(name)
            if value is not None:
                ctx.keep(value, 0, heads[layout.head_of_rows(value.shape[0])])
        ctx.keep(layout.params["out_proj.weight"], 1, heads[layout.head_of_rows(layout.embed)])
        batch = {layout.batch: ctx.demanded(layout.out, layout.batch)} if layout.batch is not None else {}
        for x, name, rows in layout.projections():
            pattern = NonzeroPattern.of(ctx, layout.params[name])
            needed_rows = torch.zeros(pattern.rows.numel(), dtype=torch.bool)
            needed_rows[rows] = heads.repeat_interleave(layout.head_dim)
            read = pattern.columns_read_by(needed_rows)
            ctx.demand(x, {**batch, x.ndim - 1: read & ~foldable(ctx, node, x, -1)})

    def masked_forward(self, module: nn.Module, masks: dict) -> Optional[Callable[..., Any]]:
        """The masked module's output from masked activations (see :class:`ActivationMaskedLinear`), for
        one ``in_proj_weight`` and ``out_proj`` whose masks are rows times columns: the recording then
        makes no masked copy of them (85 MB on a BERT-base encoder)."""
        if (type(module).forward is not nn.MultiheadAttention.forward or not module._qkv_same_embed_dim
                or not set(masks) <= _PROJECTIONS or not all(p.separable for p in masks.values())):
            return None
        embed = module.embed_dim
        projections = [ActivationMaskedLinear.part(module.in_proj_weight, module.in_proj_bias,
                                                   masks.get("in_proj_weight"), masks.get("in_proj_bias"),
                                                   slice(i * embed, (i + 1) * embed))
                       for i in range(3)]
        out = module.out_proj
        projections.append(ActivationMaskedLinear.part(out.weight, out.bias, masks.get("out_proj.weight"),
                                                       masks.get("out_proj.bias")))
        attention = PrunedMultiheadAttention(*projections, module.num_heads, module.head_dim, module.batch_first,
                                             module.dropout, module.bias_k, module.bias_v, module.add_zero_attn)
        attention.train(module.training)
        return attention.forward

    def replace(self, module: nn.MultiheadAttention, plan: ModulePlan) -> nn.Module:
        layout = _Layout(plan.calls[0])
        rows_name = "in_proj_weight" if module._qkv_same_embed_dim else "q_proj_weight"
        kept_rows = plan.kept_param(rows_name, 0)
        head_rows = layout.head_of_rows(layout.embed if not module._qkv_same_embed_dim else 3 * layout.embed)
        kept_heads = torch.unique(head_rows[kept_rows]) if kept_rows is not None else torch.arange(layout.heads)
        projections = []
        for index, (x, name, rows) in enumerate(layout.projections()):
            full = plan.masked(name, [torch.arange(getattr(module, name).shape[0])[rows]])  # this projection's rows
            bias = plan.masked("in_proj_bias")
            bias = bias[index * layout.embed:(index + 1) * layout.embed] if bias is not None else None
            projections.append(_projection(plan, x, full, bias, kept_heads, layout))
        out_proj = _out_projection(module, plan, layout, kept_heads)
        bias_k, bias_v = plan.masked("bias_k"), plan.masked("bias_v")
        bias_k = bias_k[..., feature_index(kept_heads, layout.head_dim)] if bias_k is not None else None
        bias_v = bias_v[..., feature_index(kept_heads, layout.head_dim)] if bias_v is not None else None
        new = PrunedMultiheadAttention(*projections, out_proj, int(kept_heads.numel()), layout.head_dim,
                                       module.batch_first, module.dropout, bias_k, bias_v, module.add_zero_attn)
        new.train(module.training)
        return new.to(device=module.out_proj.weight.device)


_PROJECTIONS = {"in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"}


def _projection(plan: ModulePlan, x: TensorValue, full: torch.Tensor, bias, kept_heads, layout: _Layout) -> nn.Linear:
    """The q, k or v projection for the kept heads and kept input features, constants folded."""
    rows = feature_index(kept_heads, layout.head_dim)
    kept_in = plan.kept(x, -1)
    removed = plan.removed(x, -1)
    bias = bias[rows] if bias is not None else None
    consts = x.consts[x.dim(-1)] if x.consts else None
    if isinstance(consts, DimConst) and removed.numel() and bool(consts.value[removed].ne(0).any()):
        # Removed constant inputs become a bias, even where the module had none.
        extra = gather_kept(full, [rows, removed]).to(torch.float64) @ consts.value[removed].to(full.device)
        bias = added_to_bias(bias, extra, full)
    weight = gather_kept(full, [rows, kept_in])
    return _linear(weight, bias)


def _linear(weight: torch.Tensor, bias) -> nn.Linear:
    """An ``nn.Linear`` holding these tensors (built on the meta device: no initialisation to discard)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.contiguous())
    if bias is not None:
        linear.bias = nn.Parameter(bias.contiguous())
    return linear


def _out_projection(module: nn.MultiheadAttention, plan: ModulePlan, layout: _Layout, kept_heads) -> nn.Linear:
    """``out_proj`` for the kept heads and outputs, the removed heads' constant values folded into its bias."""
    full = plan.masked("out_proj.weight")
    kept_out = plan.kept(layout.out, -1)
    bias = plan.masked("out_proj.bias")
    bias = bias[kept_out] if bias is not None and kept_out is not None else bias
    extra = layout.heads_view().removed_contribution(full, kept_out, kept_heads)
    weight = gather_kept(full, [kept_out, feature_index(kept_heads, layout.head_dim)])
    return _linear(weight, added_to_bias(bias, extra, full))


_ENCODER_LAYER_PARTS = {"self_attn": nn.MultiheadAttention, "linear1": nn.Linear, "linear2": nn.Linear,
                        "norm1": nn.LayerNorm, "norm2": nn.LayerNorm}


def _fused_path_fits(layer: nn.Module) -> bool:
    """Whether the parts of an ``nn.TransformerEncoderLayer`` are still torch's own modules: its fused
    path (in inference) reads their tensors and would bypass the ``forward`` of a part rebuilt as another
    module (a norm counting removed constants, an attention without some heads)."""
    return all(type(getattr(layer, name, None)) is kind for name, kind in _ENCODER_LAYER_PARTS.items())


def _encoder_layer_fused_path(layer: nn.Module) -> dict[str, Any]:
    """``activation_relu_or_gelu``, which only the fused path reads, 0 (the path off) where it no longer fits."""
    return {} if _fused_path_fits(layer) else {"activation_relu_or_gelu": 0}


def _encoder_nested_tensors(encoder: nn.Module) -> dict[str, Any]:
    """An ``nn.TransformerEncoder`` no longer packs a padded batch into nested tensors for layers whose
    fused path is off: their ordinary path takes ordinary tensors only (before, such a model failed on a
    padded batch). At padded positions the output is then what the layers compute there, where the
    nested path gave zeros; every other position is the masked model's."""
    return {} if all(_fused_path_fits(layer) for layer in encoder.layers) else {"use_nested_tensor": False}


def _transformer_width(transformer: nn.Module) -> dict[str, Any]:
    """``nn.Transformer`` checks that its inputs are ``d_model`` wide: the width its encoder's and its
    decoder's first norms now take (where they differ, the check fails and verification keeps them)."""
    widths = {_stream_width(stack) for stack in (transformer.encoder, transformer.decoder)}
    return {"d_model": widths.pop()} if len(widths) == 1 and None not in widths else {}


def _stream_width(stack: nn.Module) -> Optional[int]:
    """The width the first layer of torch's encoder or decoder stack normalises (None for another stack)."""
    layers = getattr(stack, "layers", None)
    shape = getattr(getattr(layers[0], "norm1", None), "normalized_shape", None) if layers else None
    return shape[0] if shape else None


def register(registry) -> None:
    registry.add_module(nn.MultiheadAttention, MultiheadAttentionRule())
    registry.add_sizes(nn.TransformerEncoderLayer, _encoder_layer_fused_path)
    registry.add_sizes(nn.TransformerEncoder, _encoder_nested_tensors)
    registry.add_sizes(nn.Transformer, _transformer_width)
