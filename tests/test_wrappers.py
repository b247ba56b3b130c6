"""Models handed in as they are: torch.compile's wrapper is seen through (masks may name modules either
way), DataParallel's names are suggested for bare ones, TorchScript and lazy modules not yet run are
refused with what to do."""

import copy

import pytest
import torch
from torch import nn

import speedup
from speedup.groups import consistent_masks
from support.checks import assert_unchanged, check_speedup, rows, state_and_structure

KEEP = torch.tensor([True, False, True, True, False, True, False, True])


def network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4)).eval()


def masked_reference() -> nn.Module:
    reference = network()
    with torch.no_grad():
        reference[0].weight.mul_(rows(KEEP, (8, 3, 3, 3)))
    return reference


@pytest.mark.parametrize("name", ["0", "_orig_mod.0"])
def test_a_compiled_model_shrinks_the_module_it_compiles(name):
    model = network()
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        compiled(x)  # compiled for the full sizes first
    report = speedup.shrink(compiled, {name: {"weight": rows(KEEP, (8, 3, 3, 3))}}, torch.randn(1, 3, 8, 8))
    assert compiled._orig_mod is model and model[0].weight.shape[0] == 5 and model[3].weight.shape[1] == 5
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), masked_reference()(x), rtol=1e-5, atol=1e-6)
    assert report.params_after < report.params_before


@pytest.mark.parametrize("name", ["0.0", "0._orig_mod.0"])
def test_a_compiled_block_runs_eagerly_and_masks_may_name_its_layers_either_way(name):
    """``model[0] = torch.compile(model[0])`` names the block's first conv ``0._orig_mod.0``; masks made
    before name it ``0.0``. The recording runs the block eagerly: compiled, it would compile the
    recorder (seconds, and graph breaks)."""
    torch._dynamo.reset()
    layers = network()
    model = nn.Sequential(layers[:4], layers[4:])
    model[0] = torch.compile(model[0], backend="eager")
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        model(x)
    compiled = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    report = speedup.shrink(model, {name: {"weight": rows(KEEP, (8, 3, 3, 3))}}, torch.randn(1, 3, 8, 8))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiled  # nothing compiled during the call
    block = model[0]._orig_mod
    assert type(model[0]).__name__ == "OptimizedModule" and block[0].weight.shape[0] == 5
    assert block[3].weight.shape[1] == 5 and report.params_after < report.params_before
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked_reference()(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["0", "0._orig_mod"])
def test_a_compiled_layer_rebuilt_smaller_gets_a_wrapper_of_its_own(name):
    model = network()
    model[0] = torch.compile(model[0], backend="eager")
    speedup.shrink(model, {name: {"weight": rows(KEEP, (8, 3, 3, 3))}}, torch.randn(1, 3, 8, 8))
    assert type(model[0]).__name__ == "OptimizedModule" and model[0]._orig_mod.weight.shape[0] == 5
    assert model[3].weight.shape[1] == 5
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked_reference()(x), rtol=1e-5, atol=1e-6)


def test_groups_of_a_compiled_model():
    compiled = torch.compile(network(), backend="eager")
    masks = consistent_masks(compiled, torch.randn(1, 3, 8, 8), sparsity=0.5)
    assert "0" in masks and masks["0"]["weight"].shape == (8, 3, 3, 3)


def test_a_bare_name_under_data_parallel_suggests_the_wrapped_one():
    model = nn.DataParallel(network())
    snapshot = state_and_structure(model)
    with pytest.raises(speedup.MaskError, match="Close names: 'module.0'"):
        speedup.shrink(model, {"0": {"weight": rows(KEEP, (8, 3, 3, 3))}}, torch.randn(1, 3, 8, 8))
    assert_unchanged(model, snapshot)
    speedup.shrink(model, {"module.0": {"weight": rows(KEEP, (8, 3, 3, 3))}}, torch.randn(1, 3, 8, 8))
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked_reference()(x), rtol=1e-5, atol=1e-6)
    assert model.module[0].weight.shape[0] == 5


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_a_scripted_model_is_refused_with_what_to_do():
    scripted = torch.jit.script(network())
    with pytest.raises(speedup.SpeedupError, match="speed up the eager model, then script"):
        speedup.shrink(scripted, {"0": {"weight": rows(KEEP, (8, 3, 3, 3))}}, torch.randn(1, 3, 8, 8))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_a_scripted_submodule_is_traced_through():
    model = network()
    model[3] = torch.jit.script(model[3])
    reference = masked_reference()
    speedup.shrink(model, {"0": {"weight": rows(KEEP, (8, 3, 3, 3))}}, torch.randn(1, 3, 8, 8))
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-6)
    assert model[0].weight.shape[0] < 8


def test_a_lazy_module_not_yet_run_is_refused_with_what_to_do():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.LazyConv2d(4, 1))
    with pytest.raises(speedup.SpeedupError, match="'2' \\(LazyConv2d\\) has parameters of no size yet"):
        speedup.shrink(model, {"0": {"weight": rows(KEEP, (8, 3, 3, 3))}}, torch.randn(1, 3, 8, 8))
    assert isinstance(model[2].weight, nn.UninitializedParameter)
    model(torch.randn(1, 3, 8, 8))  # now it has its sizes
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference[0].weight.mul_(rows(KEEP, (8, 3, 3, 3)))
        reference[0].bias.mul_(KEEP)
    speedup.shrink(model, {"0": {"weight": rows(KEEP, (8, 3, 3, 3)), "bias": KEEP}}, torch.randn(1, 3, 8, 8))
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-6)
    assert model[2].weight.shape == (4, 5, 1, 1)


class ScaledThroughFunctionalCall(nn.Module):
    """Runs its inner network with ``torch.func.functional_call``, one weight replaced by a computed one."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, x):
        parameters = dict(self.inner.named_parameters())
        parameters["2.weight"] = parameters["2.weight"] * 0.5
        return torch.func.functional_call(self.inner, parameters, (x,))


def test_a_layer_run_with_a_computed_weight_in_place_of_its_own_is_kept_whole():
    """The recording saw the layer hold a tensor that is no parameter of the model: its rule rebuilt it
    with that tensor sliced, and assigning it as the weight raised a bare TypeError. The layers before
    it lose what their masks remove."""
    torch.manual_seed(0)
    model = ScaledThroughFunctionalCall().eval()
    masks = {"inner.0": {"weight": rows(KEEP.repeat(4), (32, 16)), "bias": KEEP.repeat(4)}}
    check_speedup(model, masks, torch.randn(2, 16), torch.randn(5, 16), shrunk=["inner.0.weight"])
    assert isinstance(model.inner[2].weight, nn.Parameter) and model.inner[2].weight.shape == (32, 32)


def test_a_mask_on_the_weight_a_computed_one_replaces_masks_what_it_is_computed_from():
    """The layer computed its masked output from its parameter, not from the tensor it held during the
    call (half of it): the recording was off by 0.05, and the call ended in a VerificationError."""
    torch.manual_seed(0)
    model = ScaledThroughFunctionalCall().eval()
    masks = {"inner.2": {"weight": rows(KEEP.repeat(4), (32, 32))},
             "inner.0": {"weight": rows(KEEP.repeat(4), (32, 16))}}
    check_speedup(model, masks, torch.randn(2, 16), torch.randn(5, 16), shrunk=["inner.0.weight"])
    assert model.inner[2].weight.shape == (32, 32)
