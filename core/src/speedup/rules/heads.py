"""Whole attention heads: the analysis every multi-head layer shares.

A head lives inside its module: no tensor the module returns has a head dimension. What a head
contributes comes from its ``head_dim`` value rows, and reaches the output features through
``head_dim`` columns of the output projection. Rules for multi-head modules (``nn.MultiheadAttention``
here, Swin's and MaxViT's window attention in the torchvision plugin) describe where those live
with a :class:`Heads` and share what follows from it:

* a head whose value rows are all zero outputs its value bias at every position, whatever its
  attention weights (each row of a softmax sums to one): it is a constant, so it is removed and its
  contribution added to the output bias. Removing a head never rescales the others;
* an output feature that reads no varying head through a non-zero weight is a constant;
* a head is needed when a needed output feature reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..graph import TensorValue
from ..propagation import Analysis
from ..rule import DimConst
from .toolkit import NonzeroPattern


def feature_index(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The features (laid out heads x ``head_dim``) of the given heads, in order."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


@dataclass
class Heads:
    """Where one multi-head call keeps what its heads contribute."""

    count: int
    head_dim: int
    value_weight: TensorValue
    """The weight holding the value rows, ``(rows, in_features)``."""
    value_start: int
    """Row of ``value_weight`` where the value rows (heads x ``head_dim``) begin."""
    value_bias: Optional[torch.Tensor]
    """The bias of the value rows, float64 on the CPU, or None."""
    out_weight: TensorValue
    """The output projection, ``(out_features, heads * head_dim)``."""
    out_bias: Optional[TensorValue]
    qkv_bias: Optional[TensorValue] = None
    """For a :meth:`fused` layout, the bias of every row of ``value_weight``."""

    @classmethod
    def fused(cls, params: dict[str, TensorValue], qkv: str, out: str, count: int, head_dim: int) -> "Heads":
        """The heads of a module with one ``qkv`` linear (rows q, k, v, each heads x ``head_dim``) and an
        output linear ``out``, given the module node's parameters by name."""
        width = count * head_dim
        bias = params.get(f"{qkv}.bias")
        value_bias = bias.host()[2 * width:].to(torch.float64) if bias is not None else None
        return cls(count, head_dim, params[f"{qkv}.weight"], 2 * width, value_bias, params[f"{out}.weight"],
                   params.get(f"{out}.bias"), bias)

    def head_of(self, count: int) -> torch.Tensor:
        """The head of each of ``count`` features laid out ([q|k|v] x) heads x ``head_dim``."""
        return (torch.arange(count) % (self.count * self.head_dim)) // self.head_dim

    def couple_fused(self, ctx: Analysis, x: TensorValue, out: TensorValue) -> torch.Tensor:
        """Couples a :meth:`fused` layout: one atom per head tied to its q, k, v rows (and bias) and its
        output columns; input features to the ``qkv`` columns, output features to the output rows.
        Returns the head atoms (to tie further per-head parameters to)."""
        heads = ctx.fresh(self.count)
        qkv_rows = heads[self.head_of(self.value_weight.shape[0])]
        ctx.tie(ctx.atoms(self.value_weight, 0), qkv_rows)
        if self.qkv_bias is not None:
            ctx.tie(ctx.atoms(self.qkv_bias, 0), qkv_rows)
        ctx.link(x, -1, self.value_weight, 1)
        ctx.tie(ctx.atoms(self.out_weight, 1), heads[self.head_of(self.out_weight.shape[1])])
        ctx.link(out, -1, self.out_weight, 0)
        if self.out_bias is not None:
            ctx.link(self.out_bias, 0, self.out_weight, 0)
        return heads

    def forward(self, ctx: Analysis, out: TensorValue) -> None:
        """Sets the constant features of ``out`` (its last dimension): see :meth:`output_constants`."""
        ctx.set_const(out, -1, self.output_constants(ctx, self.constant(ctx)))

    def backward_fused(self, ctx: Analysis, out: TensorValue) -> tuple[torch.Tensor, torch.Tensor]:
        """Keeps the ``qkv`` rows and output columns of every head a needed feature of ``out`` reads.

        Returns those heads and the input features their rows read (the caller demands them, less
        what it can fold).
        """
        heads = self.needed(ctx, ctx.demanded(out, -1), self.constant(ctx))
        rows = heads[self.head_of(self.value_weight.shape[0])]
        ctx.keep(self.value_weight, 0, rows)
        ctx.keep(self.out_weight, 1, heads[self.head_of(self.out_weight.shape[1])])
        return heads, NonzeroPattern.of(ctx, self.value_weight).columns_read_by(rows)

    def constant(self, ctx: Analysis) -> torch.Tensor:
        """Heads whose value rows are all zero: their output is their value bias, whatever the input."""
        rows = NonzeroPattern.of(ctx, self.value_weight).rows
        width = self.count * self.head_dim
        return ~rows[self.value_start:self.value_start + width].reshape(self.count, self.head_dim).any(1)

    def reads(self, ctx: Analysis) -> torch.Tensor:
        """``(out_features, heads)``: which output feature reads which head through a non-zero weight."""
        pattern = NonzeroPattern.of(ctx, self.out_weight)
        if pattern.full is None:
            return pattern.rows[:, None] & pattern.cols.reshape(self.count, -1).any(1)[None, :]
        return pattern.full.reshape(pattern.full.shape[0], self.count, -1).any(2)

    def output_constants(self, ctx: Analysis, constant: torch.Tensor) -> DimConst:
        """Output features reading no varying head: the output bias plus the constant heads' values."""
        reads_live = (self.reads(ctx) & ~constant).any(1)
        value = (self.out_bias.host().to(torch.float64) if self.out_bias is not None
                 else torch.zeros(reads_live.numel(), dtype=torch.float64))
        if self.value_bias is not None and bool(constant.any()):
            columns = feature_index(constant.nonzero().reshape(-1), self.head_dim)
            value = value + self.out_weight.host()[:, columns].to(torch.float64) @ self.value_bias[columns]
        return DimConst.where(~reads_live, value)

    def needed(self, ctx: Analysis, needed_out: torch.Tensor, constant: torch.Tensor) -> torch.Tensor:
        """Heads a needed output feature reads, less the constant ones (folded instead)."""
        return self.reads(ctx)[needed_out].any(0) & ~constant

    def removed_contribution(self, out_weight: torch.Tensor, kept_out: Optional[torch.Tensor],
                             kept_heads: torch.Tensor) -> Optional[torch.Tensor]:
        """``sum W[:, head] @ value_bias[head]`` over the removed heads, for the kept output rows.

        A removed head is constant or read by no kept output through a non-zero weight, so adding
        its value bias times its weights is exact for both. float64 on ``out_weight``'s device;
        None when there is nothing to add.
        """
        removed = torch.ones(self.count, dtype=torch.bool)
        removed[kept_heads] = False
        if self.value_bias is None or not bool(removed.any()):
            return None
        columns = feature_index(removed.nonzero().reshape(-1), self.head_dim)
        rows = out_weight if kept_out is None else out_weight[kept_out]
        extra = rows[:, columns].to(torch.float64) @ self.value_bias[columns].to(out_weight.device)
        return extra if bool(extra.any()) else None
