"""Fake quantization (quantization-aware training: ``torch.ao``'s ``FakeQuantize`` and its fused
moving-average form, learnable scales).

Each entry is rounded onto a grid and mapped back: one grid for the whole tensor, or one per channel
along ``axis`` (its scale and zero point read at that channel). Entries do not mix, so every
dimension passes through (the scale and zero point follow the channels along ``axis``). Constants
are found by running the operator on them with the call's own scale and zero point: a zero usually
stays zero (it maps to the zero point), and a constant along another dimension than ``axis`` stays
one only where every channel's grid gives it the same value. A call that observes its input (the
fused form with its observer on) sets its grid from the values it sees: it keeps everything.

A ``FakeQuantize`` module's observer is not called while it is off, so the trace never sees its
per-channel statistics; they follow the module's ``scale`` (registered as its companions), which
``torch.ao.quantization.convert`` and further training compute from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from ..graph import Node, TensorValue
from ..propagation import Analysis
from ..rule import DimConst, OpRule, bind
from .toolkit import demand_computed


@dataclass
class _Grid:
    """A fake-quantizing call as a plain one: ``quantize(values, *operands)`` (operands after the input,
    as the operator takes them; an axis given as the first integer after scale and zero point)."""

    x: TensorValue
    axis: Optional[int]
    per_channel: list
    """The tensors the call reads one entry of per channel along ``axis`` (its scale and zero point, the
    fused form's running minimum and maximum too): they follow the channels."""
    quantize: Callable[..., Any]
    operands: list


def _grid(node: Node) -> Optional[_Grid]:
    args = bind(node)
    x = args["self"]
    if node.target._opname != "_fused_moving_avg_obs_fq_helper":
        axis = args.get("axis")
        axis = axis % x.ndim if axis is not None else None
        return _Grid(x, axis, _per_channel(x, axis, [args["scale"], args["zero_point"]]), node.target,
                     list(node.args[1:]))
    observing, enabled = args["observer_on"].host(), args["fake_quant_on"].host()
    if observing is None or enabled is None or bool(observing.any()):
        return None
    scale, zero_point, low, high = args["scale"], args["zero_point"], args["quant_min"], args["quant_max"]
    axis = args["ch_axis"] % x.ndim if args.get("per_row_fake_quant", False) else None
    per_channel = _per_channel(x, axis, [args["running_min"], args["running_max"], scale, zero_point])
    if not bool(enabled.any()):
        return _Grid(x, axis, per_channel, lambda values, *_: values, [])
    if axis is not None:
        return _Grid(x, axis, per_channel, torch.fake_quantize_per_channel_affine, [scale, zero_point, axis, low, high])
    return _Grid(x, None, per_channel, torch.fake_quantize_per_tensor_affine, [scale, zero_point, low, high])


def _per_channel(x: TensorValue, axis: Optional[int], operands: list) -> list[TensorValue]:
    """Those of ``operands`` with one entry per channel of ``x`` along ``axis``."""
    if axis is None:
        return []
    return [t for t in operands if isinstance(t, TensorValue) and t.ndim == 1 and t.shape[0] == x.shape[axis] > 1]


class FakeQuantize(OpRule):
    """``fake_quantize_per_tensor_affine`` and ``fake_quantize_per_channel_affine`` in their forms (with
    a mask of the entries in range, with learnable scales, fused with a moving-average observer)."""

    def couple(self, node: Node, ctx: Analysis) -> None:
        grid = _grid(node)
        if grid is None:
            return
        x = grid.x
        for out in node.outputs:
            if out.shape == x.shape:
                for d in range(x.ndim):
                    ctx.link(x, d, out, d)
        for channels in grid.per_channel:
            ctx.link(channels, 0, x, grid.axis)

    def forward(self, node: Node, ctx: Analysis) -> None:
        grid = _grid(node)
        if grid is None:
            return
        operands = [a.host() if isinstance(a, TensorValue) else a for a in grid.operands]
        if any(o is None for o in operands):
            return  # a scale computed during the call: nothing known
        x = grid.x
        for d in range(x.ndim):
            consts = ctx.const(x, d)
            if consts is None or not bool(consts.mask.any()):
                continue
            value = _quantized(grid, consts.value.to(x.dtype), operands, d)
            ctx.set_const(node.outputs[0], d, DimConst.where(consts.mask & torch.isfinite(value), value))

    def backward(self, node: Node, ctx: Analysis) -> None:
        grid = _grid(node)
        if grid is None:
            return super().backward(node, ctx)
        x = grid.x
        demanded = [out for out in node.outputs if out.shape == x.shape and ctx.is_demanded(out)]
        if not demanded:
            return
        need = {d: torch.stack([ctx.demanded(out, d) for out in demanded]).any(0) for d in range(x.ndim)}
        ctx.demand(x, need)
        for operand in grid.per_channel:
            demand_computed(ctx, operand, {0: need[grid.axis]})
        for operand in grid.operands:
            if not any(operand is channels for channels in grid.per_channel):
                demand_computed(ctx, operand)


def _quantized(grid: _Grid, values: torch.Tensor, operands: list, d: int) -> torch.Tensor:
    """What the call makes of the constants of dimension ``d``: NaN where that is not one value."""
    n = values.numel()
    try:
        if grid.axis is None:
            result = grid.quantize(values, *operands)
        elif d == grid.axis:  # one entry per channel: its own grid
            result = grid.quantize(values, *operands[:2], 0, *operands[3:])
        else:  # the same constant in every channel: constant where every grid gives one value
            channels = operands[0].numel()
            spread = grid.quantize(values[:, None].expand(n, channels).contiguous(), *operands[:2], 1, *operands[3:])
            spread = spread[0] if isinstance(spread, (tuple, list)) else spread
            result = torch.where((spread == spread[:, :1]).all(1), spread[:, 0], float("nan"))
    except (RuntimeError, TypeError, ValueError):
        return torch.full((n,), float("nan"), dtype=torch.float64)
    result = result[0] if isinstance(result, (tuple, list)) else result
    return result.to(torch.float64).reshape(-1)


def register(registry) -> None:
    registry.add_ops(["aten.fake_quantize_per_tensor_affine", "aten.fake_quantize_per_tensor_affine_cachemask",
                      "aten._fake_quantize_per_tensor_affine_cachemask_tensor_qparams",
                      "aten._fake_quantize_learnable_per_tensor_affine", "aten.fake_quantize_per_channel_affine",
                      "aten.fake_quantize_per_channel_affine_cachemask",
                      "aten._fake_quantize_learnable_per_channel_affine", "aten._fused_moving_avg_obs_fq_helper"],
                     FakeQuantize())
    registry.add_companions("torch.ao.quantization.fake_quantize.FakeQuantize", observer_statistics)


def observer_statistics(module) -> dict[str, str]:
    """The per-channel statistics of a fake-quantize module's observer, which follow its ``scale``."""
    observer = getattr(module, "activation_post_process", None)
    return {f"activation_post_process.{name}": "scale" for name in ("min_val", "max_val")
            if isinstance(getattr(observer, name, None), torch.Tensor)}
