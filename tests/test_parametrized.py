"""Parametrized weights (weight norm, spectral norm, the old weight norm hook): masks apply to the
computed weight, a layer that loses entries becomes the plain layer holding its computed weight
(as for inference), and one of which nothing changed keeps its parametrization."""

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

import speedup
from speedup.groups import consistent_masks
from support.checks import assert_unchanged, check_speedup, rows, state_and_structure

KEEP = torch.tensor([True, False, True, True, False, True, False, True])


def network() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1))


def masks() -> dict:
    return {"0": {"weight": rows(KEEP, (8, 3, 3, 3))}}


def test_weight_norm_and_spectral_norm_layers_lose_entries_of_their_computed_weights():
    model = network().eval()
    parametrizations.weight_norm(model[0])  # masked: loses output channels
    parametrizations.spectral_norm(model[2])  # loses input channels
    parametrizations.weight_norm(model[6])  # far from the masks: nothing of it changes
    untouched = model[6]
    report = check_speedup(model, masks(), torch.randn(1, 3, 8, 8), torch.randn(2, 3, 9, 7))
    assert model[0].weight.shape[0] == model[2].weight.shape[1] == 5
    # Plain layers holding what they computed (the second one folds the constant channels it reads).
    assert not parametrize.is_parametrized(model[0]) and not parametrize.is_parametrized(model[2])
    assert model[6] is untouched and parametrize.is_parametrized(model[6], "weight")
    assert report.forms == {"0": ("ParametrizedConv2d", "Conv2d"), "2": ("ParametrizedConv2d", "Conv2d")}
    said = [w for w in report.warnings if "through a parametrization" in w]  # one warning for the two
    assert len(said) == 1 and "'0', '2' computed weight" in said[0] and "their sped-up Conv2ds hold" in said[0]


def test_the_old_spectral_norm_hook_is_frozen_alike():
    """``weight_orig`` and its power-iteration vectors, ``weight`` a plain attribute the hook sets: masks
    name the weight, and finding groups no longer raises KeyError('weight')."""
    model = network().eval()
    torch.nn.utils.spectral_norm(model[0])
    torch.nn.utils.spectral_norm(model[4])
    untouched = model[4]
    assert consistent_masks(model, torch.randn(1, 3, 8, 8), sparsity=0.5, seed=0)
    check_speedup(model, masks(), torch.randn(1, 3, 8, 8), torch.randn(2, 3, 9, 7), shrunk=["2.weight"])
    assert model[0].weight.shape[0] == 5 and "weight_orig" not in dict(model[0].named_parameters())
    assert model[4] is untouched and "weight_orig" in dict(model[4].named_parameters())
    model.load_state_dict(model.state_dict())  # no hook looks for the vectors the plain layer lost


def test_the_report_counts_the_parameters_a_parametrized_layer_holds():
    """A weight norm holds a magnitude and a direction, not the weight it computes (the report said
    122 -> 130 parameters where nothing changed)."""
    model = network().eval()
    parametrizations.weight_norm(model[0])
    held = sum(p.numel() for p in model.parameters())
    report = speedup.shrink(model, {}, torch.randn(1, 3, 8, 8))
    assert report.params_before == report.params_after == held


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated")
def test_the_old_weight_norm_hook_is_frozen_alike():
    model = network().eval()
    torch.nn.utils.weight_norm(model[0])
    torch.nn.utils.weight_norm(model[4])
    check_speedup(model, masks(), torch.randn(1, 3, 8, 8), torch.randn(2, 3, 9, 7), shrunk=["2.weight"])
    assert model[0].weight.shape[0] == 5
    assert "weight_g" not in dict(model[0].named_parameters()) and not model[0]._forward_pre_hooks
    assert "weight_g" in dict(model[4].named_parameters())  # nothing of it changed: as it was


def test_a_spectral_norm_in_training_mode_keeps_its_vectors():
    """Computing a spectral norm in training mode runs a power iteration that updates its vectors in
    place; the call computes it in eval mode, and a failed call leaves everything as it was."""
    model = network().train()
    parametrizations.spectral_norm(model[2])
    snapshot = state_and_structure(model)
    bad = {"0": {"weight": rows(KEEP, (8, 3, 3, 3))}, "2": {"weight": torch.ones(5)}}  # no such shape
    with pytest.raises(speedup.SpeedupError):
        speedup.shrink(model, bad, torch.randn(2, 3, 8, 8))
    assert_unchanged(model, snapshot)
    vectors = {k: v.clone() for k, v in model[2].parametrizations.weight[0].named_buffers()}
    speedup.shrink(model, {"4": {"weight": rows(torch.tensor([True, False, True, False]), (4, 8, 1, 1))}},
                   torch.randn(2, 3, 8, 8))
    assert parametrize.is_parametrized(model[2])  # its outputs all stay: it is put back
    assert all(torch.equal(v, vectors[k]) for k, v in model[2].parametrizations.weight[0].named_buffers())


def test_a_parametrized_model_itself_is_refused_with_what_to_do():
    model = parametrizations.weight_norm(nn.Conv2d(3, 8, 3))
    with pytest.raises(speedup.SpeedupError, match="remove_parametrizations"):
        speedup.shrink(model, {"": {"weight": rows(KEEP, (8, 3, 3, 3))}}, torch.randn(1, 3, 8, 8))
    assert parametrize.is_parametrized(model)


def test_a_weight_normed_convolution_folds_its_batchnorm():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 2, 1)).eval()
    parametrizations.weight_norm(model[0])
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 7, 7)
    with torch.no_grad():
        expected = model(x)
    assert speedup.fold_batchnorm(model, torch.randn(1, 3, 7, 7)) == [("0", "1")]
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    assert isinstance(model[1], nn.Identity) and not parametrize.is_parametrized(model[0])


def test_groups_of_a_weight_normed_model_name_its_weights():
    from speedup.groups import consistent_masks

    model = network().eval()
    parametrizations.weight_norm(model[2])
    masks = consistent_masks(model, torch.randn(1, 3, 8, 8), sparsity=0.5)
    assert masks["2"]["weight"].shape == (8, 8, 3, 3) and parametrize.is_parametrized(model[2])
    check_speedup(model, masks, torch.randn(1, 3, 8, 8), torch.randn(2, 3, 9, 7))


def test_a_mask_for_what_a_weight_is_computed_from_says_to_mask_the_weight():
    model = network().eval()
    parametrizations.weight_norm(model[0])
    snapshot = state_and_structure(model)
    v = {"0": {"parametrizations.weight.original1": rows(KEEP, (8, 3, 3, 3))}}
    with pytest.raises(speedup.MaskError, match="name that tensor \\('weight'\\)"):
        speedup.shrink(model, v, torch.randn(1, 3, 8, 8))
    assert_unchanged(model, snapshot)
    for key, target in (("0.parametrizations.weight", "original1"), ("0.parametrizations.weight", "_output_0")):
        with pytest.raises(speedup.MaskError, match="inside the parametrization of '0'.*name that tensor \\({'0'"):
            speedup.shrink(model, {key: {target: torch.ones(1)}}, torch.randn(1, 3, 8, 8))
        assert_unchanged(model, snapshot)


def pruned_network() -> nn.Module:
    """The network pruned with torch.nn.utils.prune: whole output channels of the first convolution,
    single weights of the second, the last pruned twice (a container of two pruning methods)."""
    from torch.nn.utils import prune

    torch.manual_seed(0)
    model = network().eval()
    prune.ln_structured(model[0], "weight", amount=0.5, n=1, dim=0)
    prune.l1_unstructured(model[2], "weight", amount=0.3)
    prune.random_structured(model[6], "weight", amount=0.5, dim=1)
    prune.l1_unstructured(model[6], "weight", amount=0.2)
    return model


def test_a_model_pruned_with_torch_prune_loses_what_its_own_masks_prune():
    """The masks the model carries (``weight_mask``) are the masks: nothing more need be given. The
    model computes ``weight_orig * weight_mask``, so it is its own masked model."""
    model = pruned_network()
    unstructured = model[2]
    x = torch.randn(2, 3, 9, 7)
    with torch.no_grad():
        expected = model(x)
    with pytest.warns(speedup.SpeedupWarning, match="as torch.nn.utils.prune.remove leaves (it|them) for inference"):
        report = speedup.shrink(model, {}, torch.randn(1, 3, 8, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    assert model[0].weight.shape == (4, 3, 3, 3) and model[2].weight.shape[1] == 4
    assert model[6].weight.shape[1] == 2 and model[4].weight.shape[0] == 2  # its pruned columns' producer shrank
    assert "weight_orig" not in dict(model[0].named_parameters()) and not model[0]._forward_pre_hooks
    assert isinstance(model[2].weight, nn.Parameter) and not hasattr(model[2], "weight_mask")
    assert unstructured is not model[2]  # it lost input channels: plain, holding its masked weight
    assert report.params_after < report.params_before


def test_masks_given_for_a_pruned_weight_join_its_own():
    model = pruned_network()
    reference = pruned_network()
    given = {"0": {"weight": rows(~KEEP, (8, 3, 3, 3))}}  # other channels than its own pruning chose
    with torch.no_grad():
        reference[0].weight_orig.mul_(given["0"]["weight"])
    x = torch.randn(2, 3, 9, 7)
    with torch.no_grad():
        expected = reference(x)
    speedup.shrink(model, given, torch.randn(1, 3, 8, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    kept = (~KEEP) & model_rows_kept()
    assert model[0].weight.shape[0] == int(kept.sum())


def model_rows_kept() -> torch.Tensor:
    """The output channels of the first convolution that ``pruned_network`` keeps."""
    return pruned_network()[0].weight_mask.flatten(1).any(1)


def test_a_failed_call_leaves_a_pruned_model_pruned():
    model = pruned_network()
    snapshot = state_and_structure(model)
    hooks = [dict(m._forward_pre_hooks) for m in model]
    with pytest.raises(speedup.MaskError, match="name that tensor \\('weight'\\)"):
        speedup.shrink(model, {"2": {"weight_orig": torch.ones(8, 8, 3, 3)}}, torch.randn(1, 3, 8, 8))
    with pytest.raises(speedup.SpeedupError):
        speedup.shrink(model, {"4": {"weight": torch.ones(3)}}, torch.randn(1, 3, 8, 8))
    assert_unchanged(model, snapshot)
    assert [dict(m._forward_pre_hooks) for m in model] == hooks


def test_a_parametrized_layer_masked_but_not_shrunk_holds_its_masked_weight():
    """Nothing of it can go (single weights masked), but the masked entries must stay zero: put back
    with its parametrization, it would compute them again (0.5 off the masked model before)."""
    model = network().eval()
    parametrizations.weight_norm(model[6])
    scattered = ((torch.arange(2)[:, None] + torch.arange(4)) % 2 == 0).reshape(2, 4, 1, 1)  # each row and column keeps one
    report = check_speedup(model, {"6": {"weight": scattered}}, torch.randn(1, 3, 8, 8), torch.randn(2, 3, 9, 7))
    assert not parametrize.is_parametrized(model[6]) and model[6].weight.shape == (2, 4, 1, 1)
    assert report.forms == {"6": ("ParametrizedConv2d", "Conv2d")}
