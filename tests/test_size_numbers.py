"""A scale the code computes from a size it reads stays the masked model's.

Attention scales its scores by a number computed in Python from the size of the queries
(``math.sqrt(q.size(-1))``, ``q.shape[-1] ** -0.5``, DeBERTa's ``torch.sqrt(torch.tensor(q.size(-1),
dtype=torch.float) * 3)``, RAFT's ``torch.sqrt(torch.tensor(num_channels))``).
Where the masks remove features of the queries and keys, the sped-up model
would read a smaller size and scale by another number: on random weights the scores are nearly
equal, and the difference hides within float32 round-off on the dummy input. The models run in
float64 here, where equal means equal; the features the size counts stay, the values' go.
"""

import math

import pytest
import torch
from torch import nn

from speedup.size_numbers import sizes_behind
from speedup.testing import masked_copy
from support.checks import check_speedup, keep_mask, rows

SCALES = {
    "math.sqrt of a size": lambda q: 1 / math.sqrt(q.size(-1)),
    "a tensor made of a size": lambda q: 1 / torch.sqrt(torch.tensor(q.size(-1), dtype=q.dtype) * 3),
    "a size to the power -0.5": lambda q: q.shape[-1] ** -0.5,
    "an integer tensor made of a size": lambda q: 1 / torch.sqrt(torch.tensor(q.size(-1))),  # RAFT's correlation
    "a tensor filled with a size": lambda q: torch.full((), q.size(-1), dtype=q.dtype).rsqrt(),
}


class ScaledAttention(nn.Module):
    """Single-head attention whose scale the code computes from the queries' width (16 features)."""

    def __init__(self, scale):
        super().__init__()
        self.q, self.k = nn.Linear(8, 16), nn.Linear(8, 16)
        self.v, self.out = nn.Linear(8, 12), nn.Linear(12, 4)
        self.scale = scale

    def forward(self, x):
        q = self.q(x)
        scores = (q @ self.k(x).transpose(1, 2)) * self.scale(q)
        return self.out(scores.softmax(-1) @ self.v(x))


def masks_within_the_scale() -> dict:
    """Masks removing features of the queries and keys (those the scale's size counts) and of the values."""
    features, values = keep_mask(16), keep_mask(12)
    masks = {name: {"weight": rows(features, (16, 8)), "bias": features} for name in ("q", "k")}
    masks["v"] = {"weight": rows(values, (12, 8)), "bias": values}
    return masks


@pytest.mark.parametrize("scale", SCALES.values(), ids=SCALES.keys())
def test_features_a_scale_counts_stay_and_the_others_go(scale):
    torch.manual_seed(0)
    model = ScaledAttention(scale).double().eval()
    with torch.no_grad():  # scores near zero, as on random weights: a wrong scale hides within the tolerance
        model.q.weight.mul_(0.003)
        model.k.weight.mul_(0.003)
    masks = masks_within_the_scale()
    reference = masked_copy(model, masks).eval()
    fresh = torch.randn(3, 7, 8, dtype=torch.float64)
    report = check_speedup(model, masks, torch.randn(2, 5, 8, dtype=torch.float64), fresh,
                           shrunk=["v.weight", "out.weight"])
    assert model.q.weight.shape == (16, 8) and model.k.weight.shape == (16, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(fresh), reference(fresh), rtol=1e-12, atol=1e-12)
    assert any("computed from a size that shrank" in reason for reason in report.kept_for_verification)


def test_numbers_far_from_any_size_are_passed_over():
    """A float64 model passes its dtype's extremes (an attention mask's fill value): no size is behind them."""
    sizes = {16, 64}
    assert sizes_behind(4.0, sizes) == {16} and 64 in sizes_behind(0.125, sizes)  # sqrt(16); 1 / sqrt(64)
    for number in (torch.finfo(torch.float64).min, torch.finfo(torch.float64).tiny, 1e-5, 0.5, math.inf):
        assert not sizes_behind(number, sizes)


class WidthScaled(nn.Module):
    """A branch scaled by its width over a number of the code's (0.8, no size's root or inverse), its
    outputs as small as a freshly initialised head makes them."""

    def __init__(self, scale: float):
        super().__init__()
        self.a, self.b = nn.Linear(6, 64), nn.Linear(64, 3)
        with torch.no_grad():
            self.b.weight.mul_(scale)
            self.b.bias.mul_(scale)

    def forward(self, x):
        y = torch.relu(self.a(x))
        return self.b(y * (y.shape[-1] / 80))


@pytest.mark.parametrize("scale", [1.0, 1e-5], ids=["outputs near one", "outputs near 1e-5"])
def test_a_changed_number_no_size_explains_is_found_on_small_outputs_too(scale):
    """The sped-up branch scaled by 32 / 80: half the masked model's outputs. Verification compared
    within 1e-5 of the outputs' size but at least of 1, so outputs near 1e-5 passed whatever they were
    (45% off). It now compares down to outputs of 1e-3; the call passing another number is found and
    the width it reads is kept."""
    torch.manual_seed(0)
    model = WidthScaled(scale).eval()
    masks = {"a": {"weight": rows(keep_mask(64), (64, 6))}}
    reference = masked_copy(model, masks).eval()
    fresh = torch.randn(5, 6)
    report = check_speedup(model, masks, torch.randn(4, 6), fresh)
    with torch.no_grad():
        expected = reference(fresh)
        torch.testing.assert_close(model(fresh), expected, rtol=0, atol=1e-5 * float(expected.abs().max()))
    assert any("computed from a size that shrank" in reason for reason in report.kept_for_verification)
