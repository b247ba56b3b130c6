"""``nn.Linear``: ``y = x W^T + b`` over the last dimension.

An output feature whose weight row touches only zero or constant inputs is a constant
(``b[o]``, plus the folded constants). An input feature is needed only where some needed output
reads it through a non-zero weight and it is not a constant the layer can fold into its bias.

The rule is written for either weight orientation (``weight_in`` / ``weight_out``), so that layers
storing the weight transposed (GPT-2's ``Conv1D``) reuse it by subclassing.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..graph import Node, TensorValue
from ..propagation import Analysis
from ..replacement import ModulePlan, masked_entries
from ..rule import DimConst, ModuleRule
from ._maps import DimMap, forward_zeros
from .toolkit import NonzeroPattern, added_to_bias, clone_module, first_input, foldable


class ActivationMaskedLinear(nn.Module):
    """``linear(x, W * M, b * m)`` computed as ``linear(x * kept_columns, W) * kept_rows + b * m`` for a
    mask ``M`` that is rows times columns: the weight is read as it is (a view of the module's), so
    recording a masked layer makes no masked copy of it (see :meth:`~speedup.rule.ModuleRule.masked_forward`)."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], rows, columns, bias_kept):
        super().__init__()
        self.weight, self.bias = weight, bias
        self.rows, self.columns, self.bias_kept = rows, columns, bias_kept

    @classmethod
    def part(cls, weight, bias, weight_mask, bias_mask, rows: slice = slice(None)) -> "ActivationMaskedLinear":
        """The rows ``rows`` of a (possibly fused) projection, masked by these patterns (None: unmasked)."""
        kept_rows = weight_mask.kept(0)[rows] if weight_mask is not None else None
        columns = weight_mask.kept(1) if weight_mask is not None else None
        bias_kept = bias_mask.kept(0)[rows] if bias_mask is not None else None
        bias = bias.detach()[rows] if bias is not None else None
        return cls(weight.detach()[rows], bias, kept_rows, columns, bias_kept)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.columns is not None:
            x = x * self.columns.to(x)
        bias = self.bias
        if bias is not None and self.bias_kept is not None:
            bias = bias * self.bias_kept.to(bias)
        # The bias is added inside the product, as the masked layer adds it: the kept rows round
        # as the masked model's do (in bfloat16 a separate addition differed by 2% after a few layers).
        out = _folded_linear(x, self.weight, bias)  # a new tensor: rows are masked in place
        if self.rows is not None:
            rows = self.rows.to(out)
            out.mul_(rows)
            if bias is not None:
                out.add_(bias * (1 - rows))  # a masked row gives its bias
        return out


def _folded_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` as one matrix product over all leading dimensions of ``x``.

    torch's matmul folds them into one only when the weight requires grad or they are laid out
    contiguously; a detached weight on a transposed input (``nn.MultiheadAttention`` with
    ``batch_first``) would run one matrix-vector product per position, several times slower."""
    if x.dim() <= 2:
        return F.linear(x, weight, bias)
    return F.linear(x.reshape(-1, x.shape[-1]), weight, bias).reshape(*x.shape[:-1], weight.shape[0])


class LinearRule(ModuleRule):
    lazy_masks = True  # reads parameters through the node's values and the plan only
    subclasses = True
    weight_in = 1
    """The weight dimension that reads input features (1 for ``nn.Linear``'s ``(out, in)`` weight)."""

    @property
    def weight_out(self) -> int:
        return 1 - self.weight_in

    def couple(self, node: Node, ctx: Analysis) -> None:
        x, out = first_input(node), node.outputs[0]
        weight, bias = node.params["weight"], node.params.get("bias")
        for d in range(x.ndim - 1):
            ctx.link(x, d, out, d)
        ctx.link(x, -1, weight, self.weight_in)
        ctx.link(out, -1, weight, self.weight_out)
        if bias is not None:
            ctx.link(bias, 0, weight, self.weight_out)

    def _nonzero(self, node: Node, ctx: Analysis) -> NonzeroPattern:
        """Which weights are not zero, as ``(out_features, in_features)``."""
        return NonzeroPattern.of(ctx, node.params["weight"], self.weight_out)

    def as_out_in(self, weight: torch.Tensor) -> torch.Tensor:
        return weight if self.weight_in == 1 else weight.t()

    def forward(self, node: Node, ctx: Analysis) -> None:
        x, out = first_input(node), node.outputs[0]
        bias = node.params.get("bias")
        _pass_zero_slices(ctx, x, out, bias)
        consts = ctx.const(x, -1)
        nonzero = self._nonzero(node, ctx)
        reads_variable = nonzero.rows if consts is None else nonzero.rows_reading(~consts.mask)
        if bool(reads_variable.all()):
            return
        n_out = reads_variable.numel()
        value = bias.host().to(torch.float64) if bias is not None else torch.zeros(n_out, dtype=torch.float64)
        if consts is not None and bool(consts.nonzero_const.any()):
            # Constant rows read constant inputs only: add their W[o, c] * v_c (those rows only).
            rows = (~reads_variable & nonzero.rows).nonzero().reshape(-1)  # constant rows that read constants
            if rows.numel():
                used = consts.nonzero_const.nonzero().reshape(-1)
                weight = self._out_in_entries(node.params["weight"], rows, used).cpu()
                value = value.clone()
                value[rows] += weight.to(torch.float64) @ consts.value[used]
        ctx.set_const(out, -1, DimConst.where(~reads_variable, value))

    def backward(self, node: Node, ctx: Analysis) -> None:
        x, out = first_input(node), node.outputs[0]
        if not ctx.is_demanded(out):
            return
        need_out = ctx.demanded(out, -1)
        read = self._nonzero(node, ctx).columns_read_by(need_out)
        masks = {d: ctx.demanded(out, d) for d in range(x.ndim - 1)}
        masks[x.ndim - 1] = read & ~foldable(ctx, node, x, -1)
        ctx.demand(x, masks)

    def masked_forward(self, module: nn.Module, masks: dict) -> Optional[Callable[..., torch.Tensor]]:
        """``linear(x * kept_columns, W) * kept_rows + b`` for a weight losing rows times columns: the
        masked layer's output without a masked copy of its weight (the bias is masked in the model)."""
        pattern = masks.get("weight")
        if set(masks) != {"weight"} or not pattern.separable or type(module).forward is not nn.Linear.forward:
            return None
        return ActivationMaskedLinear.part(module.weight, module.bias, pattern, None).forward

    def replace(self, module: nn.Module, plan: ModulePlan) -> nn.Module:
        new = clone_module(module)
        new.weight = plan.param("weight")
        new.bias = self.folded_bias(plan, module)
        self.set_sizes(new, new.weight.shape[self.weight_in], new.weight.shape[self.weight_out])
        return new

    def set_sizes(self, new: nn.Module, in_features: int, out_features: int) -> None:
        new.in_features, new.out_features = in_features, out_features

    def folded_bias(self, plan: ModulePlan, module: nn.Module):
        """The sliced bias plus ``W[:, c] * v_c`` for every removed constant input feature ``c``."""
        bias = plan.param("bias")
        if not plan.may_fold(-1):
            return bias
        removed, values = plan.removed_input_constants(-1)
        used = values != 0
        if not bool(used.any()):
            return bias
        columns = self._out_in_entries(plan.param_value("weight"), plan.kept(plan.output(), -1), removed[used])
        return added_to_bias(bias, columns.to(torch.float64) @ values[used].to(columns.device), module.weight)

    def _out_in_entries(self, weight: TensorValue, rows: Optional[torch.Tensor], columns: torch.Tensor) -> torch.Tensor:
        """``W[rows][:, columns]`` as ``(out, in)``, the masked model's values, on the weight's device:
        reads and masks only those entries (a masked copy of a large weight costs a pass over it)."""
        kept: list = [None, None]
        kept[self.weight_out], kept[self.weight_in] = rows, columns
        return self.as_out_in(masked_entries(weight, kept))


def _pass_zero_slices(ctx: Analysis, x: TensorValue, out: TensorValue, bias: Optional[TensorValue]) -> None:
    """Zero slices of the input along a leading dimension (the channels of patches whose taps a Linear
    mixes) are zero slices of the output where no bias is added."""
    if bias is None or not bool(bias.host().any()):
        forward_zeros(ctx, [DimMap(x, d, out, d) for d in range(x.ndim - 1)])


def register(registry) -> None:
    registry.add_module(nn.Linear, LinearRule())
    registry.add_sizes(nn.Linear, _linear_sizes)  # a subclass traced through keeps its sizes in step


def _linear_sizes(module: nn.Module) -> dict[str, int]:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return {}
    return {"in_features": weight.shape[1], "out_features": weight.shape[0]}
