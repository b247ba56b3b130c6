"""Folding each BatchNorm into the convolution before it, for inference (opt-in, after a speedup).

A BatchNorm in eval mode is a per-channel affine map ``y = s * x + t`` with
``s = weight / sqrt(running_var + eps)`` and ``t = bias - running_mean * s``. Right after a
convolution, the convolution can compute it: ``W' = s * W`` (per output channel), ``b' = s * b + t``.
The network then runs one layer instead of two per pair, a sizeable share of a pruned CNN's time
on a CPU. The BatchNorm is gone afterwards (an ``nn.Identity`` takes its place), so the model no
longer trains as before: fold for deployment, after any fine-tuning.

This is a separate step, not part of :func:`speedup.shrink`: the engine knows no operator, and
folding changes what ``model.train()`` means.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from .cloning import clone_module
from .engine import _compare, _trace_error, split_inputs
from .errors import VerificationError
from .graph import Graph, Node, NodeKind
from .parametrized import frozen_twin
from .plugins.manager import loaded_plugins
from .replacement import registered_places
from .tracer import TracingFailed, ordinary_mode, trace
from .transaction import Transaction
from .wrappers import eager_model


@ordinary_mode()
def fold_batchnorm(model: nn.Module, example_inputs: Any) -> list[tuple[str, str]]:
    """Folds, in place, every BatchNorm that alone reads a convolution's output into that convolution.

    :param model: the model (sped up or not); changed in place, or left as it was on any error.
    :param example_inputs: as for :func:`speedup.shrink`; the model is run on them to find the pairs
        and, after folding, to check that its outputs did not change.
    :returns: the ``(convolution, batchnorm)`` names that were folded.
    """
    args, kwargs = split_inputs(example_inputs)
    model = eager_model(model)
    flags = {id(m): m.training for m in model.modules()}
    tx = Transaction()
    try:
        model.eval()
        try:
            recorded = trace(model, args, kwargs, lambda m: isinstance(m, (_ConvNd, _BatchNorm)))
        except TracingFailed as failure:
            raise _trace_error(failure, args, kwargs) from failure.error
        places = registered_places(model)
        pairs = _pairs(recorded.graph, places)
        for conv, norm in pairs:
            _fold(conv.module, norm.module, places, tx)
        with torch.no_grad():
            difference, _ = _compare(recorded.output, model(*args, **kwargs), loaded_plugins().registry.is_state)
        if difference is not None:
            raise VerificationError(f"folding BatchNorm changed the outputs ({difference}); the model was left unchanged")
    except BaseException:
        tx.rollback()
        raise
    finally:
        for module in model.modules():
            module.training = flags.get(id(module), flags[id(model)])
    return [(conv.scope, norm.scope) for conv, norm in pairs]


def _pairs(graph: Graph, places: dict) -> list[tuple[Node, Node]]:
    """(convolution, BatchNorm) calls where the BatchNorm is the only reader of the convolution's output.

    Both must be called once and registered under one name, so that folding changes nothing else.
    """
    pairs = []
    for node in graph.nodes:
        if node.kind is not NodeKind.MODULE or not _foldable_norm(node.module):
            continue
        x = node.inputs[0] if node.inputs else None
        conv = x.producer if x is not None else None
        if (conv is None or conv.kind is not NodeKind.MODULE or not isinstance(conv.module, _ConvNd)
                or conv.module.transposed or x.is_output or x.consumers != [node]):
            continue
        once = all(len(graph.module_calls[n.scope]) == 1 and len(places.get(id(n.module), [])) == 1
                   for n in (conv, node))
        if once:
            pairs.append((conv, node))
    return pairs


def _foldable_norm(module: nn.Module) -> bool:
    return isinstance(module, _BatchNorm) and module.running_mean is not None and module.running_var is not None


def _fold(old: _ConvNd, bn: _BatchNorm, places: dict, tx: Transaction) -> None:
    with torch.no_grad():
        scale = bn.running_var.double().add(bn.eps).rsqrt()
        if bn.weight is not None:
            scale = scale * bn.weight.double()
        shift = -bn.running_mean.double() * scale
        if bn.bias is not None:
            shift = shift + bn.bias.double()
        per_row = scale.reshape(-1, *([1] * (old.weight.dim() - 1)))
        twin = frozen_twin(old)  # a parametrized weight (weight norm) is folded as computed
        new = twin.module if twin is not None else clone_module(old)
        new.weight = nn.Parameter((old.weight.double() * per_row).to(old.weight.dtype), old.weight.requires_grad)
        bias = old.bias.double() if old.bias is not None else torch.zeros_like(scale)
        new.bias = nn.Parameter((bias * scale + shift).to(old.weight.dtype), old.weight.requires_grad)
        kernel = old._buffers.get("constant_kernel")
        if kernel is not None:  # a FoldedConv: its map of removed constants is scaled too
            new.constant_kernel = (kernel.double() * per_row).to(kernel.dtype)
            new.__dict__["_constant_cache"] = {}
    for module, replacement in ((old, new), (bn, nn.Identity())):
        parent, attr = places[id(module)][0]
        tx.set_attr(parent, attr, replacement)
