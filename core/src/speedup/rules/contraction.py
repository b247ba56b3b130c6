"""Contractions: matrix products and scaled-dot-product attention.

A contracted dimension is a sum: an entry where either operand is zero contributes nothing, so it
is needed by neither operand (the seed's indirect sparsity ``C = A x B``). The operands' entries
along it are tied, so they go together. In attention, heads are independent: a head of the
output depends only on the same head of ``q``, ``k`` and ``v`` (for grouped-query attention, on
the key/value group it reads), and a head whose values are constant outputs that constant.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from ..graph import Node, TensorValue
from ..propagation import Analysis
from ..rule import DimConst, OpRule, bind
from .toolkit import same_along


def _zero(ctx: Analysis, x: TensorValue, dim: int) -> torch.Tensor:
    consts = ctx.const(x, dim)
    return consts.zero if consts is not None else torch.zeros(x.shape[dim], dtype=torch.bool)


class MatMul(OpRule):
    """``mm``, ``bmm``, ``addmm``, ``baddbmm``: ``out[..., m, n] = sum_k a[..., m, k] b[..., k, n]``, and ``mv``,
    ``addmv``: ``out[m] = sum_k a[m, k] b[k]``; plus ``beta`` times a bias where there is one."""

    def _operands(self, node: Node) -> tuple[Optional[TensorValue], TensorValue, TensorValue, TensorValue, float]:
        a = bind(node)
        has_bias = "mat1" in a or "batch1" in a or "vec" in a and "mat" in a and "self" in a
        x = a.get("mat1", a.get("batch1", a.get("mat", a.get("self"))))
        w = a.get("mat2", a.get("batch2", a.get("vec")))
        return a.get("self") if has_bias else None, x, w, node.outputs[0], a.get("beta", 1)

    def couple(self, node: Node, ctx: Analysis) -> None:
        bias, x, w, out, _ = self._operands(node)
        batch = x.ndim - 2
        for d in range(batch):
            ctx.link(x, d, out, d)
            ctx.link(w, d, out, d)
        ctx.link(x, -2, out, batch)
        if w.ndim > batch + 1:  # a matrix, not a vector
            ctx.link(w, -1, out, -1)
        ctx.link(x, -1, w, batch)
        if isinstance(bias, TensorValue):
            offset = out.ndim - bias.ndim
            for d in range(bias.ndim):
                if bias.shape[d] == out.shape[d + offset]:
                    ctx.link(bias, d, out, d + offset)

    def forward(self, node: Node, ctx: Analysis) -> None:
        bias, x, w, out, beta = self._operands(node)
        batch = x.ndim - 2
        # A matrix of the batch (a head of attention) that is zero in either operand gives zeros.
        zeros = [(d, _zero(ctx, x, d) | _zero(ctx, w, d)) for d in range(batch)] + [(batch, _zero(ctx, x, -2))]
        if w.ndim > batch + 1:
            zeros.append((out.ndim - 1, _zero(ctx, w, -1)))
        for d, zero in zeros:
            value = torch.zeros(out.shape[d], dtype=torch.float64)
            mask = zero.clone()
            if isinstance(bias, TensorValue):
                bias_const = _broadcast_const(ctx, bias, out, d)
                if bias_const is None:
                    continue
                mask &= bias_const.mask
                value = bias_const.value * float(beta)
            ctx.set_const(out, d, DimConst.where(mask, value))

    def backward(self, node: Node, ctx: Analysis) -> None:
        bias, x, w, out, _ = self._operands(node)
        if not ctx.is_demanded(out):
            return
        batch_dims = x.ndim - 2
        contracted = ~(_zero(ctx, x, -1) | _zero(ctx, w, batch_dims))
        batch = {d: ctx.demanded(out, d) for d in range(batch_dims)}
        ctx.demand(x, {**batch, x.ndim - 2: ctx.demanded(out, batch_dims), x.ndim - 1: contracted})
        columns = {w.ndim - 1: ctx.demanded(out, -1)} if w.ndim > batch_dims + 1 else {}
        ctx.demand(w, {**batch, batch_dims: contracted, **columns})
        if isinstance(bias, TensorValue):
            offset = out.ndim - bias.ndim
            ctx.demand(bias, {d: ctx.demanded(out, d + offset) for d in range(bias.ndim) if bias.shape[d] == out.shape[d + offset]})


class PairwiseDistance(OpRule):
    """``cdist`` (``_cdist_forward(x1, x2, p)``, or ``_euclidean_dist`` for many rows): ``out[..., i, j]``
    is the ``p``-norm of ``x1[..., i, :] - x2[..., j, :]``, a nearest-codebook lookup (VQ-VAE) or a
    prototype classifier. A feature zero in both operands adds nothing to any distance: it may go from
    both at once, and the rows of each pass to the result's."""

    def couple(self, node: Node, ctx: Analysis) -> None:
        x1, x2, out = node.args[0], node.args[1], node.outputs[0]
        for d in range(out.ndim - 2):
            if x1.shape[d] == out.shape[d] and x2.shape[d] == out.shape[d]:
                ctx.link(x1, d, out, d)
                ctx.link(x2, d, out, d)
        ctx.link(x1, -2, out, -2)
        ctx.link(x2, -2, out, -1)
        ctx.link(x1, -1, x2, -1)

    def backward(self, node: Node, ctx: Analysis) -> None:
        x1, x2, out = node.args[0], node.args[1], node.outputs[0]
        if not ctx.is_demanded(out):
            return
        features = ~(_zero(ctx, x1, -1) & _zero(ctx, x2, -1))
        batch = {d: ctx.demanded(out, d) for d in range(out.ndim - 2)
                 if x1.shape[d] == out.shape[d] and x2.shape[d] == out.shape[d]}
        ctx.demand(x1, {**batch, x1.ndim - 2: ctx.demanded(out, -2), x1.ndim - 1: features})
        ctx.demand(x2, {**batch, x2.ndim - 2: ctx.demanded(out, -1), x2.ndim - 1: features})


class GroupedMatMul(OpRule):
    """``_grouped_mm(a, b, offs)``: rows of ``a`` (S, K) in groups (``offs``), each times its own matrix of
    ``b`` (G, K, N): a mixture of experts' projection. ``K`` is contracted and ``N`` follows ``b``'s
    columns, as in ``mm``; the groups stay (the routing numbers them). With a batch of matrices on
    both sides (no ``offs``) it is ``bmm``. Other layouts (groups along ``K``) keep every entry."""

    def _operands(self, node: Node):
        a = bind(node)
        return a["self"], a["mat2"], a.get("bias"), node.outputs[0]

    def _understood(self, x: TensorValue, w: TensorValue) -> bool:
        return w.ndim == 3 and x.ndim in (2, 3)

    def couple(self, node: Node, ctx: Analysis) -> None:
        x, w, bias, out = self._operands(node)
        if not self._understood(x, w):
            for value in (x, w, out):
                for d in range(value.ndim):
                    ctx.pin(value, d)
            return
        if x.ndim == 3:
            ctx.link(x, 0, out, 0)
            ctx.link(w, 0, out, 0)
        else:
            ctx.pin(w, 0)
        ctx.link(x, -2, out, -2)
        ctx.link(x, -1, w, -2)
        ctx.link(w, -1, out, -1)
        if isinstance(bias, TensorValue):
            ctx.link(bias, -1, out, -1)
            for d in range(bias.ndim - 1):
                ctx.pin(bias, d)

    def forward(self, node: Node, ctx: Analysis) -> None:
        x, w, bias, out = self._operands(node)
        if not self._understood(x, w) or isinstance(bias, TensorValue):
            return
        for d, zero in ((out.ndim - 2, _zero(ctx, x, -2)), (out.ndim - 1, _zero(ctx, w, -1))):
            ctx.set_const(out, d, DimConst.where(zero, torch.zeros(out.shape[d], dtype=torch.float64)))

    def backward(self, node: Node, ctx: Analysis) -> None:
        x, w, bias, out = self._operands(node)
        if not ctx.is_demanded(out):
            return
        if not self._understood(x, w):
            for value in (x, w) + ((bias,) if isinstance(bias, TensorValue) else ()):
                ctx.demand_all(value)
            return
        contracted = ~(_zero(ctx, x, -1) | _zero(ctx, w, -2))
        batch = {0: ctx.demanded(out, 0)} if x.ndim == 3 else {}
        ctx.demand(x, {**batch, x.ndim - 2: ctx.demanded(out, -2), x.ndim - 1: contracted})
        ctx.demand(w, {**batch, 1: contracted, 2: ctx.demanded(out, -1)})
        if isinstance(bias, TensorValue):
            ctx.demand(bias, {bias.ndim - 1: ctx.demanded(out, -1)})


def _broadcast_const(ctx: Analysis, x: TensorValue, out: TensorValue, d: int) -> Optional[DimConst]:
    xd = d - (out.ndim - x.ndim)
    if xd >= 0 and x.shape[xd] == out.shape[d]:
        return ctx.const(x, xd)
    uniform = ctx.uniform(x)
    if uniform is None:
        return None
    n = out.shape[d]
    return DimConst(torch.ones(n, dtype=torch.bool), torch.full((n,), uniform, dtype=torch.float64))


class Attention(OpRule):
    """The ATen kernels behind ``F.scaled_dot_product_attention``.

    Layout ``q (..., Hq, L, E)``, ``k (..., Hk, S, E)``, ``v (..., Hk, S, Ev)`` -> ``(..., Hq, L, Ev)``.
    ``E`` may only shrink when the call passes ``scale`` (the default scale is ``1/sqrt(E)``).
    """

    rechecks_shapes = True

    def note(self, args: tuple, kwargs: dict, out: Any) -> bool:
        """Whether every head weighs the keys alike on the dummy input, whatever its queries: its keys
        are one token repeated (uniform weights), or its mask leaves each query at most one key."""
        key = args[1]
        mask = kwargs.get("attn_mask", args[3] if len(args) > 3 and isinstance(args[3], torch.Tensor) else None)
        if key.dim() >= 2 and same_along(key, [key.dim() - 2]):
            return True
        if mask is None:
            return False
        allowed = mask if mask.dtype == torch.bool else mask > -math.inf
        return allowed.numel() > 0 and int(allowed.sum(-1).max()) <= 1

    def hides_layout(self, node: Node) -> bool:
        key = bind(node)["key"]
        return key.shape[-2] == 1 or bool(node.note)  # one key: each query reads its value whatever the heads

    def _args(self, node: Node):
        a = bind(node)
        mask = a.get("attn_mask", a.get("attn_bias"))
        return a["query"], a["key"], a["value"], node.outputs[0], mask if isinstance(mask, TensorValue) else None, \
            a.get("scale") is not None

    def couple(self, node: Node, ctx: Analysis) -> None:
        q, k, v, out, mask, scaled = self._args(node)
        for d in range(q.ndim - 3):
            for x in (k, v, out):
                ctx.link(q, d, x, d)
        ctx.link(q, -3, out, -3)
        ctx.link(k, -3, v, -3)
        if q.shape[-3] == k.shape[-3]:
            ctx.link(q, -3, k, -3)
        else:
            self._couple_groups(ctx, q, k)
        ctx.link(q, -2, out, -2)
        ctx.link(k, -2, v, -2)
        if scaled:
            ctx.link(q, -1, k, -1)
        ctx.link(v, -1, out, -1)
        for extra in node.outputs[1:]:
            if extra.ndim == q.ndim - 1 and extra.shape == q.shape[:-1]:
                for d in range(extra.ndim):
                    ctx.link(q, d, extra, d)
        if mask is not None:
            target = q.shape[:-1] + (k.shape[-2],)
            offset = len(target) - mask.ndim
            for d in range(mask.ndim):
                source = (q if d + offset < q.ndim - 1 else k, d + offset if d + offset < q.ndim - 1 else k.ndim - 2)
                if mask.shape[d] == target[d + offset] and mask.shape[d] != 1:
                    ctx.link(mask, d, *source)

    def _couple_groups(self, ctx: Analysis, q: TensorValue, k: TensorValue) -> None:
        """Grouped-query: query head ``h`` reads key/value head ``h // g``: it exists only with its group."""
        heads, groups = q.shape[-3], k.shape[-3]
        q_atoms, kv_atoms = ctx.atoms(q, -3), ctx.atoms(k, -3)
        ctx.accept(q, -3)
        ctx.accept(k, -3)
        if q_atoms is None or kv_atoms is None or heads % groups:
            ctx.pin(q, -3)
            ctx.pin(k, -3)
            return
        per_group = heads // groups
        rank = ctx.fresh(per_group)
        h = torch.arange(heads)
        ctx.define(q_atoms, torch.stack([kv_atoms[h // per_group], rank[h % per_group]], 1))

    def forward(self, node: Node, ctx: Analysis) -> None:
        q, k, v, out, mask, scaled = self._args(node)
        heads = ctx.const(v, -3)
        if heads is not None and q.shape[-3] != k.shape[-3]:
            heads = heads.index(torch.arange(q.shape[-3]) // (q.shape[-3] // k.shape[-3]))
        ctx.set_const(out, -3, heads)
        ctx.set_const(out, -1, ctx.const(v, -1))

    def backward(self, node: Node, ctx: Analysis) -> None:
        q, k, v, out, mask, scaled = self._args(node)
        if not ctx.is_demanded(out):
            return
        batch = {d: ctx.demanded(out, d) for d in range(q.ndim - 3)}
        q_heads = ctx.demanded(out, -3)
        kv_heads = q_heads if q.shape[-3] == k.shape[-3] else q_heads.reshape(k.shape[-3], -1).any(1)
        features = ~(_zero(ctx, q, -1) | _zero(ctx, k, -1)) if scaled else torch.ones(q.shape[-1], dtype=torch.bool)
        ctx.demand(q, {**batch, q.ndim - 3: q_heads, q.ndim - 2: ctx.demanded(out, -2), q.ndim - 1: features})
        ctx.demand(k, {**batch, k.ndim - 3: kv_heads, k.ndim - 1: features})
        ctx.demand(v, {**batch, v.ndim - 3: kv_heads, v.ndim - 1: ctx.demanded(out, -1)})
        if mask is not None:
            ctx.demand(mask, _mask_demand(ctx, q, k, out, mask))


def _mask_demand(ctx: Analysis, q: TensorValue, k: TensorValue, out: TensorValue,
                 mask: TensorValue) -> dict[int, torch.Tensor]:
    """The entries of an attention mask the output needs: those of its needed batch entries, heads and
    query positions, every key position. A mask with one slice per head (T5 adds its position bias
    through it) then lets heads go: a removed head does not read its slice."""
    scores = q.shape[:-1] + (k.shape[-2],)  # the shape the mask broadcasts to
    offset = len(scores) - mask.ndim
    demand = {}
    for d in range(mask.ndim):
        s = d + offset
        if s < q.ndim - 1 and mask.shape[d] == scores[s] != 1:
            demand[d] = ctx.demanded(out, s)
    return demand


def register(registry) -> None:
    registry.add_ops(["aten.mm", "aten.bmm", "aten.addmm", "aten.baddbmm", "aten.mv", "aten.addmv"], MatMul())
    registry.add_op("aten._grouped_mm", GroupedMatMul())
    registry.add_ops(["aten._cdist_forward", "aten._euclidean_dist"], PairwiseDistance())
    registry.add_ops(
        ["aten._scaled_dot_product_flash_attention_for_cpu", "aten._scaled_dot_product_efficient_attention",
         "aten._scaled_dot_product_flash_attention", "aten._scaled_dot_product_attention_math",
         "aten._scaled_dot_product_cudnn_attention", "aten.scaled_dot_product_attention"],
        Attention(),
    )
