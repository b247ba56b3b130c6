"""Convolutional building blocks: every case is compared with its masked model on a fresh input."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import speedup
from speedup.groups import consistent_masks
from speedup.testing import masked_copy
from speedup.modules import ChannelGather, ConstantAwareGroupNorm, ConstantAwareResponseNorm, FoldedConv2d
from support.checks import check_speedup, keep_mask, output_channel_masks, randomize_norms, rows


def conv_bn(cin, cout, k=3, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Residual(nn.Module):
    def __init__(self, c=16):
        super().__init__()
        self.stem = conv_bn(3, c)
        self.a = conv_bn(c, c)
        self.b = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c))
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(self.b(self.a(x)) + x)
        return self.head(x.mean((2, 3)))


def test_residual_channels_masked_consistently_are_removed_everywhere():
    model = randomize_norms(Residual())
    keep = keep_mask(16)
    masks = {name: {"weight": rows(keep, tuple(dict(model.named_modules())[name].weight.shape))}
             for name in ("stem.0", "a.0", "b.0")}
    masks["stem.1"] = {"weight": keep, "bias": keep}
    masks["b.1"] = {"weight": keep, "bias": keep}
    check_speedup(model, masks, torch.randn(2, 3, 12, 12), torch.randn(3, 3, 9, 11),
                  shrunk=["stem.0.weight", "a.0.weight", "b.0.weight", "head.weight"])


def test_residual_channels_masked_in_one_branch_only_stay_and_keep_their_values():
    model = randomize_norms(Residual())
    masks = output_channel_masks(model, ["a.0", "b.0"])
    check_speedup(model, masks, torch.randn(2, 3, 12, 12), torch.randn(3, 3, 12, 12), shrunk=["a.0.weight"])


class DepthwiseLike(nn.Conv2d):
    """A Conv2d subclass keeping Conv2d's forward (Hugging Face's ``EfficientNetDepthwiseConv2d``)."""


@pytest.mark.parametrize("conv", [nn.Conv2d, DepthwiseLike])
def test_batchnorm_shift_of_removed_channel_is_folded_into_next_conv_with_zero_padding(conv):
    # conv1's masked channels become BatchNorm shifts (constants); conv2 pads with zeros, so their
    # contribution differs near the borders: the exact fold is a per-position map.
    model = randomize_norms(nn.Sequential(conv_bn(3, 8), conv(8, 6, 3, padding=1)))
    masks = output_channel_masks(model, ["0.0"])
    check_speedup(model, masks, torch.randn(2, 3, 10, 10), torch.randn(4, 3, 7, 13), shrunk=["0.0.weight", "1.weight"])
    assert isinstance(model[1], FoldedConv2d)


_GEOMETRIES = [  # (dims, kernel, stride, padding, dilation)
    (1, 5, 2, 2, 1), (2, 3, 2, 1, 2), (2, 4, 1, "same", 1), (2, (3, 5), (1, 2), (1, 0), (2, 1)), (3, 3, 2, 1, 1),
]


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
@pytest.mark.parametrize("dims, kernel, stride, padding, dilation", _GEOMETRIES)
def test_constants_folded_at_borders_whatever_the_convolution_geometry(dims, kernel, stride, padding, dilation):
    # The per-position map of removed constants must follow the stride, the padding (an even
    # "same" kernel pads more after than before) and the dilation, at sizes other than the dummy's.
    conv, norm = {1: (nn.Conv1d, nn.BatchNorm1d), 2: (nn.Conv2d, nn.BatchNorm2d), 3: (nn.Conv3d, nn.BatchNorm3d)}[dims]
    model = randomize_norms(nn.Sequential(conv(3, 8, 1), norm(8), conv(8, 6, kernel, stride, padding, dilation)))
    masks = output_channel_masks(model, ["0"])
    dummy, fresh = torch.randn((2, 3) + (9,) * dims), torch.randn((3, 3) + (7, 10, 8)[:dims])
    check_speedup(model, masks, dummy, fresh, shrunk=["0.weight", "2.weight"])
    assert hasattr(model[2], "constant_kernel")  # zero padding: the folded form, not a bias


def test_constant_channel_folds_into_bias_where_padding_does_not_dilute_it():
    model = randomize_norms(nn.Sequential(conv_bn(3, 8), nn.Conv2d(8, 6, 1)))
    masks = output_channel_masks(model, ["0.0"])
    check_speedup(model, masks, torch.randn(2, 3, 10, 10), torch.randn(1, 3, 5, 6), shrunk=["1.weight"])
    assert type(model[1]) is nn.Conv2d


def test_sigmoid_of_a_masked_channel_is_the_constant_one_half():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Sigmoid(), nn.Conv2d(8, 4, 1))
    masks = output_channel_masks(model, ["0"])
    check_speedup(model, masks, torch.randn(2, 3, 8, 8), torch.randn(3, 3, 6, 6), shrunk=["0.weight", "2.weight"])


class Separable(nn.Module):
    def __init__(self):
        super().__init__()
        self.expand = conv_bn(4, 12, 1)
        self.depthwise = conv_bn(12, 12, 3, groups=12)
        self.project = nn.Conv2d(12, 6, 1)

    def forward(self, x):
        return self.project(self.depthwise(self.expand(x)))


def test_depthwise_conv_follows_its_input_channels():
    model = randomize_norms(Separable())
    masks = output_channel_masks(model, ["expand.0"])
    channels = masks["expand.0"]["weight"][:, 0, 0, 0]
    masks["expand.1"] = {"weight": channels, "bias": channels}
    check_speedup(model, masks, torch.randn(2, 4, 8, 8), torch.randn(1, 4, 10, 10),
                  shrunk=["expand.0.weight", "depthwise.0.weight", "project.weight"])
    assert model.depthwise[0].groups == model.depthwise[0].in_channels == 6


def test_depthwise_channel_holding_a_position_dependent_constant_stays():
    # A BatchNorm shift through a zero-padded 3x3 depthwise conv varies near the borders: the
    # channel does not depend on the input but is not one constant either, so it must stay.
    model = randomize_norms(Separable())
    masks = output_channel_masks(model, ["expand.0"])
    check_speedup(model, masks, torch.randn(2, 4, 8, 8), torch.randn(1, 4, 10, 10))
    assert model.depthwise[0].groups == 12


def test_depthwise_output_masked_removes_the_input_channel_too():
    model = randomize_norms(Separable())
    masks = output_channel_masks(model, ["depthwise.0"])
    masks["depthwise.1"] = {"weight": masks["depthwise.0"]["weight"][:, 0, 0, 0], "bias": masks["depthwise.0"]["weight"][:, 0, 0, 0]}
    check_speedup(model, masks, torch.randn(2, 4, 8, 8), torch.randn(1, 4, 8, 8),
                  shrunk=["expand.0.weight", "depthwise.0.weight", "project.weight"])


def test_grouped_conv_removes_whole_groups_or_the_same_position_in_every_group():
    model = nn.Sequential(nn.Conv2d(4, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.Conv2d(8, 4, 1))
    position = torch.tensor([True, False, True, True])
    masks = {"0": {"weight": rows(position.repeat(2), (8, 4, 1, 1)), "bias": position.repeat(2)}}
    check_speedup(model, masks, torch.randn(2, 4, 6, 6), torch.randn(3, 4, 6, 6), shrunk=["0.weight", "2.weight"])
    assert model[2].groups == 2 and model[2].in_channels == 6


def test_grouped_conv_keeps_channels_that_would_unbalance_its_groups():
    model = nn.Sequential(nn.Conv2d(4, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=2))
    uneven = torch.tensor([False, False, True, True, True, True, True, True])
    masks = {"0": {"weight": rows(uneven, (8, 4, 1, 1)), "bias": uneven}}
    check_speedup(model, masks, torch.randn(2, 4, 6, 6), torch.randn(3, 4, 6, 6))
    assert model[2].groups == 2


@pytest.mark.parametrize("dims", [1, 3])
def test_conv1d_and_conv3d(dims):
    conv = {1: nn.Conv1d, 3: nn.Conv3d}[dims]
    norm = {1: nn.BatchNorm1d, 3: nn.BatchNorm3d}[dims]
    model = randomize_norms(nn.Sequential(conv(3, 8, 3, padding=1), norm(8), nn.ReLU(), conv(8, 4, 3, padding=1)))
    masks = output_channel_masks(model, ["0"])
    shape = (2, 3) + (6,) * dims
    fresh = (3, 3) + (5,) * dims
    check_speedup(model, masks, torch.randn(shape), torch.randn(fresh), shrunk=["0.weight", "3.weight"])


def test_transposed_convolutions():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                          nn.ConvTranspose2d(8, 6, 4, stride=2, padding=1), nn.ReLU(), nn.ConvTranspose2d(6, 3, 3, padding=1))
    masks = output_channel_masks(model, ["0"])
    masks.update({"2": {"weight": rows(keep_mask(8), (8, 6, 4, 4)).transpose(0, 1).transpose(0, 1)}})
    out_mask = keep_mask(6)
    masks["2"] = {"weight": out_mask.reshape(1, 6, 1, 1).expand(8, 6, 4, 4), "bias": out_mask}
    check_speedup(model, masks, torch.randn(2, 3, 8, 8), torch.randn(1, 3, 10, 6), shrunk=["0.weight", "2.weight", "4.weight"])


def test_transposed_convolution_whose_every_output_goes_keeps_one_without_folding():
    """Constant inputs (masked rows keeping their bias) of a transposed convolution nothing reads
    further: one output stays so the model is valid, and nothing needs the constants it read."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ConvTranspose2d(4, 4, 2, stride=2),
                          nn.Conv2d(4, 5, 1), nn.Conv2d(5, 2, 1)).eval()
    kept = torch.tensor([True, True, False, False])
    masks = {"0": {"weight": rows(kept, (4, 3, 3, 3))},  # channels 2 and 3 hold their bias
             "2": {"weight": torch.zeros(5, 4, 1, 1)}}
    with pytest.warns(speedup.SpeedupWarning, match="one entry is kept"):
        check_speedup(model, masks, torch.randn(1, 3, 4, 4), torch.randn(2, 3, 5, 3), shrunk=["1.weight"])


class SqueezeExcite(nn.Module):
    def __init__(self, c=12, r=4):
        super().__init__()
        self.conv = conv_bn(3, c)
        self.fc1 = nn.Conv2d(c, c // r, 1)
        self.fc2 = nn.Conv2d(c // r, c, 1)
        self.out = nn.Conv2d(c, 4, 1)

    def forward(self, x):
        x = self.conv(x)
        gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return self.out(x * gate)


def test_squeeze_excite_gate_channels_follow_the_block():
    model = randomize_norms(SqueezeExcite())
    masks = output_channel_masks(model, ["conv.0", "fc1"])
    channels = masks["conv.0"]["weight"][:, 0, 0, 0]
    masks["conv.1"] = {"weight": channels, "bias": channels}
    check_speedup(model, masks, torch.randn(2, 3, 8, 8), torch.randn(3, 3, 7, 7),
                  shrunk=["conv.0.weight", "fc1.weight", "fc2.weight", "out.weight"])


class Dense(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(9, 6, 3, padding=1)
        self.c = nn.Conv2d(15, 4, 1)

    def forward(self, x):
        y = torch.cat([x, torch.relu(self.a(x))], 1)
        z = torch.cat([y, torch.relu(self.b(y))], 1)
        first, second, _ = z.chunk(3, dim=1)
        return self.c(z) + first.sum(1, keepdim=True) + second.mean(1, keepdim=True)


def test_concatenation_and_chunks():
    model = Dense()
    masks = output_channel_masks(model, ["a", "b"])
    check_speedup(model, masks, torch.randn(2, 3, 6, 6), torch.randn(3, 3, 5, 5))


class Spatial(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 8, 3, padding=1)
        self.c = nn.Conv2d(2, 4, 3, padding=1)

    def forward(self, x):
        x = torch.relu(self.a(x))
        x = F.max_pool2d(x, 2) + F.avg_pool2d(x, 3, stride=2, padding=1) + F.adaptive_avg_pool2d(x, x.shape[-1] // 2)
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False) + F.interpolate(x, scale_factor=2)
        x = F.pad(self.b(x), (1, 1, 2, 0))
        return self.c(F.pixel_shuffle(x, 2))


def test_pooling_interpolation_padding_and_pixel_shuffle():
    model = Spatial()
    keep = torch.tensor([True, False, True, True]).repeat(2)  # channel c*4+k of 8 feeds pixel-shuffled channel c
    masks = output_channel_masks(model, ["a"])
    masks["b"] = {"weight": rows(torch.tensor([True] * 4 + [False] * 4), (8, 16, 3, 3)),
                  "bias": torch.tensor([True] * 4 + [False] * 4)}
    del keep
    check_speedup(model, masks, torch.randn(2, 3, 8, 8), torch.randn(1, 3, 12, 12), shrunk=["a.weight", "b.weight", "c.weight"])


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(conv_bn(3, 8), nn.MaxPool2d(2), conv_bn(8, 8))
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.features(x), 1))


def test_flattened_channels_remove_their_blocks_of_linear_inputs():
    model = randomize_norms(Classifier())
    masks = output_channel_masks(model, ["features.0.0", "features.2.0"])
    report = check_speedup(model, masks, torch.randn(2, 3, 8, 8), torch.randn(5, 3, 8, 8),
                           shrunk=["features.2.0.weight", "fc.weight"])
    assert model.fc.in_features == 4 * 4 * 4
    assert report.flops_after < report.flops_before


class Norms(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(4, 8)
        self.inorm = nn.InstanceNorm2d(8, affine=True)
        self.act = nn.PReLU(8)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(self.act(self.inorm(self.gn(self.a(x)))))


def test_group_instance_norm_and_prelu_lose_whole_groups():
    model = randomize_norms(Norms())
    groups = torch.tensor([True, False, True, False]).repeat_interleave(2)
    masks = {"a": {"weight": rows(groups, (8, 3, 3, 3)), "bias": groups}}
    check_speedup(model, masks, torch.randn(2, 3, 6, 6), torch.randn(3, 3, 5, 5),
                  shrunk=["a.weight", "gn.weight", "inorm.weight", "act.weight", "b.weight"])
    assert model.gn.num_groups == 2


class FunctionalPReLU(nn.Module):
    """``F.prelu`` with slopes the module holds as a parameter (a leaky ReLU learned per channel)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)
        self.slopes = nn.Parameter(torch.rand(8))

    def forward(self, x):
        return self.b(F.prelu(self.a(x), self.slopes))


def test_functional_prelu_slices_its_slopes_and_folds_the_negative_constants_it_makes():
    model = FunctionalPReLU()
    with torch.no_grad():
        model.a.bias.copy_(torch.linspace(-1, 1, 8))  # removed channels hold their bias: some negative
    keep = keep_mask(8)
    check_speedup(model, {"a": {"weight": rows(keep, (8, 3, 3, 3))}}, torch.randn(2, 3, 6, 6),
                  torch.randn(3, 3, 7, 5), shrunk=["a.weight", "slopes", "b.weight"])


class RandomizedLeaky(nn.Module):
    """``nn.RReLU`` after a BatchNorm: in eval mode a leaky ReLU with the mean slope."""

    def __init__(self):
        super().__init__()
        self.a, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.act, self.b = nn.RReLU(), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(self.act(self.bn(self.a(x))))


def test_rrelu_passes_channels_through_and_folds_the_negative_constants_it_scales():
    """It was a barrier: nothing around it went. The removed channels hold the BatchNorm's shift, some
    negative: the slope scales those, and the next convolution folds them."""
    model = randomize_norms(RandomizedLeaky())
    with torch.no_grad():
        model.bn.bias.copy_(torch.linspace(-1, 1, 8))
    keep = keep_mask(8)
    report = check_speedup(model, {"a": {"weight": rows(keep, (8, 3, 3, 3)), "bias": keep}}, torch.randn(2, 3, 6, 6),
                           torch.randn(3, 3, 7, 5), shrunk=["a.weight", "bn.weight", "b.weight"])
    assert not report.barriers


class TwoStreams(nn.Module):
    """``nn.Bilinear`` of two projected streams, one through a BatchNorm (its removed features hold
    non-zero constants, which multiply the other stream and so must stay)."""

    def __init__(self):
        super().__init__()
        self.a, self.bn, self.b = nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(6, 5)
        self.mix, self.head = nn.Bilinear(8, 5, 7), nn.Linear(7, 3)

    def forward(self, x):
        return self.head(self.mix(self.bn(self.a(x)), self.b(x)))


def test_bilinear_loses_the_zero_features_of_either_input_and_its_masked_outputs():
    """It was a barrier (``aten._trilinear``): nothing around it went."""
    model = randomize_norms(TwoStreams())
    a_kept, b_kept, mix_kept = keep_mask(8), keep_mask(5), keep_mask(7)
    masks = {"a": {"weight": rows(a_kept, (8, 6)), "bias": a_kept},  # constant after the norm: kept
             "b": {"weight": rows(b_kept, (5, 6)), "bias": b_kept},  # zeros: go
             "mix": {"weight": rows(mix_kept, (7, 8, 5))}}  # outputs of only the bias: folded into the head
    report = check_speedup(model, masks, torch.randn(4, 6), torch.randn(5, 6),
                           shrunk=["b.weight", "mix.weight", "head.weight"])
    assert model.mix.weight.shape == (4, 8, 2) and (model.mix.out_features, model.mix.in2_features) == (4, 2)
    assert not report.barriers


class SpatialTransformer(nn.Module):
    """PyTorch's spatial transformer tutorial: a small network predicts an affine matrix per sample,
    ``affine_grid`` turns it into sampling points, ``grid_sample`` warps the input the classifier reads."""

    def __init__(self):
        super().__init__()
        self.localization = nn.Sequential(nn.Conv2d(1, 8, 7), nn.MaxPool2d(2), nn.ReLU(), nn.Conv2d(8, 10, 5),
                                          nn.MaxPool2d(2), nn.ReLU())
        self.fc_loc = nn.Sequential(nn.Linear(90, 32), nn.ReLU(), nn.Linear(32, 6))
        self.conv, self.fc = nn.Conv2d(1, 10, 5), nn.Linear(10, 4)

    def forward(self, x):
        theta = self.fc_loc(self.localization(x).flatten(1)).view(-1, 2, 3)
        x = F.grid_sample(x, F.affine_grid(theta, x.size(), align_corners=False), align_corners=False)
        return self.fc(F.relu(self.conv(x)).mean((2, 3)))


def test_a_spatial_transformer_shrinks_around_its_affine_grid():
    """``affine_grid`` was a barrier (reported, with a warning): a matrix per sample, read whole."""
    torch.manual_seed(0)
    model = SpatialTransformer()
    masks = consistent_masks(model, torch.randn(2, 1, 28, 28), sparsity=0.5, seed=0)
    report = check_speedup(model, masks, torch.randn(2, 1, 28, 28), torch.randn(3, 1, 28, 28),
                           shrunk=["localization.0.weight", "fc_loc.0.weight", "conv.weight"])
    assert not report.barriers and model.fc_loc[2].out_features == 6


def test_group_norm_keeps_partially_masked_groups():
    model = randomize_norms(Norms())
    scattered = torch.tensor([True, False] * 4)
    masks = {"a": {"weight": rows(scattered, (8, 3, 3, 3)), "bias": scattered}}
    check_speedup(model, masks, torch.randn(2, 3, 6, 6), torch.randn(3, 3, 5, 5))
    assert model.gn.num_groups == 4


class GroupNormAct(nn.GroupNorm):
    """timm's way: a GroupNorm subclass whose own ``forward`` calls ``F.group_norm`` (traced through)."""

    def forward(self, x):
        return F.relu(F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps))


class FixedGroups(nn.Module):
    """``F.group_norm`` with a group count written in the code: nothing can keep it in step."""

    def forward(self, x):
        return F.group_norm(x, 4)


def group_norm_model(norm: nn.Module) -> nn.Module:
    return randomize_norms(nn.Sequential(nn.Conv2d(3, 8, 3), norm, nn.Conv2d(8, 4, 1))).eval()


def test_group_norm_called_from_own_code_loses_whole_groups():
    model = group_norm_model(GroupNormAct(4, 8))
    groups = torch.tensor([True, False, True, False]).repeat_interleave(2)
    masks = {"0": {"weight": rows(groups, (8, 3, 3, 3)), "bias": groups}}
    report = check_speedup(model, masks, torch.randn(2, 3, 6, 6), torch.randn(3, 3, 5, 7),
                           shrunk=["0.weight", "1.weight", "2.weight"])
    assert not report.barriers and not report.kept_for_verification
    assert (model[1].num_groups, model[1].num_channels) == (2, 4)  # in step with its vectors


GROUPS_IN_STEP_UNKNOWN = {
    "no vectors": lambda: GroupNormAct(4, 8, affine=False),  # nothing says how many channels it has left
    "count in the code": FixedGroups,
}


@pytest.mark.parametrize("norm", GROUPS_IN_STEP_UNKNOWN.values(), ids=GROUPS_IN_STEP_UNKNOWN.keys())
def test_group_norm_whose_group_count_cannot_follow_keeps_its_groups(norm):
    """The sped-up call would normalise 4 channels in 4 groups instead of 2: verification sees the
    count that did not follow and keeps the call whole."""
    model = group_norm_model(norm())
    groups = torch.tensor([True, False, True, False]).repeat_interleave(2)
    masks = {"0": {"weight": rows(groups, (8, 3, 3, 3)), "bias": groups}}
    report = check_speedup(model, masks, torch.randn(2, 3, 6, 6), torch.randn(3, 3, 5, 5))
    assert not report.barriers and model[0].out_channels == 8
    assert any("called with 4 groups where 2 were planned" in reason for reason in report.kept_for_verification)


def test_group_norm_of_one_channel_per_group_gives_its_shift_for_a_constant_channel():
    model = group_norm_model(nn.GroupNorm(8, 8))
    scattered = torch.tensor([True, False] * 4)
    masks = {"0": {"weight": rows(scattered, (8, 3, 3, 3))}}  # the masked channels hold their bias
    check_speedup(model, masks, torch.randn(2, 3, 6, 6), torch.randn(3, 3, 5, 5), shrunk=["1.weight", "2.weight"])


def test_group_norm_with_a_scale_of_zero_gives_its_shift_and_partial_groups_stay():
    model = group_norm_model(GroupNormAct(4, 8))
    with torch.no_grad():
        model[1].weight[1] = 0  # channel 1 is relu(bias[1]) whatever the input: the next conv folds it
    scattered = torch.tensor([True, False] * 4)
    masks = {"0": {"weight": rows(scattered, (8, 3, 3, 3)), "bias": scattered}}
    check_speedup(model, masks, torch.randn(2, 3, 6, 6), torch.randn(3, 3, 5, 5))
    assert model[1].num_groups == 4 and model[2].in_channels == 8


class GroupNorm1(nn.GroupNorm):
    """timm's ``GroupNorm1``: one group, its own ``forward`` computing exactly ``nn.GroupNorm``'s."""

    def __init__(self, num_channels: int):
        super().__init__(1, num_channels)

    def forward(self, x):
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class OneGroupStream(nn.Module):
    """A PoolFormer-like residual stream normalised by GroupNorms of one group: the statistics of each
    sample span every channel, so the stream's masked channels (zeros) still count in them."""

    def __init__(self, norm=GroupNorm1, c: int = 12):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3)
        self.norm1, self.mix = norm(c), nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.norm2, self.fc1, self.fc2 = norm(c), nn.Conv2d(c, 2 * c, 1), nn.Conv2d(2 * c, c, 1)
        self.head_norm, self.head = norm(c), nn.Linear(c, 5)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.mix(self.norm1(x))
        x = x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
        return self.head(self.head_norm(x).mean((2, 3)))


ONE_GROUP_NORMS = {"nn.GroupNorm": lambda c: nn.GroupNorm(1, c), "own forward": GroupNorm1}


@pytest.mark.parametrize("norm", ONE_GROUP_NORMS.values(), ids=ONE_GROUP_NORMS.keys())
def test_group_norm_of_one_group_loses_channels_holding_constants_and_counts_them(norm):
    model = randomize_norms(OneGroupStream(norm))
    masks = consistent_masks(model, torch.randn(2, 3, 9, 9), sparsity=0.5, seed=0)
    check_speedup(model, masks, torch.randn(2, 3, 9, 9), torch.randn(3, 3, 8, 10), max_param_ratio=0.4,
                  shrunk=["stem.weight", "norm1.weight", "mix.weight", "fc1.weight", "fc2.weight", "head.weight"])
    assert all(isinstance(model.get_submodule(n), ConstantAwareGroupNorm) for n in ("norm1", "norm2", "head_norm"))
    assert (model.norm1.num_groups, model.norm1.num_channels) == (1, 6)


def test_group_norm_of_several_groups_is_offered_whole_groups_and_stays_torchs():
    model = randomize_norms(OneGroupStream(lambda c: nn.GroupNorm(4, c)))
    masks = consistent_masks(model, torch.randn(2, 3, 9, 9), sparsity=0.5, seed=0)
    check_speedup(model, masks, torch.randn(2, 3, 9, 9), torch.randn(3, 3, 8, 10), max_param_ratio=0.4,
                  shrunk=["stem.weight", "norm1.weight", "fc2.weight", "head.weight"])
    assert type(model.norm1) is nn.GroupNorm and (model.norm1.num_groups, model.norm1.num_channels) == (2, 6)


@pytest.mark.parametrize("groups", [1, 4])
def test_group_norm_folds_non_zero_constants_of_any_channels_and_trains_like_the_masked_model(groups):
    # The masked channels of the conv hold its bias: non-zero constants the statistics must count.
    # The norm's own vectors are masked with them, so its output there is zero: nothing reads them.
    # With 4 groups of 2, the groups keep 1, 2, 0 and 1 channels.
    model = randomize_norms(nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(groups, 8), nn.Conv2d(8, 4, 1)))
    kept = torch.tensor([True, False, True, True, False, False, True, False])
    masks = {"0": {"weight": rows(kept, (8, 3, 3, 3))}, "1": {"weight": kept, "bias": kept}}
    masked = masked_copy(model, masks)
    check_speedup(model, masks, torch.randn(2, 3, 6, 6), torch.randn(3, 3, 5, 7),
                  shrunk=["0.weight", "1.weight", "2.weight"])
    assert isinstance(model[1], ConstantAwareGroupNorm)
    assert (model[1].num_groups, model[1].num_channels) == (min(groups, 3), 4)
    x = torch.randn(3, 3, 5, 7, requires_grad=True)
    masked(x).square().sum().backward()
    y = x.detach().clone().requires_grad_()
    model(y).square().sum().backward()
    torch.testing.assert_close(y.grad, x.grad, rtol=1e-4, atol=1e-5)


class ChunkedNorm(nn.Module):
    """A group norm over one chunk of the channels: a view that is not contiguous beyond batch 1."""

    def __init__(self):
        super().__init__()
        self.conv, self.norm, self.head = nn.Conv2d(3, 12, 3), nn.GroupNorm(1, 6), nn.Conv2d(12, 4, 1)

    def forward(self, x):
        first, second = self.conv(x).chunk(2, 1)
        return self.head(torch.cat([self.norm(first), second], 1))


def test_group_norm_counting_constants_takes_a_chunk_of_channels_at_any_batch():
    model = randomize_norms(ChunkedNorm())
    kept = torch.tensor([True, False, True, True, False, True])
    masks = {"conv": {"weight": rows(kept.repeat(2), (12, 3, 3, 3))}, "norm": {"weight": kept, "bias": kept}}
    check_speedup(model, masks, torch.randn(1, 3, 6, 6), torch.randn(3, 3, 5, 7), shrunk=["conv.weight", "head.weight"])
    assert isinstance(model.norm, ConstantAwareGroupNorm) and model.norm.num_channels == 4


def test_group_norm_of_one_group_keeps_varying_channels_it_zeroes():
    # A scale of zero makes the output channel its shift, but the input channel still counts in the
    # statistics of every other channel: the conv before keeps it (and so does the norm).
    model = randomize_norms(nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(1, 8), nn.Conv2d(8, 4, 1)))
    half = torch.tensor([True, False] * 4)
    masks = {"1": {"weight": half, "bias": half}}
    check_speedup(model, masks, torch.randn(2, 3, 6, 6), torch.randn(3, 3, 5, 7))
    assert model[0].out_channels == 8 and type(model[1]) is nn.GroupNorm and model[1].num_channels == 8


def test_group_norm_subclass_adding_work_is_not_claimed_as_a_group_norm():
    from speedup.rules.norm import recognise_group_norm

    assert recognise_group_norm(GroupNorm1(6)) is not None
    assert recognise_group_norm(GroupNormAct(1, 6)) is None  # its ReLU: traced through
    assert recognise_group_norm(nn.GroupNorm(2, 6, affine=False)) is None


def test_weights_masked_elementwise_keep_their_zeros():
    # Fine-grained masks do not remove channels, but the result must still be the masked model.
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
    masks = {"0": {"weight": torch.rand(8, 3, 3, 3) > 0.5}, "2": {"weight": torch.rand(4, 8, 3, 3) > 0.3}}
    check_speedup(model, masks, torch.randn(2, 3, 6, 6), torch.randn(1, 3, 7, 7))


def test_masks_given_as_input_and_output_targets():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
    keep = keep_mask(8).float().reshape(1, 8, 1, 1)
    masks = {"0": {"_output_0": keep}, "2": {"_input_0": keep}}
    check_speedup(model, masks, torch.randn(2, 3, 6, 6), torch.randn(3, 3, 6, 6), shrunk=["0.weight", "2.weight"])


def test_a_buffer_passed_to_a_child_module_is_sliced_on_its_owner():
    """The parent's buffer feeds a Linear as its input: it loses the columns the Linear no longer reads."""

    class Table(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("coords", torch.randn(6, 4))
            self.embed = nn.Linear(4, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(torch.relu(self.embed(self.coords)).mean(0) + x)

    model = Table()
    masks = {"embed": {"weight": torch.tensor([1, 0, 1, 1], dtype=torch.bool).expand(8, 4)}}
    check_speedup(model, masks, torch.randn(2, 8), torch.randn(5, 8), shrunk=["embed.weight", "coords"])


class BatchNormAct(nn.BatchNorm2d):
    """A BatchNorm with a forward of its own calling ``F.batch_norm`` (timm's ``BatchNormAct2d``)."""

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, self.eps)
        return F.silu(x)


class BatchStatistics(nn.Module):
    """``F.batch_norm`` on the batch's own statistics (training=True, no running statistics)."""

    def __init__(self, c=8):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(c) + 0.5)
        self.bias = nn.Parameter(torch.rand(c) - 0.5)

    def forward(self, x):
        return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.1, 1e-5)


@pytest.mark.parametrize("norm", ["running statistics", "batch statistics"])
def test_functional_batch_norm_loses_channels_with_its_vectors(norm):
    second = BatchNormAct(8) if norm == "running statistics" else BatchStatistics(8)
    model = randomize_norms(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), second, nn.Conv2d(8, 4, 3, padding=1)))
    masks = output_channel_masks(model, ["0"])
    check_speedup(model, masks, torch.randn(2, 3, 6, 6), torch.randn(3, 3, 7, 5),
                  shrunk=["0.weight", "1.weight", "1.bias", "2.weight"])
    if norm == "running statistics":
        assert model[1].running_mean.shape == (4,) and model[1].num_features == 4


class ShiftedWithTable(nn.Module):
    """A cyclic shift of the feature map (Swin's) and a table of per-channel biases read at literal
    positions (a relative position bias table indexed by a buffer); optionally a roll of the channels."""

    def __init__(self, roll_channels: bool, c=8):
        super().__init__()
        self.roll_channels = roll_channels
        self.a = nn.Conv2d(3, c, 3, padding=1)
        self.table = nn.Parameter(torch.randn(5, c))
        self.register_buffer("positions", torch.tensor([0, 3, 1, 4, 2, -1]))
        self.b = nn.Conv2d(c, 4, 1)

    def forward(self, x):
        y = torch.roll(self.a(x), shifts=(1, -2), dims=(2, 3))
        y = y + self.table[self.positions].t().reshape(1, -1, 2, 3).mean((2, 3), keepdim=True)
        return self.b(torch.roll(y, 1, 1) if self.roll_channels else y)


def test_roll_and_table_lookups_pass_channels_through():
    model = ShiftedWithTable(roll_channels=False)
    masks = output_channel_masks(model, ["a"])
    report = check_speedup(model, masks, torch.randn(2, 3, 6, 7), torch.randn(3, 3, 5, 9),
                           shrunk=["a.weight", "table", "b.weight"])
    assert not report.barriers


def test_channels_rolled_by_a_literal_amount_keep_their_size():
    model = ShiftedWithTable(roll_channels=True)
    masks = output_channel_masks(model, ["a"])
    report = check_speedup(model, masks, torch.randn(2, 3, 6, 7), torch.randn(3, 3, 5, 9))
    assert model.a.weight.shape[0] == 8 and model.b.weight.shape[1] == 8 and not report.barriers


class LiteralSplit(nn.Module):
    """Res2Net's block: channels split into parts of a literal width, which a smaller tensor breaks."""

    def __init__(self, c=8):
        super().__init__()
        self.a = nn.Conv2d(c, c, 1)
        self.b = nn.Conv2d(c // 2, c // 2, 3, padding=1)

    def forward(self, x):
        first, second = torch.split(self.a(x), 4, 1)
        return torch.cat([first, self.b(second)], 1)


class SlicedParts(nn.Module):
    """A layer's output cut into two parts with slices, each read by its own layer (TabNet's split)."""

    def __init__(self):
        super().__init__()
        self.fc, self.a, self.b = nn.Linear(6, 16), nn.Linear(8, 3), nn.Linear(8, 3)

    def forward(self, x):
        h = self.fc(x)
        return self.a(h[:, :8]) + self.b(h[:, 8:])


def test_parts_cut_with_slices_lose_the_entries_of_the_open_ended_part():
    """The first part's literal end pins its entries, but the entries it does not select are the second
    part's, which adapts to a shorter dimension (both were kept whole: the first slice kept every entry
    it did not select, for bounds that might depend on the input)."""
    model = SlicedParts()
    keep = torch.ones(16, dtype=torch.bool)
    keep[[9, 11, 13, 15]] = False
    masks = {"fc": {"weight": rows(keep, (16, 6)), "bias": keep}}
    check_speedup(model, masks, torch.randn(2, 6), torch.randn(5, 6), shrunk=["fc.weight", "b.weight"])
    assert model.fc.out_features == 12 and model.b.in_features == 4 and model.a.in_features == 8


def test_a_literal_split_kept_after_verification_is_kept_in_every_block_at_once():
    model = randomize_norms(nn.Sequential(nn.Conv2d(3, 8, 1), LiteralSplit(), LiteralSplit(), LiteralSplit(),
                                          nn.Conv2d(8, 2, 1)))
    same_position_in_both_parts = torch.tensor([True, False, True, True] * 2)
    masks = {f"{i}.a": {"weight": rows(same_position_in_both_parts, (8, 8, 1, 1)), "bias": same_position_in_both_parts}
             for i in (1, 2, 3)}
    masks["0"] = {"weight": rows(keep_mask(8), (8, 3, 1, 1))}
    report = check_speedup(model, masks, torch.randn(2, 3, 6, 6), torch.randn(3, 3, 5, 7), shrunk=["0.weight", "1.a.weight"])
    assert len(report.kept_for_verification) == 1  # one more attempt, not one per block
    assert [model[i].a.out_channels for i in (1, 2, 3)] == [8, 8, 8]


class ChannelsFirstLayerNorm(nn.LayerNorm):
    """timm's ``LayerNorm2d``: ``F.layer_norm`` over the channels, in a forward of its own."""

    def forward(self, x):
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class WrittenOutLayerNorm(nn.Module):
    """Hugging Face's ``ConvNextLayerNorm`` for channels first: the statistics written out."""

    def __init__(self, c, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))
        self.eps = eps

    def forward(self, x):
        mean = x.mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt((x - mean).pow(2).mean(1, keepdim=True) + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class EpsilonInTheCode(WrittenOutLayerNorm):
    """The statistics written out with the epsilon in the code (no attribute)."""

    def __init__(self, c):
        super().__init__(c)
        del self.eps

    def forward(self, x):
        mean = x.mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt((x - mean).pow(2).mean(1, keepdim=True) + 1e-6)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class RootMeanSquare(WrittenOutLayerNorm):
    """Has a LayerNorm's parameters but computes something else: not recognised, traced through."""

    def forward(self, x):
        return self.weight[:, None, None] * x / torch.sqrt(x.pow(2).mean(1, keepdim=True) + self.eps)


@pytest.mark.parametrize("norm", [ChannelsFirstLayerNorm, WrittenOutLayerNorm, EpsilonInTheCode, RootMeanSquare])
def test_layer_norms_written_by_hand_are_recognised_by_what_they_compute(norm):
    """Also with the epsilon written in the code, found on small probes (where it weighs): the norm
    counting removed channels uses it, and kept the stream whole before."""
    model = randomize_norms(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), norm(8), nn.Conv2d(8, 4, 1)))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    masks = output_channel_masks(model, ["0"])
    masks["1"] = {"weight": masks["0"]["bias"], "bias": masks["0"]["bias"]}  # the channel goes everywhere
    recognised = norm is not RootMeanSquare
    report = check_speedup(model, masks, torch.randn(2, 3, 6, 6), torch.randn(3, 3, 5, 7),
                           shrunk=["0.weight", "1.weight", "2.weight"] if recognised else [])
    if recognised:
        assert model[1].weight.shape == (4,) and not report.barriers
    else:
        assert model[2].weight.shape == (4, 8, 1, 1)


def test_a_layer_norm_with_the_epsilon_in_its_code_counts_removed_channels_with_that_epsilon():
    """In float64, where 1e-5 for 1e-6 shows: the epsilon is found on probes small enough that it weighs
    (on ordinary ones any usual epsilon matches)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), EpsilonInTheCode(8), nn.Conv2d(8, 4, 1)).double().eval()
    masks = output_channel_masks(model, ["0"])
    masks["1"] = {"weight": masks["0"]["bias"], "bias": masks["0"]["bias"]}  # the channel goes everywhere
    reference = masked_copy(model, masks).eval()
    dummy, fresh = torch.randn(2, 3, 6, 6, dtype=torch.float64), torch.randn(3, 3, 5, 7, dtype=torch.float64)
    check_speedup(model, masks, dummy, fresh, shrunk=["0.weight", "2.weight"])
    with torch.no_grad():
        torch.testing.assert_close(model(fresh), reference(fresh), rtol=1e-12, atol=1e-12)
    assert model[1].eps == 1e-6


class VectorsNamedByTheCode(nn.Module):
    """ConvNeXt's norm as research code writes it: the vectors named and laid out as the code likes (a
    shift may be a buffer, or absent), the epsilon in the code."""

    def __init__(self, c, scale="gamma", shift="beta", shape=(1, -1, 1, 1), shift_is_buffer=False):
        super().__init__()
        self.names = (scale, shift)
        setattr(self, scale, nn.Parameter((torch.rand(c) + 0.5).reshape(shape)))
        if shift is not None:
            vector = (torch.rand(c) - 0.5).reshape(shape)
            if shift_is_buffer:
                self.register_buffer(shift, vector)
            else:
                setattr(self, shift, nn.Parameter(vector))

    def forward(self, x):
        mean = x.mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(x.var(1, keepdim=True, unbiased=False) + 1e-6)
        x = getattr(self, self.names[0]).reshape(1, -1, 1, 1) * x
        return x + getattr(self, self.names[1]).reshape(1, -1, 1, 1) if self.names[1] is not None else x


class NormedResidual(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.stem, self.norm = nn.Conv2d(3, 8, 3, padding=1), norm(8)
        self.conv, self.head = nn.Conv2d(8, 8, 1), nn.Linear(8, 4)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.conv(F.gelu(self.norm(x)))
        return self.head(x.mean((2, 3)))


WRITTEN_NORMS = {
    "gamma-beta (1, C, 1, 1)": lambda c: VectorsNamedByTheCode(c),
    "g-b (C,)": lambda c: VectorsNamedByTheCode(c, "g", "b", (-1,)),
    "shift a buffer (C, 1, 1)": lambda c: VectorsNamedByTheCode(c, "scale", "offset", (-1, 1, 1), shift_is_buffer=True),
    "no shift": lambda c: VectorsNamedByTheCode(c, "alpha", None, (-1,)),
}


@pytest.mark.parametrize("norm", WRITTEN_NORMS.values(), ids=WRITTEN_NORMS.keys())
def test_a_layer_norm_written_by_hand_is_recognised_whatever_its_vectors_are_called(norm):
    """Which vector scales and which shifts is told by running the module, not by the names: each kept
    the residual stream whole (parameters 1.0 under consistent masks)."""
    torch.manual_seed(0)
    model = NormedResidual(norm).eval()
    dummy = torch.randn(2, 3, 6, 6)
    masks = consistent_masks(model, dummy, sparsity=0.5, seed=0)
    scale = model.norm.names[0]
    report = check_speedup(model, masks, dummy, torch.randn(3, 3, 5, 7),
                           shrunk=["stem.weight", "conv.weight", "head.weight"], max_param_ratio=0.5)
    assert model.stem.out_channels == 4 and not report.barriers
    assert getattr(model.norm, scale, None) is None or getattr(model.norm, scale).numel() == 4


class SequenceChannelsLayerNorm(nn.LayerNorm):
    """SqueezeBERT's norm: sequences laid out ``(N, C, L)``, permuted around ``nn.LayerNorm.forward``."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 1)).permute(0, 2, 1)


def test_a_layer_norm_over_the_channels_of_sequences_is_recognised():
    model = nn.Sequential(nn.Conv1d(3, 8, 3, padding=1), SequenceChannelsLayerNorm(8), nn.Conv1d(8, 4, 1)).eval()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    masks = output_channel_masks(model, ["0"])  # the removed channels are zero, and counted by the norm
    masks["1"] = {"weight": masks["0"]["bias"], "bias": masks["0"]["bias"]}
    report = check_speedup(model, masks, torch.randn(2, 3, 9), torch.randn(3, 3, 5), shrunk=["0.weight", "2.weight"])
    assert model[1].normalized_shape == (4,) and not report.barriers


class ChannelsLastResponseNorm(nn.Module):
    """Hugging Face's ``ConvNextV2GRN``: global response normalisation, channels last, a literal epsilon."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(1, 1, 1, dim) + 0.5)
        self.bias = nn.Parameter(torch.rand(1, 1, 1, dim) - 0.5)

    def forward(self, x):
        norms = torch.linalg.vector_norm(x, ord=2, dim=(1, 2), keepdim=True)
        return self.weight * (x * (norms / (norms.mean(dim=-1, keepdim=True) + 1e-6))) + self.bias + x


class ChannelsFirstResponseNorm(nn.Module):
    """timm's ``GlobalResponseNorm(channels_last=False)``: vectors, an ``eps`` attribute."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(dim) + 0.5)
        self.bias = nn.Parameter(torch.rand(dim) - 0.5)
        self.eps = eps

    def forward(self, x):
        norms = x.norm(p=2, dim=(2, 3), keepdim=True)
        scaled = x * (norms / (norms.mean(dim=1, keepdim=True) + self.eps))
        return x + torch.addcmul(self.bias.view(1, -1, 1, 1), self.weight.view(1, -1, 1, 1), scaled)


class ScaleShift(ChannelsFirstResponseNorm):
    """The same vectors, computing something else: not recognised."""

    def forward(self, x):
        return x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


class ResponseNormMlp(nn.Module):
    """ConvNeXt V2's MLP: expand, GELU, global response norm, project back."""

    def __init__(self, channels_last: bool):
        super().__init__()
        self.channels_last = channels_last
        self.fc1, self.fc2 = (nn.Linear(8, 16), nn.Linear(16, 8)) if channels_last else (nn.Conv2d(8, 16, 1), nn.Conv2d(16, 8, 1))
        self.grn = ChannelsLastResponseNorm(16) if channels_last else ChannelsFirstResponseNorm(16)

    def forward(self, x):
        x = x.permute(0, 2, 3, 1) if self.channels_last else x
        x = self.fc2(self.grn(F.gelu(self.fc1(x))))
        return x.permute(0, 3, 1, 2) if self.channels_last else x


@pytest.mark.parametrize("channels_last", [True, False], ids=["channels-last", "channels-first"])
@pytest.mark.parametrize("constants", ["zeros", "counted"])
def test_a_global_response_norm_loses_hidden_channels_and_still_counts_them(channels_last, constants):
    """Zeros: the removed channels' norms are zero, but the mean is still over every channel. Counted:
    the removed channels hold GELU(bias), which the mean counts, while the projection no longer reads them."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), ResponseNormMlp(channels_last)).eval()
    masks = output_channel_masks(model, ["1.fc1"], with_bias=constants == "zeros")
    if constants == "counted":
        kept = masks["1.fc1"]["weight"].reshape(16, -1)[:, 0]
        masks["1.fc2"] = {"weight": kept.reshape(1, 16, *([1] * (model[1].fc2.weight.dim() - 2))).expand_as(model[1].fc2.weight)}
    report = check_speedup(model, masks, torch.randn(2, 3, 6, 6), torch.randn(3, 3, 5, 9),
                           shrunk=["1.fc1.weight", "1.grn.weight", "1.fc2.weight"])
    assert model[1].grn.weight.numel() == 8 and not report.barriers
    assert isinstance(model[1].grn, ConstantAwareResponseNorm)
    assert (float(model[1].grn.removed_norm_sum) > 0) == (constants == "counted")


class OfficialResponseNorm(nn.Module):
    """ConvNeXt V2's own GRN, channels last: ``gamma`` and ``beta`` shaped ``(1, 1, 1, C)``."""

    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(1, 1, 1, dim) + 0.5)
        self.beta = nn.Parameter(torch.rand(1, 1, 1, dim) - 0.5)

    def forward(self, x):
        gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return self.gamma * (x * nx) + self.beta + x


def test_a_response_norm_with_vectors_of_its_own_names_loses_hidden_channels():
    """It kept the hidden channels of every block (the vectors were looked for as ``weight`` and ``bias``)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), ResponseNormMlp(True)).eval()
    model[1].grn = OfficialResponseNorm(16)
    masks = output_channel_masks(model, ["1.fc1"])
    check_speedup(model, masks, torch.randn(2, 3, 6, 6), torch.randn(3, 3, 5, 9),
                  shrunk=["1.fc1.weight", "1.fc2.weight"])
    assert isinstance(model[1].grn, ConstantAwareResponseNorm) and model[1].grn.weight.numel() == 8


def test_a_module_with_a_response_norms_vectors_computing_something_else_is_not_recognised():
    from speedup.rules.response_norm import recognise_response_norm

    assert recognise_response_norm(ChannelsFirstResponseNorm(6)) is not None
    assert recognise_response_norm(ChannelsLastResponseNorm(6)) is not None
    assert recognise_response_norm(ScaleShift(6)) is None
    assert recognise_response_norm(ChannelsFirstResponseNorm(6, eps=1e-3)).eps == 1e-3


class ChannelsFirstRMSNorm(nn.Module):
    """timm's ``RmsNorm2d``: an RMS norm over dimension 1, its ``normalized_shape`` checked in forward."""

    def __init__(self, channels, eps=1e-5):
        super().__init__()
        self.normalized_shape, self.eps = (channels,), eps
        self.weight = nn.Parameter(torch.rand(channels) + 0.5)

    def forward(self, x):
        assert x.shape[1] == self.normalized_shape[0]
        return x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + self.eps) * self.weight.reshape(1, -1, 1, 1)


@pytest.mark.parametrize("with_bias", [False, True], ids=["zeros", "constants"])
def test_an_rms_norm_over_channels_written_by_hand_loses_channels(with_bias):
    """Removed channels holding constants (a bias left unmasked) still count in the mean square."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), ChannelsFirstRMSNorm(8), nn.Conv2d(8, 4, 1)).eval()
    masks = output_channel_masks(model, ["0"], with_bias=not with_bias)
    masks["1"] = {"weight": masks["0"]["weight"][:, 0, 0, 0]}
    report = check_speedup(model, masks, torch.randn(2, 3, 6, 6), torch.randn(3, 3, 5, 7),
                           shrunk=["0.weight", "1.weight", "2.weight"])
    assert model[1].normalized_shape == (4,) and not report.barriers


class ActivatedRMSNorm(ChannelsFirstRMSNorm):
    """timm's ``RmsNormAct2d`` (MobileNetV5): the RMS norm over channels, then its ``drop`` and ``act``."""

    def __init__(self, channels, act: nn.Module):
        super().__init__(channels)
        self.drop, self.act = nn.Identity(), act

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


@pytest.mark.parametrize("act", [nn.GELU(approximate="tanh"), nn.Sigmoid(), nn.Identity()],
                         ids=["gelu", "sigmoid", "identity"])
def test_an_rms_norm_over_channels_followed_by_its_own_activation_loses_channels(act):
    """The norm holding an activation was no leaf, so no recogniser looked at it: traced through, its
    mean square read every channel, and no layer around it lost any (MobileNetV5 kept 92% of its
    parameters). Claimed as the norm it computes with its activation after, its removed channels'
    constants (``sigmoid(0)`` = 0.5, folded into the next conv) go through the activation."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), ActivatedRMSNorm(8, act), nn.Conv2d(8, 4, 1),
                          ActivatedRMSNorm(4, act), nn.Conv2d(4, 2, 1)).eval()
    masks = output_channel_masks(model, ["0", "2"], with_bias=True)
    masks["1"] = {"weight": masks["0"]["weight"][:, 0, 0, 0]}
    report = check_speedup(model, masks, torch.randn(2, 3, 6, 6), torch.randn(3, 3, 5, 7),
                           shrunk=["0.weight", "1.weight", "2.weight", "3.weight"])
    assert model[1].normalized_shape == (4,) and not report.barriers


def test_a_norm_whose_children_are_not_entry_by_entry_is_not_claimed_with_them():
    from speedup.rules.activated_norms import recognise_activated_norm

    assert recognise_activated_norm(ActivatedRMSNorm(8, nn.GELU())) is not None
    assert recognise_activated_norm(ActivatedRMSNorm(8, nn.Softmax(1))) is None
    assert recognise_activated_norm(ActivatedRMSNorm(8, nn.Conv2d(8, 8, 1))) is None


class FunctionalWindows(nn.Module):
    """Code of its own: ``F.unfold`` (im2col) patches, ``F.layer_norm`` over the width and
    ``Tensor.unfold`` windows, as HaloNet and VOLO write them."""

    def __init__(self, c=8):
        super().__init__()
        self.a = nn.Conv2d(3, c, 3, padding=1)
        self.b = nn.Linear(c * 9, 5)
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        y = self.a(x)
        patches = self.b(F.unfold(y, 3, padding=1).transpose(1, 2)).mean(1)  # rows c * 9 .. c * 9 + 8
        rows = F.layer_norm(y, (y.shape[-1],)).mean((2, 3))
        windows = y.unfold(3, 2, 2).mean((2, 3, 4))  # (N, c, H, W // 2, 2)
        return patches + self.head(rows + windows)


class FoldBack(nn.Module):
    """Patches taken with ``F.unfold``, weighted per tap, summed back with ``F.fold`` (VOLO's outlook
    attention folds its windows back so)."""

    def __init__(self, mix: bool = False):
        super().__init__()
        self.a, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)
        self.taps = nn.Parameter(torch.rand(9, 1) + 0.5)
        self.mix = nn.Linear(9, 9, bias=False) if mix else None

    def forward(self, x):
        y = F.relu(self.a(x))
        n, c, h, w = y.shape
        cols = F.unfold(y, 3, padding=1).view(n, c, 9, h * w) * self.taps
        if self.mix is not None:  # the taps mixed by a Linear, the channels a leading dimension
            cols = self.mix(cols.transpose(2, 3)).transpose(2, 3)
        return self.c(F.fold(cols.reshape(n, c * 9, h * w), (h, w), 3, padding=1))


@pytest.mark.parametrize("mix", [False, True], ids=["taps weighted", "taps mixed by a Linear"])
def test_fold_passes_channels_with_all_their_taps(mix):
    """``F.fold`` (``aten.col2im``) was a barrier: nothing before it lost a channel. Zero channels stay
    zero through the fold (a channel holding another constant would not: windows overlap unevenly at
    the borders), and through a Linear without bias mixing the taps, the channels being one of its
    leading dimensions (its zero slices were not followed)."""
    model = FoldBack(mix)
    masks = output_channel_masks(model, ["a"])
    report = check_speedup(model, masks, torch.randn(2, 3, 6, 6), torch.randn(3, 3, 7, 5),
                           shrunk=["a.weight", "c.weight"])
    assert not report.barriers


def test_functional_windows_and_layer_norm_pass_channels():
    model = FunctionalWindows()
    masks = output_channel_masks(model, ["a"])
    keep = masks["a"]["bias"]
    masks["head"] = {"weight": keep.expand(5, 8)}
    report = check_speedup(model, masks, torch.randn(2, 3, 6, 6), torch.randn(3, 3, 6, 8),
                           shrunk=["a.weight", "b.weight", "head.weight"])
    assert model.b.in_features == 4 * 9 and not report.barriers


def test_a_call_its_rule_cannot_describe_reads_all_its_input():
    """``roll`` of the flattened tensor: no dimension maps, so every input entry is needed (the
    layers before it keep everything they feed it)."""

    class FlatRoll(nn.Module):
        def __init__(self):
            super().__init__()
            self.p, self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 6), nn.Linear(6, 3)

        def forward(self, x):
            return self.b(torch.roll(self.a(torch.relu(self.p(x))), 1))

    model = FlatRoll()
    check_speedup(model, {"b": {"weight": torch.ones(3, 6, dtype=torch.bool)}}, torch.randn(2, 4), torch.randn(5, 4))
    assert model.a.weight.shape == (6, 5)


_GRID = F.affine_grid(torch.tensor([[[0.9, 0.2, 0.1], [-0.1, 1.1, -0.2]]]), [1, 1, 5, 4], align_corners=False)


def _sample(x, padding_mode):
    """Points of a 5 x 4 grid, some outside the input (read as zeros, or as the nearest border)."""
    grid = _GRID.expand(x.shape[0], -1, -1, -1)
    return F.grid_sample(x, grid, padding_mode=padding_mode, align_corners=False)


ALONG_OTHER_DIMENSIONS = {  # the operator, and whether channels holding a constant give constants
    "cumsum": (lambda x: x.cumsum(3), False),
    "cumprod": (lambda x: x.cumprod(2), False),
    "sort": (lambda x: x.sort(3, descending=True).values, True),
    "cummax": (lambda x: torch.cummax(x, 2).values, True),
    "topk": (lambda x: x.topk(3, dim=3).values, True),
    "rot90": (lambda x: torch.rot90(x, 1, (2, 3)), True),
    "grid_sample zeros": (lambda x: _sample(x, "zeros"), False),
    "grid_sample border": (lambda x: _sample(x, "border"), True),
    "max_unpool": (lambda x: F.max_unpool2d(*F.max_pool2d(x, 2, return_indices=True), 2), False),
    # A norm of a constant over H x W entries depends on H x W: images of another size give another.
    "vector_norm": (lambda x: x * torch.linalg.vector_norm(x, dim=(2, 3), keepdim=True), False),
    "var_mean": (lambda x: torch.var_mean(x, dim=(2, 3), keepdim=True)[0] * x + torch.std_mean(x, dim=3)[1][..., None], True),
    "vector_norm ord 1": (lambda x: x + torch.linalg.vector_norm(x, ord=1, dim=(2, 3), keepdim=True), False),
    "vector_norm ord inf": (lambda x: x + torch.linalg.vector_norm(x, ord=float("inf"), dim=(2, 3), keepdim=True), True),
    "softmax over H, W": (lambda x: x * x.flatten(2).softmax(-1).view_as(x), False),
    "avg_pool dividing by a number": (lambda x: F.avg_pool2d(x, 2, divisor_override=1), False),
    "zeros_like": (lambda x: torch.where(x > 0, x, torch.zeros_like(x)), True),
    "full_like": (lambda x: x * torch.full_like(x, 3.0) + torch.ones_like(x), True),
    "new_zeros": (lambda x: x * x.new_ones(1, 1, 1, 1) + x.new_full((1, 1, 1, 6), 0.5) + x.new_zeros(6), True),
    "logsigmoid": (F.logsigmoid, True),
    "clamp to bounds of inf held as tensors": (
        lambda x: torch.clamp(x, x.new_tensor(-float("inf")), x.new_tensor(float("inf"))), True),
    "sinc, erfcx, heaviside, logaddexp": (
        lambda x: torch.heaviside(torch.special.erfcx(torch.sinc(x)), x.new_tensor(0.5)) + torch.logaddexp(x, -x),
        True),
    "layer_norm over H, W": (lambda x: F.layer_norm(x, x.shape[-2:]), True),
}


class AlongOtherDimensions(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.a, self.fn, self.b = nn.Conv2d(3, 8, 3, padding=1), fn, nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(self.fn(self.a(x)))


@pytest.mark.parametrize("fn, keeps_constants", ALONG_OTHER_DIMENSIONS.values(), ids=ALONG_OTHER_DIMENSIONS.keys())
def test_operators_along_other_dimensions_pass_channels_through(fn, keeps_constants):
    """Scans, sorts, rotations, resampling and tensors made like another treat channels apart: zero
    channels go, and channels holding a bias go where the operator keeps constants (the next conv
    folds them), else stay."""
    model = AlongOtherDimensions(fn).eval()
    masked = torch.tensor([False, True, False, True, True, False, False, True])
    zero = torch.tensor([False, True, False, False, True, False, False, False])  # the others keep their bias
    masks = {"a": {"weight": rows(~masked, (8, 3, 3, 3)), "bias": ~zero}}
    report = check_speedup(model, masks, torch.randn(2, 3, 6, 6), torch.randn(3, 3, 6, 6), shrunk=["a.weight"])
    assert not report.barriers
    assert model.a.out_channels == (4 if keeps_constants else 6)


class VectorQuantized(nn.Module):
    """A VQ-VAE's bottleneck: each position takes the nearest vector of a codebook (``cdist``, which
    runs as ``_euclidean_dist`` for more than 25 rows)."""

    def __init__(self):
        super().__init__()
        self.encode, self.codebook, self.decode = nn.Conv2d(3, 8, 3, padding=1), nn.Embedding(10, 8), nn.Conv2d(8, 3, 1)

    def forward(self, x):
        z = self.encode(x)
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        nearest = self.codebook(torch.cdist(flat, self.codebook.weight).argmin(-1))
        return self.decode(nearest.reshape(z.permute(0, 2, 3, 1).shape).permute(0, 3, 1, 2) + 0.1 * z)


@pytest.mark.parametrize("side", [4, 6])
def test_features_masked_in_both_operands_of_a_distance_go(side):
    """``cdist`` was a barrier: the encoder's and the codebook's masked features stayed."""
    torch.manual_seed(0)
    model = VectorQuantized().eval()
    keep = torch.arange(8) % 2 == 0
    masks = {"encode": {"weight": rows(keep, (8, 3, 3, 3)), "bias": keep}, "codebook": {"weight": keep.expand(10, 8)}}
    report = check_speedup(model, masks, torch.randn(1, 3, side, side), torch.randn(2, 3, 7, 7),
                           shrunk=["encode.weight", "codebook.weight", "decode.weight"])
    assert not report.barriers


FEATURE_NORMS = {  # the norm over the features, and whether zero features leave it as it is
    "2": (lambda h: torch.linalg.vector_norm(h, dim=-1, keepdim=True), True),
    "1, written torch.norm": (lambda h: torch.norm(h, p=1, dim=-1, keepdim=True), True),
    "0": (lambda h: torch.linalg.vector_norm(h, ord=0, dim=-1, keepdim=True), True),
    "inf": (lambda h: torch.linalg.vector_norm(h, ord=float("inf"), dim=-1, keepdim=True), True),
    "-1": (lambda h: torch.linalg.vector_norm(h, ord=-1, dim=-1, keepdim=True), False),
    "-inf, written torch.norm": (lambda h: torch.norm(h, p=float("-inf"), dim=-1, keepdim=True), False),
}


class ScaledByFeatureNorm(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.fc, self.norm, self.head = nn.Linear(6, 8), norm, nn.Linear(8, 3)

    def forward(self, x):
        h = self.fc(x)
        return self.head(h) * self.norm(h)


@pytest.mark.parametrize("norm, ignores_zeros", FEATURE_NORMS.values(), ids=FEATURE_NORMS.keys())
def test_a_norm_over_the_features_loses_zero_features_unless_its_order_is_negative(norm, ignores_zeros):
    """A norm of order -1 or -inf is zero where one entry is: removing the zero features changed it,
    and the call ended in a VerificationError ("please report"). ``torch.norm`` was a barrier."""
    torch.manual_seed(0)
    model = ScaledByFeatureNorm(norm).eval()
    keep = torch.arange(8) % 2 == 0
    report = check_speedup(model, {"fc": {"weight": rows(keep, (8, 6)), "bias": keep}}, torch.randn(2, 6),
                           torch.randn(5, 6))
    assert model.fc.out_features == (4 if ignores_zeros else 8) and not report.barriers


POOLS_OVER_TOKENS = {  # the pooling, and whether a constant channel pools to a constant whatever the count
    "sum": (lambda h: h.sum(1), False),
    "logsumexp": (lambda h: h.logsumexp(1), False),
    "norm": (lambda h: h.norm(dim=1), False),
    "einsum": (lambda h: torch.einsum("btc->bc", h), False),
    "sum over the batch": (lambda h: h.mean(1) - h.mean(1).sum(0, keepdim=True), False),
    "softmax over the batch": (lambda h: h.mean(1).softmax(0), False),
    "mean times the length": (lambda h: h.mean(1) * h.shape[1], False),
    "one minus the mean": (lambda h: 1 - h.mean(1), True),
    "prod of ones": (lambda h: (h * 0 + 1).prod(1) * h.mean(1), True),
    "mean": (lambda h: h.mean(1), True),
    "amax": (lambda h: h.amax(1), True),
    "median": (lambda h: h.median(1).values, True),
    "kthvalue": (lambda h: h.kthvalue(2, 1).values, True),
    "aminmax": (lambda h: sum(torch.aminmax(h, dim=1)), True),
    "count_nonzero": (lambda h: h.mean(1) * torch.count_nonzero(h, dim=1), False),
}


class PooledTokens(nn.Module):
    def __init__(self, pool):
        super().__init__()
        self.fc, self.pool, self.head = nn.Linear(6, 8), pool, nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.pool(F.gelu(self.fc(x))))


@pytest.mark.parametrize("pool, keeps_constants", POOLS_OVER_TOKENS.values(), ids=POOLS_OVER_TOKENS.keys())
def test_a_constant_reduced_over_entries_whose_count_varies_is_not_folded(pool, keeps_constants):
    """A channel holding its bias, summed over the tokens, is the bias times their count: folded with
    the dummy's count, the sped-up model was off on any other length or batch size (by 0.2 of an output
    of 1.2) while its verification, on the dummy, passed; so with a softmax (1 / count), or a count the
    code reads (``h.shape[1]``). Such a channel now stays; where the result does not depend on the count
    (a mean, a maximum, a product of ones) it is still folded."""
    torch.manual_seed(0)
    model = PooledTokens(pool).eval()
    keep = torch.arange(8) % 2 == 0
    masks = {"fc": {"weight": rows(keep, (8, 6))}}  # the bias stays: the masked channels hold it
    check_speedup(model, masks, torch.randn(2, 5, 6), torch.randn(3, 9, 6))
    assert model.fc.out_features == (4 if keeps_constants else 8)


class Gated(nn.Module):
    def __init__(self, gate: nn.Module):
        super().__init__()
        self.a, self.gate, self.b = nn.Conv2d(3, 16, 3, padding=1), gate, nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(self.gate(self.a(x)))


def test_glu_halves_lose_the_positions_whose_values_are_zero():
    """Position 1 is zero in the value half, position 5 in both: both go, with the gate channels
    paired with them. Position 3 is zero in the gate half only: sigmoid(0) / 2 times the value stays."""
    model = Gated(nn.GLU(dim=1)).eval()
    zero = torch.zeros(16, dtype=torch.bool)
    zero[[1, 5, 8 + 5, 8 + 3]] = True
    masks = {"a": {"weight": rows(~zero, (16, 3, 3, 3)), "bias": ~zero}}
    check_speedup(model, masks, torch.randn(2, 3, 6, 6), torch.randn(3, 3, 5, 7), shrunk=["a.weight", "b.weight"])
    assert (model.a.out_channels, model.b.in_channels) == (12, 6)


def test_channel_shuffle_module_becomes_a_gather_of_the_channels_that_stay():
    model = Gated(nn.Sequential(nn.ChannelShuffle(4), nn.Conv2d(16, 8, 1))).eval()
    masks = output_channel_masks(model, ["a"], seed=3)
    report = check_speedup(model, masks, torch.randn(2, 3, 6, 6), torch.randn(3, 3, 5, 7), shrunk=["a.weight", "gate.1.weight"])
    assert isinstance(model.gate[0], ChannelGather) and not report.barriers
    unchanged = Gated(nn.Sequential(nn.ChannelShuffle(4), nn.Conv2d(16, 8, 1))).eval()
    speedup.shrink(unchanged, output_channel_masks(unchanged, ["b"]), torch.randn(1, 3, 6, 6))
    assert isinstance(unchanged.gate[0], nn.ChannelShuffle)  # nothing of it changed: the user's module stays


class ShuffledInCode(nn.Module):
    def forward(self, x):
        return F.channel_shuffle(x, 4)


def test_functional_channel_shuffle_loses_a_position_only_from_every_group():
    """Four groups of four: position 1 is masked in every group and goes; position 2 only in groups
    0 and 1, so its channels stay (on fewer channels the code's shuffle needs as many in every group)."""
    model = Gated(nn.Sequential(ShuffledInCode(), nn.Conv2d(16, 8, 1))).eval()
    masked = torch.zeros(16, dtype=torch.bool)
    masked[[1, 5, 9, 13, 2, 6]] = True
    masks = {"a": {"weight": rows(~masked, (16, 3, 3, 3)), "bias": ~masked}}
    report = check_speedup(model, masks, torch.randn(2, 3, 6, 6), torch.randn(3, 3, 5, 7), shrunk=["a.weight"])
    assert not report.barriers and model.a.out_channels == 12 and model.gate[1].in_channels == 12


class WritesIntoSlices(nn.Module):
    """``y[:, :, 1:] += ...`` and ``y[..., :2] = fill``: writes through views cut along other dimensions."""

    def __init__(self, fill: float, transposed: bool = False):
        super().__init__()
        self.a, self.b, self.fill, self.transposed = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1), fill, transposed

    def forward(self, x):
        y = self.a(x)
        y[:, :, 1:, :] += y[:, :, :-1, :].clone()
        z = y.clone()
        if self.transposed:
            z.transpose(1, 3)[:, :2] = self.fill  # the same cut, written through a transposed view
        else:
            z[:, :, :, :2] = self.fill
        return self.b(z)


@pytest.mark.parametrize("fill, transposed, kept", [(0.0, False, 4), (0.5, False, 8), (0.0, True, 8)])
def test_writes_into_slices_pass_the_dimensions_they_do_not_cut(fill, transposed, kept):
    """Channels pass through in-place writes into slices of other dimensions. Filling a slice with 0
    keeps masked channels zero (they go); with 0.5 they are no longer one constant (they stay). A
    write through a transposed view is not followed (a barrier)."""
    model = WritesIntoSlices(fill, transposed).eval()
    report = check_speedup(model, output_channel_masks(model, ["a"]), torch.randn(1, 3, 6, 6), torch.randn(2, 3, 6, 7))
    assert model.a.out_channels == kept
    assert bool(report.barriers) == transposed


@pytest.mark.parametrize("dims", [2, 3])
def test_a_channels_last_model_keeps_its_weights_channels_last(dims):
    conv = nn.Conv2d if dims == 2 else nn.Conv3d
    layout = torch.channels_last if dims == 2 else torch.channels_last_3d
    model = nn.Sequential(conv(3, 8, 3, padding=1), nn.ReLU(), conv(8, 6, 3, padding=1)).eval().to(memory_format=layout)
    masks = {"0": {"weight": rows(keep_mask(8), (8, 3) + (3,) * dims)}}
    shape = (4,) * dims
    fresh = torch.randn(2, 3, *shape).to(memory_format=layout)
    check_speedup(model, masks, torch.randn(1, 3, *shape).to(memory_format=layout), fresh, shrunk=["0.weight", "2.weight"])
    assert all(model[i].weight.is_contiguous(memory_format=layout) for i in (0, 2))
    assert model(fresh).is_contiguous(memory_format=layout)
