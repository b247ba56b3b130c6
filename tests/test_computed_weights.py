"""Convolutions computing their weight in their own forward (weight standardisation, as timm's
StdConv2d / ScaledStdConv2d and Hugging Face's BiT): the masked model standardises the masked
parameter; the sped-up model holds the plain convolution with that computed weight, so its input
channels go where they carry zeros (they stayed before: removing a column of the parameter changes
every row's statistics)."""

import torch
import torch.nn.functional as F
from torch import nn

from speedup.groups import consistent_masks
from support.checks import check_speedup, rows


class StandardisedConv2d(nn.Conv2d):
    """Weight standardisation with a learned gain, as timm's ScaledStdConv2d."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.rand(self.out_channels, 1, 1, 1) + 0.5)

    def forward(self, x):
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0,
                              eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, weight * self.gain, self.bias, self.stride, self.padding, self.dilation, self.groups)


class PaddedInItsForward(StandardisedConv2d):
    """Pads its input itself ("same" padding, as timm's StdConv2dSame): not one plain convolution."""

    def forward(self, x):
        return super().forward(F.pad(x, (1, 1, 1, 1)))


def network(second=StandardisedConv2d) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(StandardisedConv2d(3, 8, 3, padding=1), nn.ReLU(), second(8, 8, 3, padding=1 if second is
                         StandardisedConv2d else 0), nn.ReLU(), StandardisedConv2d(8, 4, 1), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 3)).eval()


KEEP = torch.tensor([True, False, True, True, False, True, False, True])


def test_standardised_convolutions_lose_their_input_channels():
    model = network()
    masks = {"0": {"weight": rows(KEEP, (8, 3, 3, 3)), "bias": KEEP}, "2": {"weight": rows(KEEP, (8, 8, 3, 3)), "bias": KEEP}}
    report = check_speedup(model, masks, torch.randn(1, 3, 8, 8), torch.randn(2, 3, 9, 7))
    assert model[0].weight.shape[0] == 5 and model[2].weight.shape == (5, 5, 3, 3) and model[4].weight.shape == (4, 5, 1, 1)
    assert all(type(model[i]) is nn.Conv2d for i in (0, 2, 4))
    assert report.forms == {str(i): ("StandardisedConv2d", "Conv2d") for i in (0, 2, 4)}
    said = [w for w in report.warnings if "in its own forward" in w]  # one warning names the three
    assert len(said) == 1 and "'0', '2', '4' computed weight" in said[0]


def test_a_standardised_convolution_of_which_nothing_changes_is_put_back():
    model = network()
    last = model[4]
    check_speedup(model, {"0": {"weight": rows(KEEP, (8, 3, 3, 3)), "bias": KEEP}}, torch.randn(1, 3, 8, 8),
                  torch.randn(2, 3, 9, 7), shrunk=["0.weight"])
    assert model[4] is last and isinstance(model[2], nn.Conv2d) and model[2].weight.shape[1] == 5


def test_a_convolution_changing_its_input_first_is_traced_through_as_before():
    model = network(second=PaddedInItsForward)
    masks = {"0": {"weight": rows(KEEP, (8, 3, 3, 3)), "bias": KEEP}}
    report = check_speedup(model, masks, torch.randn(1, 3, 8, 8), torch.randn(2, 3, 9, 7))
    assert isinstance(model[2], PaddedInItsForward) and "2" not in report.forms


def test_groups_reach_through_standardised_convolutions():
    model = network()
    masks = consistent_masks(model, torch.randn(1, 3, 8, 8), sparsity=0.5)
    assert {"0", "2", "4"} <= set(masks) and isinstance(model[2], StandardisedConv2d)
    report = check_speedup(model, masks, torch.randn(1, 3, 8, 8), torch.randn(2, 3, 9, 7), shrunk=["2.weight"])
    assert report.params_after < 0.5 * report.params_before


def test_a_standardised_convolution_masked_but_not_shrunk_holds_its_computed_weight():
    """Its masked columns read channels that are not zero: nothing of it goes, but put back it would
    standardise the unmasked parameter."""
    model = network()
    columns = torch.tensor([True, False] * 4).reshape(1, 8, 1, 1).expand(4, 8, 1, 1)
    report = check_speedup(model, {"4": {"weight": columns}}, torch.randn(1, 3, 8, 8), torch.randn(2, 3, 9, 7))
    assert type(model[4]) is nn.Conv2d and model[4].weight.shape == (4, 8, 1, 1) and "4" in report.forms


class KernelMixture(nn.Conv2d):
    """A dynamic convolution: its weight mixes two kernels by the input's mean, so it is no plain one."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.other = nn.Parameter(torch.randn_like(self.weight))

    def forward(self, x):
        mix = torch.sigmoid(x.mean())
        return F.conv2d(x, mix * self.weight + (1 - mix) * self.other, self.bias, self.stride, self.padding)


def test_a_convolution_whose_weight_depends_on_its_input_is_traced_through():
    model = network(second=KernelMixture)
    masks = {"0": {"weight": rows(KEEP, (8, 3, 3, 3)), "bias": KEEP}}
    report = check_speedup(model, masks, torch.randn(1, 3, 8, 8), torch.randn(2, 3, 9, 7))
    assert isinstance(model[2], KernelMixture) and "2" not in report.forms


class Counting(nn.Conv2d):
    """Overrides forward only to count its calls: the weight it applies is its parameter itself."""

    calls = 0

    def forward(self, x):
        Counting.calls += 1
        return super().forward(x)


def test_a_convolution_applying_its_parameter_as_it_is_leaves_the_original_untouched():
    model = network(second=Counting)
    original = model[2]
    before = original.weight.detach().clone()
    masks = {"2": {"weight": rows(KEEP, (8, 8, 3, 3)), "bias": KEEP}}
    check_speedup(model, masks, torch.randn(1, 3, 8, 8), torch.randn(2, 3, 9, 7), shrunk=["2.weight", "4.weight"])
    assert model[2] is not original and torch.equal(original.weight, before)


class OverParameterised(nn.Conv2d):
    """DO-Conv: the kernel made of two parameters in forward, the inherited ``weight`` deleted."""

    def __init__(self, cin: int, cout: int):
        super().__init__(cin, cout, 3, 1, 1)
        self.W = nn.Parameter(torch.randn(cout, cin, 9) / (cin * 9) ** 0.5)
        self.D = nn.Parameter(torch.eye(9).repeat(cin, 1, 1))
        del self.weight

    def forward(self, x):
        w = torch.einsum("ims,ois->oim", self.D, self.W).reshape(self.out_channels, self.in_channels, 3, 3)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


def test_a_convolution_without_a_weight_of_its_own_is_frozen_from_what_it_computes():
    """It raised AttributeError('weight') from the probe, whatever the masks."""
    torch.manual_seed(0)
    model = nn.Sequential(OverParameterised(3, 8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    keep = torch.tensor([True, False, True, True, False, True, False, True])
    masks = {"0": {"W": rows(keep, (8, 3, 9)), "bias": keep}}
    check_speedup(model, masks, torch.randn(2, 3, 8, 8), torch.randn(3, 3, 7, 9), shrunk=["2.weight"])
    assert model[0].weight.shape == (5, 3, 3, 3)
