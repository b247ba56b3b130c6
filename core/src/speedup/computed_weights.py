"""Convolutions that compute the weight they apply in their own ``forward``, frozen for the call.

Weight standardisation (timm's ``StdConv2d`` and ``ScaledStdConv2d`` in BiT and NFNets, Hugging
Face's BiT) normalises each output row of the weight over its input channels and kernel taps at
every call. The masked model multiplies the parameters by their masks and standardises what is
left: a masked row comes out zero, a masked column does not, and removing input channels from the
parameter would change every row's statistics. For inference only the computed weight matters, so
each such convolution is put in the model as the plain convolution holding the weight its
``forward`` computes from the masked parameters (read on two probes of other sizes, which must give
the same weight, and checked on one); its mask becomes where that weight is zero. Its input channels then go wherever they carry zeros, as for
any convolution. One of which nothing changes is put back as it was.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode

from .cloning import clone_module
from .masks import Masks
from .parametrized import Frozen, Twin, evaluated
from .replacement import registered_places
from .tracer import onednn_off
from .transaction import Transaction

_PLAIN = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def freeze_computed_weights(model: nn.Module, masks: Masks, tx: Transaction,
                            known: Callable[[nn.Module], bool]) -> list[Frozen]:
    """Puts each convolution of ``model`` that computes its weight in its own ``forward``, and that
    no rule is ``known`` for, in the model as its plain twin (through ``tx``); ``masks`` then name the
    twins' tensors."""
    frozen: list[Frozen] = []
    places = None
    for name, module in model.named_modules():
        base = _plain_base(module)
        if base is None or module is model or known(module):
            continue
        prefix = f"{name}." if name else ""
        if any(prefix + attr in masks.parameters for attr, _ in module.named_buffers()):
            continue  # a masked buffer: the twin would not hold it
        own = {attr: masks.parameters[prefix + attr] for attr, _ in module.named_parameters()
               if prefix + attr in masks.parameters}
        plain = _twin(module, base, own)
        if plain is None:
            continue
        places = places if places is not None else registered_places(model)
        twin = Twin(plain, ["weight"], {}, "in its own forward", None)
        masked = not all(bool(m.all()) for m in own.values())
        frozen.append(Frozen.put_in(name, module, twin, places.get(id(module), []), tx, sources_masked=masked))
        for attr in own:
            tensor = plain._parameters.get(attr)
            if tensor is not None:
                masks.put(prefix + attr, tensor != 0, tensor)
            else:  # folded into the computed weight
                masks.drop(prefix + attr)
    return frozen


def _plain_base(module: nn.Module) -> Optional[type]:
    """The torch convolution a leaf module derives from, where it runs a ``forward`` of its own."""
    if module._modules or type(module) in _PLAIN:
        return None
    for base in _PLAIN:
        if isinstance(module, base) and type(module).forward is not base.forward:
            return base
    return None


def _twin(module: nn.Module, base: type, masks: dict[str, torch.Tensor]) -> Optional[nn.Module]:
    """The plain ``base`` convolution computing what ``module`` computes with its parameters masked;
    None where its ``forward`` runs anything but one convolution of its input by a weight that
    depends on its parameters alone (two probes must give the same weight: a dynamic convolution
    mixing kernels by its input gives another, and the recording would trust the twin)."""
    reference = next(module.parameters(), None)  # its weight, or what it computes one from (DO-Conv deletes it)
    if reference is None:
        return None
    masked = {attr: t.detach() * masks[attr].to(device=t.device, dtype=t.dtype) if attr in masks else t.detach()
              for attr, t in module.named_parameters()}
    runs = [_run(module, masked, _probe(module, seed, reference)) for seed in (0, 1)]
    if any(run is None for run in runs):
        return None
    (_, weight, bias, _), (_, other_weight, other_bias, _) = runs
    if not torch.equal(weight, other_weight) or (bias is None) != (other_bias is None) or (
            bias is not None and not torch.equal(bias, other_bias)):
        return None
    requires_grad = reference.requires_grad
    held = {t.untyped_storage().data_ptr() for t in module.parameters()}
    if weight.untyped_storage().data_ptr() in held:  # a parameter passed as it is: the twin gets its own copy
        weight = weight.clone()
    twin = clone_module(module)
    twin.__class__ = base
    twin._parameters = {"weight": nn.Parameter(weight, requires_grad),
                        "bias": None if bias is None else nn.Parameter(bias.clone(), requires_grad)}
    twin._buffers, twin._non_persistent_buffers_set = {}, set()
    probe, expected = runs[0][0], runs[0][3]  # the same weight on the other probe
    with torch.no_grad(), onednn_off():
        actual = twin(probe)
    scale = max(float(expected.abs().max()) if expected.numel() else 0.0, 1.0)
    if actual.shape != expected.shape or not torch.allclose(actual, expected, rtol=1e-5, atol=1e-6 * scale):
        return None
    return twin


def _run(module: nn.Module, parameters: dict, probe: torch.Tensor) -> Optional[tuple]:
    """``(probe, weight, bias, output)`` of the one convolution ``module`` runs on ``probe`` with
    ``parameters``; None if it runs several, convolves something else (its input padded in its own
    code), or raises."""
    calls = _Convolutions()
    try:
        with evaluated(module), torch.no_grad(), onednn_off():
            with calls:
                output = functional_call(module, parameters, (probe,))
    except Exception:  # noqa: BLE001 - a module this does not describe is traced through as it is
        return None
    if len(calls.arguments) != 1 or calls.arguments[0][0] is not probe or not isinstance(output, torch.Tensor):
        return None
    weight, bias = calls.arguments[0][1:3]
    return probe, weight.detach(), None if bias is None else bias.detach(), output


def _probe(module: nn.Module, seed: int, weight: torch.Tensor) -> torch.Tensor:
    """A random input the convolution reads every tap of at least once, on ``weight``'s device and in
    its dtype; each seed gives another batch size and image size too (a weight depending on the input's
    sizes is no fixed weight either)."""
    spatial = [(k - 1) * d + s + seed for k, d, s in zip(module.kernel_size, module.dilation, module.stride)]
    generator = torch.Generator().manual_seed(seed)
    probe = torch.randn(1 + seed, module.in_channels, *spatial, generator=generator, dtype=torch.float32)
    return probe.to(device=weight.device, dtype=weight.dtype)


class _Convolutions(TorchDispatchMode):
    """Notes the arguments of every convolution run while it is active."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False  # see speedup.tracer._Recorder: nothing here is compiled

    def __init__(self) -> None:
        super().__init__()
        self.arguments: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default:
            self.arguments.append(args)
        return func(*args, **(kwargs or {}))
