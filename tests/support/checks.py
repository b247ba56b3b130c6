"""How every speedup test checks its result: equal to the masked model on a fresh input, and smaller.

``check_speedup`` builds the masked model independently of the engine (``speedup.testing.masked_copy``),
speeds the original up, compares both on a *fresh* input (never the dummy), and asserts that what
should shrink did.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import nn

import speedup
from speedup.testing import assert_same_outputs, masked_copy, parameter_count


def keep_mask(n: int, keep: float = 0.5, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A random boolean mask over ``n`` channels keeping ``round(n * keep)`` of them (at least one)."""
    count = max(1, round(n * keep))
    order = torch.randperm(n, generator=generator)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[:count]] = True
    return mask


def rows(mask: torch.Tensor, shape: tuple) -> torch.Tensor:
    """A parameter mask of ``shape`` keeping the rows (dimension 0) where ``mask`` is True."""
    return mask.reshape(-1, *([1] * (len(shape) - 1))).expand(shape)


def output_channel_masks(model: nn.Module, names: Iterable[str], keep: float = 0.5, seed: int = 0,
                         with_bias: bool = True) -> dict:
    """Masks removing a random ``1 - keep`` of the output channels of each named conv/linear."""
    generator = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    masks = {}
    for name in names:
        module = modules[name]
        mask = keep_mask(module.weight.shape[0], keep, generator)
        masks[name] = {"weight": rows(mask, tuple(module.weight.shape))}
        if with_bias and getattr(module, "bias", None) is not None:
            masks[name]["bias"] = mask
    return masks


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Gives BatchNorm layers non-trivial statistics and shifts, so masked channels carry non-zero
    constants that must be folded, not dropped."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._NormBase) and module.running_mean is not None:
                module.running_mean.copy_(torch.rand(module.running_mean.shape, generator=generator) - 0.5)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
            if isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
                if getattr(module, "weight", None) is not None:
                    module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
                if getattr(module, "bias", None) is not None:
                    module.bias.copy_(torch.rand(module.bias.shape, generator=generator) - 0.5)
    return model


def check_speedup(
    model: nn.Module,
    masks: Any,
    dummy: Any,
    fresh: Any,
    shrunk: Iterable[str] = (),
    max_param_ratio: Optional[float] = None,
    **shrink_options: Any,
) -> speedup.ShrinkReport:
    """Speeds ``model`` up in place and checks it against the masked model.

    :param fresh: an input different from ``dummy`` (new values, possibly another batch size).
    :param shrunk: parameter names (``"conv1.weight"``) whose size must have decreased.
    :param max_param_ratio: if given, parameters after / before must be at most this.
    """
    model.eval()
    reference = masked_copy(model, masks).eval()
    before = {name: tuple(p.shape) for name, p in _all_parameters(model)}
    params_before = parameter_count(model)
    report = speedup.shrink(model, masks, dummy, **shrink_options)
    assert_same_outputs(reference, model, fresh)
    after = {name: tuple(p.shape) for name, p in _all_parameters(model)}
    for name in shrunk:
        assert name in after, f"{name} is gone from the sped-up model (it has {sorted(after)[:8]}...)"
        assert _numel(after[name]) < _numel(before[name]), f"{name} did not shrink: {before[name]} -> {after[name]}"
    if max_param_ratio is not None:
        ratio = parameter_count(model) / params_before
        assert ratio <= max_param_ratio, f"parameters fell only to {ratio:.1%} (expected at most {max_param_ratio:.0%})"
    return report


def _all_parameters(model: nn.Module):
    yield from model.named_parameters()
    yield from model.named_buffers()


def _numel(shape: tuple) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def state_and_structure(model: nn.Module) -> tuple:
    """Everything that must be unchanged after a failed speedup: parameters, buffers, module tree."""
    state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    identities = {k: id(v) for k, v in model.state_dict(keep_vars=True).items()}
    structure = [(name, type(module), id(module)) for name, module in model.named_modules()]
    flags = [(name, module.training) for name, module in model.named_modules()]
    hooks = [(name, len(module._forward_hooks), len(module._forward_pre_hooks)) for name, module in model.named_modules()]
    return state, identities, structure, flags, hooks


def assert_unchanged(model: nn.Module, snapshot: tuple) -> None:
    state, identities, structure, flags, hooks = snapshot
    now_state, now_ids, now_structure, now_flags, now_hooks = state_and_structure(model)
    assert now_structure == structure, "the module tree changed"
    assert now_ids == identities, "parameter or buffer objects were replaced"
    assert now_flags == flags, "train/eval flags changed"
    assert now_hooks == hooks, "hooks were left on the model"
    assert state.keys() == now_state.keys()
    for key in state:
        assert torch.equal(state[key], now_state[key]), f"{key} changed"
