"""A sped-up model fine-tunes as the masked model does.

Pruning is usually followed by fine-tuning, and that runs on the sped-up model. Its outputs equal
the masked model's; so must what autograd gives it: the gradient of the input, and of every
parameter entry it kept (the masked model's gradient at that entry). The product's own modules (a
convolution folding constants at its borders, norms counting removed constants, attention with
fewer heads, a squeeze-excitation with fewer channels) each have a differentiable path of their
own, which no comparison of outputs under ``torch.no_grad`` runs. Float64 throughout, so that equal
means equal: in float32, round-off grows through the backward pass of a deep random network.
"""

from typing import Callable, NamedTuple, Optional

import pytest
import torch
from torch import nn

import speedup
from speedup.groups import consistent_masks
from speedup.testing import masked_copy
from support.checks import randomize_norms
from test_deployment import conv_then_tokens

torchvision = pytest.importorskip("torchvision")

TOLERANCE = 1e-10
"""Relative to the largest entry: float64 round-off, far below a wrong gradient."""


class Case(NamedTuple):
    model: nn.Module
    masks: dict
    dummy: torch.Tensor
    fresh: torch.Tensor


def own_modules() -> Case:
    model, masks = conv_then_tokens()
    return Case(model, masks, torch.randn(1, 3, 6, 6), torch.randn(2, 3, 7, 5))


def consistent(model: nn.Module, dummy: torch.Tensor, fresh: torch.Tensor) -> Case:
    return Case(model, consistent_masks(model, dummy, sparsity=0.5, seed=0), dummy, fresh)


def transformer_encoder() -> Case:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Linear(32, 5)).eval()
    return consistent(model, torch.randn(1, 6, 32), torch.randn(3, 9, 32))


def torchvision_model(name: str) -> Callable[[], Case]:
    def build() -> Case:
        torch.manual_seed(0)
        model = randomize_norms(torchvision.models.get_model(name, weights=None, num_classes=10).eval())
        return consistent(model, torch.randn(1, 3, 32, 32), torch.randn(2, 3, 40, 40))

    return build


CASES = {"own modules": own_modules, "transformer encoder": transformer_encoder,
         "resnet18": torchvision_model("resnet18"), "mobilenet_v3_small": torchvision_model("mobilenet_v3_small")}


class Gradients(NamedTuple):
    output: torch.Tensor
    input: torch.Tensor
    parameters: dict[str, Optional[torch.Tensor]]


def gradients(model: nn.Module, x: torch.Tensor, of_input: bool = True) -> Gradients:
    """The output on ``x`` and the gradients of a random weighting of it (the same for any model)."""
    x = x.detach().clone().requires_grad_(of_input)
    output = model(x)
    weighting = torch.randn(output.shape, generator=torch.Generator().manual_seed(1), dtype=output.dtype)
    (output * weighting).sum().backward()
    return Gradients(output.detach(), x.grad, {name: p.grad for name, p in model.named_parameters()})


def kept_entries(original: torch.Tensor, kept: torch.Tensor) -> Optional[tuple[torch.Tensor, ...]]:
    """The index grid with ``original[grid] == kept``: which entries of each dimension a sliced
    parameter kept, found by value (every parameter holds distinct random values); None where
    ``kept`` is no such slice (its values changed: a bias that took in removed constants)."""
    if kept.dim() != original.dim() or kept.numel() == 0:
        return None
    anchor = (original == kept.reshape(-1)[0]).nonzero()
    if len(anchor) != 1:
        return None
    base = anchor[0].tolist()
    indices = []
    for dim in range(original.dim()):
        line = original[tuple(slice(None) if d == dim else base[d] for d in range(original.dim()))]
        wanted = kept[tuple(slice(None) if d == dim else 0 for d in range(kept.dim()))]
        matches = line[None, :] == wanted[:, None]
        if not bool((matches.sum(1) == 1).all()):
            return None
        indices.append(matches.int().argmax(1))
    grid = torch.meshgrid(*indices, indexing="ij")
    return grid if torch.equal(original[grid], kept) else None


def entries_kept(name: str, original: dict[str, torch.Tensor], parameters: dict[str, nn.Parameter]) -> tuple:
    """Where the sped-up parameter ``name`` sits in the original one: all of it, a slice found by
    value, or, for a bias that took in removed constants (its values changed), the rows its weight kept."""
    before, after = original[name], parameters[name].detach()
    if before.shape == after.shape:
        return (...,)
    grid = kept_entries(before, after)
    owner = name[: -len("bias")]
    if grid is None and name.endswith("bias") and owner + "weight" in original:
        rows = kept_entries(original[owner + "weight"], parameters[owner + "weight"].detach())
        grid = None if rows is None else (rows[0].reshape(rows[0].shape[0], -1)[:, 0],)
    assert grid is not None, f"{name} is not a slice of what it was"
    return grid


def distinct_parameters(model: nn.Module) -> nn.Module:
    """The model in float64, every parameter entry a value of its own (norm weights start all ones;
    float32 values repeat in a large tensor), so that slices are found by value."""
    generator = torch.Generator().manual_seed(2)
    model = model.double()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.rand(param.shape, generator=generator, dtype=torch.float64) * 0.1)
    return model


def sped_up_beside_masked(model: nn.Module, masks: dict, dummy: torch.Tensor) -> tuple:
    """The model (in float64, with distinct parameters) sped up, its masked copy, its parameters as
    they were, and the report."""
    model = distinct_parameters(model)
    reference = masked_copy(model, masks).eval()
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    report = speedup.shrink(model, masks, dummy.double())
    return model, reference, original, report


def assert_close(expected: torch.Tensor, actual: torch.Tensor, what: str) -> None:
    assert expected.shape == actual.shape, f"{what}: shape {tuple(actual.shape)} instead of {tuple(expected.shape)}"
    scale = float(expected.abs().max()) or 1.0
    difference = float((expected - actual).abs().max())
    assert difference <= TOLERANCE * scale, f"{what} differs by {difference:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("case", CASES)
def test_a_sped_up_model_gets_the_gradients_of_the_masked_model(case):
    model, masks, dummy, fresh = CASES[case]()
    model, reference, original, report = sped_up_beside_masked(model, masks, dummy)
    assert report.param_ratio < 0.8
    expected, actual = gradients(reference, fresh.double()), gradients(model, fresh.double())
    assert_close(expected.output, actual.output, "the output")
    assert_close(expected.input, actual.input, "the gradient of the input")
    parameters = dict(model.named_parameters())
    compared = 0
    for name in parameters:
        grad = actual.parameters[name]
        assert grad is not None, f"{name} gets no gradient"
        if name in original:  # else in a module put in another form (nn.MultiheadAttention as its projections)
            assert_close(expected.parameters[name][entries_kept(name, original, parameters)], grad, f"the gradient of {name}")
            compared += 1
    assert compared > len(parameters) / 2


@pytest.mark.parametrize("trained", ["group_norm", "norm"])
def test_a_norm_counting_removed_constants_trains_behind_frozen_layers(trained):
    """Behind frozen layers no gradient flows into a norm's input, and it runs its fused kernels,
    whose weights must still get the masked model's gradients."""
    model, masks, dummy, fresh = own_modules()
    model, reference, original, _ = sped_up_beside_masked(model, masks, dummy)
    for net in (model, reference):
        for name, param in net.named_parameters():
            param.requires_grad_(name.startswith((f"{trained}.", "head.")))
    expected, actual = gradients(reference, fresh.double(), False), gradients(model, fresh.double(), False)
    assert_close(expected.output, actual.output, "the output")
    parameters = dict(model.named_parameters())
    for name in (f"{trained}.weight", f"{trained}.bias"):
        where = entries_kept(name, original, parameters)
        assert_close(expected.parameters[name][where], actual.parameters[name], f"the gradient of {name}")
