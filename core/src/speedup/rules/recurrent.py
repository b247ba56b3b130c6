"""``nn.LSTM``, ``nn.GRU`` and ``nn.RNN``: input features go; hidden units stay.

Every step reads the input only through the first layer's ``W_ih x_t + b_ih`` (one per direction),
so an input feature (the input's last dimension) whose columns there are zero is not needed, and one
holding a constant ``v`` is ``W_ih[:, c] v`` added to ``b_ih`` (where the layer has biases). Hidden
units feed each other through ``W_hh`` at every step and keep their size; so do the steps. Batch
entries pass through to the returned sequence and states, and come from the initial states.

A packed sequence (``pack_padded_sequence``) holds the steps of every sequence as rows: its features
pass through the packing and go likewise, while its rows, the batch and the returned sequence keep
their size.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..graph import Node, TensorValue
from ..propagation import Analysis
from ..replacement import ModulePlan, masked_entries
from ..rule import ModuleRule, OpRule
from ._maps import DescribedByMaps, DimMap
from .toolkit import NonzeroPattern, added_to_bias, clone_module, demand_computed, foldable


class RecurrentRule(ModuleRule):
    lazy_masks = True  # reads parameters through the node's values and the plan only
    subclasses = True

    def couple(self, node: Node, ctx: Analysis) -> None:
        layout = _layout(node)
        if layout is None:
            return  # a packed sequence: every dimension keeps its size
        x, batch, states = layout
        for name in _first_layer_inputs(node):
            ctx.link(x, -1, node.params[name], 1)
        if batch is None:
            return
        for i, out in enumerate(node.outputs):
            ctx.link(x, batch, out, _batch_dim(i, batch))
        for state in states:
            ctx.link(x, batch, state, 1)

    def backward(self, node: Node, ctx: Analysis) -> None:
        layout = _layout(node)
        if layout is None:
            return super().backward(node, ctx)
        x, batch, states = layout
        demanded = [out for out in node.outputs if ctx.is_demanded(out)]
        if not demanded:
            return
        masks: dict[int, torch.Tensor] = {}
        if batch is not None:
            masks[batch] = torch.stack([ctx.demanded(out, _batch_dim(i, batch)) for i, out in enumerate(node.outputs)
                                        if ctx.is_demanded(out)]).any(0)
        read = torch.zeros(x.shape[-1], dtype=torch.bool)
        for name in _first_layer_inputs(node):
            pattern = NonzeroPattern.of(ctx, node.params[name])
            read |= pattern.columns_read_by(torch.ones(pattern.rows.numel(), dtype=torch.bool))
        folds = foldable(ctx, node, x, -1) if node.module.bias else _zero(ctx, x)
        masks[x.ndim - 1] = read & ~folds
        ctx.demand(x, masks)
        for state in states:
            ctx.demand(state, {1: masks[batch]} if batch is not None else None)

    def replace(self, module: nn.Module, plan: ModulePlan) -> nn.Module:
        x = _layout(plan.calls[0])[0]
        if plan.kept(x, -1) is None:
            return module
        names = [name for name in module._flat_weights_names if name.startswith(("weight_ih_l0", "bias_ih_l0"))]
        new = clone_module(module)
        new.__dict__["_flat_weights"] = list(module._flat_weights)  # nn.RNNBase keeps it in step with setattr
        removed, values = plan.removed_input_constants(-1, value=x) if plan.may_fold(-1, value=x) else (None, None)
        for name in names:
            if name.startswith("weight"):
                setattr(new, name, plan.param(name))
                continue
            extra = None
            if removed is not None and bool((values != 0).any()):
                used = values != 0
                weight = masked_entries(plan.param_value(name.replace("bias", "weight")), [None, removed[used]])
                extra = weight.to(torch.float64) @ values[used].to(weight.device)
            setattr(new, name, added_to_bias(plan.param(name), extra, getattr(module, name)))
        new.input_size = plan.count(x, -1)
        return new


def _layout(node: Node) -> Optional[tuple[TensorValue, Optional[int], list[TensorValue]]]:
    """The input (a packed sequence's rows), its batch dimension (None unbatched or packed) and the
    initial states given; None for an input of another kind."""
    x = node.args[0] if node.args else None
    packed = isinstance(x, tuple) and len(x) == 4 and all(isinstance(part, TensorValue) for part in x[:2])
    if packed:  # a PackedSequence: rows, batch sizes, sorted and unsorted indices
        parts, x = {id(part) for part in x}, x[0]
    elif not isinstance(x, TensorValue):
        return None
    batch = None if x.ndim == 2 else (0 if node.module.batch_first else 1)
    params = {id(p) for p in node.params.values()}
    states = [v for v in node.inputs if v is not x and id(v) not in params and not (packed and id(v) in parts)]
    return x, batch, states


def _batch_dim(output: int, batch: int) -> int:
    """The batch dimension of the returned sequence (the input's), then of the states (always 1)."""
    return batch if output == 0 else 1


def _first_layer_inputs(node: Node) -> list[str]:
    return [name for name in ("weight_ih_l0", "weight_ih_l0_reverse") if name in node.params]


def _zero(ctx: Analysis, x: TensorValue) -> torch.Tensor:
    consts = ctx.const(x, -1)
    return consts.zero if consts is not None else torch.zeros(x.shape[-1], dtype=torch.bool)


class PackedRows(DescribedByMaps, OpRule):
    """``_pack_padded_sequence(x, lengths, batch_first)``: the steps of every sequence become the rows
    of the packed data, each with its features as ``x`` has them."""

    def maps(self, node: Node) -> list[DimMap]:
        x, rows = node.args[0], node.outputs[0]
        return [DimMap(x, d, rows, d - 1) for d in range(2, x.ndim)]

    def backward(self, node: Node, ctx: Analysis) -> None:
        super().backward(node, ctx)
        if ctx.is_demanded(node.outputs[0]):
            demand_computed(ctx, node.args[1])


def register(registry) -> None:
    for module_type in (nn.LSTM, nn.GRU, nn.RNN):
        registry.add_module(module_type, RecurrentRule())
    registry.add_op("aten._pack_padded_sequence", PackedRows())
