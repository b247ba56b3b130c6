"""Helpers to test a speedup (used by speedup's own tests, and for plugin authors' tests).

The contract is equality with the *masked* model: the original model with every masked parameter
multiplied by its mask (and input/output masks applied). :func:`masked_copy` builds that model,
independently of the engine, and :func:`assert_same_outputs` compares on a fresh input.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from . import tensor_masks
from .engine import closeness, split_inputs
from .masks import MaskSource, load_masks
from .plugins.manager import loaded_plugins
from .parametrized import freeze_parametrized
from .transaction import Transaction
from .tracer import iter_tensors
from .wrappers import eager_model


def masked_copy(model: nn.Module, masks: MaskSource) -> nn.Module:
    """A deep copy of ``model`` with its masks applied the simple way: parameters multiplied by their
    masks, input/output masks hooked in (with the hooks ``speedup`` itself uses, so that an input mask
    named after a ``forward`` argument means the same thing in both). A parametrized tensor (weight
    norm) is masked as computed: the copy holds it plain, as ``speedup`` sees it."""
    # A tensor attribute computed with autograd (the old weight norm's ``weight``) cannot be deep-copied.
    model = eager_model(model)
    computed = {id(t): t.detach().clone() for m in model.modules() for t in m.__dict__.values()
                if isinstance(t, torch.Tensor) and not t.is_leaf}
    masked = copy.deepcopy(model, computed)
    freeze_parametrized(masked, Transaction())
    checked = load_masks(masks, masked)
    with torch.no_grad():
        for name, mask in checked.parameters.items():
            tensor = checked.masked[name]
            tensor.mul_(mask.to(tensor.dtype))
    tensor_masks.install(masked, checked.tensors, Transaction())
    return masked


def run(model: nn.Module, inputs: Any) -> Any:
    args, kwargs = split_inputs(inputs)
    with torch.no_grad():
        return model(*args, **kwargs)


def assert_same_outputs(reference: nn.Module, candidate: nn.Module, inputs: Any) -> float:
    """Asserts equal outputs (within float round-off) and equal shapes; returns the largest difference.

    State the models return to be given back to them (a key/value cache, see
    :meth:`~speedup.plugins.registry.RuleRegistry.add_state`) is not compared: its sizes follow the model.
    """
    is_state = loaded_plugins().registry.is_state
    expected = list(iter_tensors(run(reference, inputs), is_state))
    actual = list(iter_tensors(run(candidate, inputs), is_state))
    assert len(expected) == len(actual), f"{len(actual)} outputs instead of {len(expected)}"
    worst = 0.0
    for i, (a, b) in enumerate(zip(expected, actual)):
        assert a.shape == b.shape, f"output {i}: shape {tuple(b.shape)} instead of {tuple(a.shape)}"
        if not a.is_floating_point():
            assert torch.equal(a, b), f"output {i} differs"
            continue
        close, difference = closeness(a, b)
        assert close, f"output {i} differs by up to {difference:.3g} (scale {float(a.abs().max()):.3g})"
        worst = max(worst, difference)
    return worst


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
