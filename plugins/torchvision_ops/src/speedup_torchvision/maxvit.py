"""torchvision's MaxViT attention: ``RelativePositionalMultiHeadAttention``, by whole heads and features.

The module maps ``x`` of shape ``(B, G, P, D)`` (G windows of P positions) to the same shape:
``to_qkv`` projects ``D`` features into q, k and v, each laid out ``(n_heads, head_dim)``; every
head adds its column of ``relative_position_bias_table`` to its scores; ``merge`` maps the heads
back to ``D`` features. Heads exist only inside the module, so the rule makes one atom per head and
ties to it the head's rows of ``to_qkv`` (q, k and v, weight and bias), its columns of ``merge``
and its column of the bias table. ``head_dim`` never changes. Input features (columns of
``to_qkv``) and output features (rows of ``merge``) shrink independently of the heads and of each
other: the residual stream around the module decides them.

A head whose value rows are all masked outputs its value bias at every position (each row of a
softmax sums to one): it is removed and ``merge.weight[:, head] @ v_bias[head]`` is folded into
``merge.bias``. An output feature whose ``merge`` row reads no live head is a constant.

torchvision's ``forward`` reshapes the heads' output back to the *input* width ``D``, which is
wrong once heads or features were removed, so the smaller module is
:class:`PrunedRelativePositionalMultiHeadAttention`, with its own head count. ``scale_factor``
keeps the original ``feat_dim ** -0.5``: it is a constant of the trained model, not of the sizes.

Everything else in MaxViT (window partition and departition, axis swaps, MBConv, LayerNorm) is
reshapes, permutes and layers that core's rules already follow; the types here are registered by
qualified name so that loading the plugin does not import torchvision.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from speedup.graph import Node
from speedup.plugins.registry import RuleRegistry
from speedup.propagation import Analysis
from speedup.replacement import ModulePlan
from speedup.rule import ModuleRule
from speedup.rules.heads import Heads
from speedup.rules.toolkit import added_to_bias, clone_module, first_input, foldable

_QKV = 3
"""``to_qkv`` rows hold q, k and v one after the other."""


class PrunedRelativePositionalMultiHeadAttention(nn.Module):
    """``RelativePositionalMultiHeadAttention`` whose head count, input and output widths are independent.

    Computes what torchvision's module computes for the heads it holds: same projection layout,
    same ``scale_factor`` applied to the keys, same relative position bias per head. Attribute
    names are torchvision's, so code that reads ``n_heads`` or ``get_relative_positional_bias``
    keeps working, and the same rule can shrink it again.
    """

    def __init__(self, to_qkv: nn.Linear, merge: nn.Linear, relative_position_bias_table: torch.Tensor,
                 relative_position_index: torch.Tensor, head_dim: int, scale_factor: float, max_seq_len: int):
        super().__init__()
        self.n_heads = relative_position_bias_table.shape[1]
        self.head_dim = head_dim
        self.size = int(math.sqrt(max_seq_len))
        self.max_seq_len = max_seq_len
        self.scale_factor = scale_factor
        self.to_qkv = to_qkv
        self.merge = merge
        self.relative_position_bias_table = relative_position_bias_table
        self.register_buffer("relative_position_index", relative_position_index)

    def get_relative_positional_bias(self) -> torch.Tensor:
        """``(1, n_heads, max_seq_len, max_seq_len)``: each head's bias for every pair of positions."""
        table = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        return table.reshape(self.max_seq_len, self.max_seq_len, self.n_heads).permute(2, 0, 1).unsqueeze(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, windows, positions, _ = x.shape
        qkv = self.to_qkv(x).reshape(batch, windows, positions, _QKV, self.n_heads, self.head_dim)
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).unbind(0)  # each (B, G, heads, P, head_dim)
        scores = q @ (k * self.scale_factor).transpose(-2, -1)
        weights = F.softmax(scores + self.get_relative_positional_bias(), dim=-1)
        heads = (weights @ v).permute(0, 1, 3, 2, 4).reshape(batch, windows, positions, self.n_heads * self.head_dim)
        return self.merge(heads)


class _Layout:
    """Where everything of one call lives: the input, the output, the parameters and the head layout."""

    def __init__(self, node: Node):
        module = node.module
        self.x, self.out = first_input(node), node.outputs[0]
        self.heads, self.head_dim = module.n_heads, module.head_dim
        self.params = node.params
        self.view = Heads.fused(self.params, "to_qkv", "merge", self.heads, self.head_dim)


class RelativePositionalAttentionRule(ModuleRule):
    """Heads, input features and output features of MaxViT's attention (see the module docstring)."""

    lazy_masks = True  # reads parameters through the node's values and the plan only

    def couple(self, node: Node, ctx: Analysis) -> None:
        layout = _Layout(node)
        heads = layout.view.couple_fused(ctx, layout.x, layout.out)
        ctx.tie(ctx.atoms(layout.params["relative_position_bias_table"], 1), heads)
        # Windows are attended to independently; positions are mixed, and index the bias table.
        for d in (0, 1):
            ctx.link(layout.x, d, layout.out, d)

    def forward(self, node: Node, ctx: Analysis) -> None:
        layout = _Layout(node)
        layout.view.forward(ctx, layout.out)

    def backward(self, node: Node, ctx: Analysis) -> None:
        layout = _Layout(node)
        if not ctx.is_demanded(layout.out):
            return
        _, read = layout.view.backward_fused(ctx, layout.out)
        x = layout.x
        ctx.demand(x, {0: ctx.demanded(layout.out, 0), 1: ctx.demanded(layout.out, 1),
                       x.ndim - 1: read & ~foldable(ctx, node, x, -1)})

    def replace(self, module: nn.Module, plan: ModulePlan) -> nn.Module:
        layout = _Layout(plan.calls[0])
        kept_heads = plan.kept_param("relative_position_bias_table", 1)
        kept_heads = torch.arange(layout.heads) if kept_heads is None else kept_heads
        new = PrunedRelativePositionalMultiHeadAttention(
            _qkv_projection(module, plan), _merge_projection(module, plan, layout, kept_heads),
            plan.param("relative_position_bias_table"), plan.param("relative_position_index"),
            layout.head_dim, module.scale_factor, module.max_seq_len)
        new.train(module.training)
        return new


def _qkv_projection(module: nn.Module, plan: ModulePlan) -> nn.Linear:
    """``to_qkv`` for the kept heads and input features, removed constant inputs folded into its bias."""
    removed, values = plan.removed_input_constants(-1)
    used = values != 0
    extra = None
    if bool(used.any()):
        # Only the kept rows' weights of the constant inputs, masked as they are read.
        columns = plan.masked("to_qkv.weight", [plan.kept_param("to_qkv.weight", 0), removed[used]])
        extra = columns.to(torch.float64) @ values[used].to(columns.device)
    return _linear(module.to_qkv, plan.param("to_qkv.weight"), plan.param("to_qkv.bias"), extra)


def _merge_projection(module: nn.Module, plan: ModulePlan, layout: _Layout, kept_heads: torch.Tensor) -> nn.Linear:
    """``merge`` for the kept heads and output features, the removed heads' constant values in its bias."""
    extra = layout.view.removed_contribution(plan.masked("merge.weight"), plan.kept(plan.output(), -1), kept_heads)
    return _linear(module.merge, plan.param("merge.weight"), plan.param("merge.bias"), extra)


def _linear(old: nn.Linear, weight: torch.Tensor, bias: Optional[torch.Tensor], extra: Optional[torch.Tensor]) -> nn.Linear:
    """A copy of ``old`` holding ``weight`` and ``bias`` (plus ``extra``, the folded constants, if any)."""
    new = clone_module(old)
    new.weight = weight
    new.bias = added_to_bias(bias, extra, weight)
    new.in_features, new.out_features = weight.shape[1], weight.shape[0]
    return new


def register(registry: RuleRegistry) -> None:
    """Claims torchvision's MaxViT attention (by name) and its pruned form, which shrinks again the same way."""
    rule = RelativePositionalAttentionRule()
    registry.add_module("torchvision.models.maxvit.RelativePositionalMultiHeadAttention", rule)
    registry.add_module(PrunedRelativePositionalMultiHeadAttention, rule)
