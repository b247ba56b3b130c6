"""ShuffleNetV2: its blocks take an equivalent form whose channel split and shuffle are gathers, so
channels of the stream between blocks go too (before, at most half of them could)."""

import copy

import pytest
import torch
from torch import nn

torchvision = pytest.importorskip("torchvision")
from torchvision.models import shufflenetv2  # noqa: E402

import speedup  # noqa: E402
from speedup.groups import consistent_masks  # noqa: E402
from speedup.modules import ChannelGather  # noqa: E402
from speedup_torchvision.shufflenet import GatheredInvertedResidual, gathered_inverted_residual  # noqa: E402
from support.checks import check_speedup, output_channel_masks, randomize_norms  # noqa: E402


def tiny_shufflenet() -> nn.Module:
    model = shufflenetv2.ShuffleNetV2([2, 3, 2], [8, 16, 32, 64, 128], num_classes=10)
    return randomize_norms(model).eval()


def blocks(model: nn.Module) -> list[nn.Module]:
    return [m for stage in (model.stage2, model.stage3, model.stage4) for m in stage]


def flops(model: nn.Module, x: torch.Tensor) -> int:
    counter = torch.utils.flop_counter.FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("training", [False, True])
def test_the_gathered_block_computes_what_the_block_computes(stride, training):
    block = randomize_norms(shufflenetv2.InvertedResidual(16, 16, stride)).train(training)
    statistics = copy.deepcopy(block.state_dict())
    form = gathered_inverted_residual(block)
    assert isinstance(form, GatheredInvertedResidual)
    # Checking the form ran the block in eval mode: the block's statistics and flags are as they were.
    assert all(torch.equal(statistics[k], v) for k, v in block.state_dict().items())
    assert all(m.training == training for m in block.modules())
    x = torch.randn(3, 16, 9, 7)
    form.train(training)
    with torch.no_grad():
        expected, actual = block(x), form(x)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_consistent_masks_remove_three_quarters_of_the_flops():
    model = tiny_shufflenet()
    dummy, fresh = torch.randn(1, 3, 32, 32), torch.randn(3, 3, 32, 32)
    flops_before = flops(model, dummy)
    report = check_speedup(model, consistent_masks(model, dummy), dummy, fresh,
                           shrunk=["stage2.0.branch2.5.weight", "stage3.2.branch2.0.weight", "conv5.0.weight"])
    assert not report.barriers and not report.kept_for_verification
    # The stream between blocks lost channels: the first conv of stage 3's third block reads fewer.
    assert model.stage3[2].branch2[0].in_channels < 16
    assert all(isinstance(b, GatheredInvertedResidual) for b in blocks(model))
    assert set(report.forms) == {f"stage{s}.{i}" for s, n in ((2, 2), (3, 3), (4, 2)) for i in range(n)}
    assert "InvertedResidual -> GatheredInvertedResidual" in report.table()
    # Every conv loses half its inputs and half its outputs, but depthwise convs (a large share of
    # so small a model) and the stem only lose half in all: 0.41 (0.50 with the blocks' own code).
    assert flops(model, dummy) / flops_before < 0.43
    assert report.param_ratio < 0.35  # 0.55 with the blocks' own code


def test_random_channels_of_every_layer_go_through_the_gathers():
    model = tiny_shufflenet()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    report = check_speedup(model, output_channel_masks(model, names), torch.randn(1, 3, 32, 32),
                           torch.randn(2, 3, 32, 32), shrunk=["stage4.1.branch2.5.weight", "conv5.0.weight"])
    assert not report.barriers and not report.kept_for_verification


def test_a_block_whose_form_gained_nothing_is_put_back():
    """Masks inside one branch (its first conv's outputs) change no gather: that block keeps its code."""
    model = tiny_shufflenet()
    masks = output_channel_masks(model, ["stage3.1.branch2.0"])
    report = check_speedup(model, masks, torch.randn(1, 3, 32, 32), torch.randn(2, 3, 32, 32),
                           shrunk=["stage3.1.branch2.0.weight", "stage3.1.branch2.3.weight"])
    assert type(model.stage3[1]) is shufflenetv2.InvertedResidual
    assert all(type(b) is shufflenetv2.InvertedResidual for b in blocks(model))
    assert report.forms == {}


def test_a_failed_speedup_and_the_group_analysis_leave_the_blocks_as_they_were():
    model = tiny_shufflenet()
    originals = blocks(model)
    consistent_masks(model, torch.randn(1, 3, 32, 32))
    assert blocks(model) == originals
    masks = output_channel_masks(model, ["stage2.0.branch2.5"])
    with pytest.raises(speedup.SpeedupError):
        speedup.shrink(model, masks, torch.randn(1, 4, 32, 32))  # the stem takes 3 channels
    assert blocks(model) == originals and all(type(b) is shufflenetv2.InvertedResidual for b in originals)
    assert not any(isinstance(m, ChannelGather) for m in model.modules())


def test_a_block_built_differently_keeps_its_code():
    """A block whose branch does not start with a conv is not torchvision's: no form is offered."""
    block = shufflenetv2.InvertedResidual(16, 16, 1)
    block.branch2 = nn.Sequential(nn.Identity(), *list(block.branch2))
    assert gathered_inverted_residual(block) is None


def test_a_block_the_user_replaces_is_given_to_their_function_as_it_is():
    model = tiny_shufflenet()
    seen = []

    def keep(block, masks):
        seen.append(type(block))
        return block

    masks = output_channel_masks(model, ["conv1.0"])  # the stem: the first block's inputs change
    speedup.shrink(model, masks, torch.randn(1, 3, 32, 32), customized_replace_func={"InvertedResidual": keep})
    assert seen and all(kind is shufflenetv2.InvertedResidual for kind in seen)
    assert all(type(b) is shufflenetv2.InvertedResidual for b in blocks(model))


def test_a_build_of_block_is_probed_once_unless_a_part_may_hide_its_sizes(monkeypatch):
    """Each probe runs the block twice; a model repeats a few builds of block, so a build that passed
    is not probed again. A part that is not a ``torch.nn`` module, or one with a hook, may change
    sizes its ``extra_repr`` does not show: such a block is probed every time."""
    from speedup_torchvision import shufflenet

    probed = []
    probe = shufflenet._computes_the_same
    monkeypatch.setattr(shufflenet, "_computes_the_same", lambda *args: probed.append(args[0]) or probe(*args))
    monkeypatch.setattr(shufflenet, "_CHECKED_BUILDS", set())

    class Own(nn.ReLU):
        pass

    plain = [shufflenetv2.InvertedResidual(24, 24, 1) for _ in range(3)]
    own = [shufflenetv2.InvertedResidual(24, 24, 1) for _ in range(2)]
    for block in own:
        block.branch2[2] = Own(inplace=True)
    hooked = [shufflenetv2.InvertedResidual(24, 24, 1) for _ in range(2)]
    for block in hooked:
        block.branch2[0].register_forward_hook(lambda module, args, out: out)
    wider = shufflenetv2.InvertedResidual(24, 32, 2)
    for block in (*plain, *own, *hooked, wider):
        assert isinstance(gathered_inverted_residual(block), GatheredInvertedResidual)
    assert probed == [plain[0], *own, *hooked, wider]
