"""Numbers a model reads out of its tensors (``.item()``, ``float(t)``) and computes with.

A number read from a tensor that depends on the input is not a literal of the code: a tensor made
from it, or scaled by it, holds no constant, though every tensor the call reads may be one. Folding
it as the dummy input made it would give another model on any other input.
"""

import pytest
import torch
from torch import nn

import speedup
from speedup.testing import assert_same_outputs, masked_copy, parameter_count
from support.checks import randomize_norms

USES = {
    "filled": lambda h, s: h + torch.full((1,), s),
    "filled like": lambda h, s: h + torch.full_like(h, s),
    "scaled": lambda h, s: h * s,
    "shifted": lambda h, s: h + s,
    "made a tensor": lambda h, s: h + torch.tensor([s, 0.5]).sum(),
}


READS = {
    "item": lambda x: x.abs().mean().item(),
    "float": lambda x: float(x.abs().mean()),
    "tolist": lambda x: x.abs().mean().tolist(),
    "list entry": lambda x: x.abs().mean(0).tolist()[1],
}


class ReadsANumber(nn.Module):
    def __init__(self, use, read="item"):
        super().__init__()
        self.a, self.norm, self.b = nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)
        self.use, self.read = use, read

    def forward(self, x):
        h = self.norm(self.a(x))  # the masked rows of a hold the norm's shift: constants
        return self.b(USES[self.use](h, READS[self.read](x)))


@pytest.mark.parametrize("use, read", [(use, "item") for use in USES] + [("scaled", read) for read in READS if read != "item"])
def test_a_number_read_from_the_input_is_not_folded_as_a_constant(use, read):
    torch.manual_seed(0)
    model = randomize_norms(ReadsANumber(use, read), 0).eval()
    keep = torch.tensor([1, 0, 1, 0, 1, 0, 1, 0], dtype=torch.bool)
    masks = {"a": {"weight": keep[:, None].expand(8, 4), "bias": keep}}
    reference = masked_copy(model, masks).eval()
    speedup.shrink(model, masks, torch.randn(2, 4))
    assert_same_outputs(reference, model, torch.randn(5, 4) * 3)


class ReadsAConstant(nn.Module):
    """Reads a number out of a buffer: a constant, which does not keep anything whole."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, x):
        return self.b(self.a(x) * self.scale.item())


def test_a_number_read_from_a_buffer_is_a_constant():
    torch.manual_seed(0)
    model = ReadsAConstant().eval()
    keep = torch.tensor([1, 0, 1, 0, 1, 0, 1, 0], dtype=torch.bool)
    masks = {"a": {"weight": keep[:, None].expand(8, 4), "bias": keep}}
    reference = masked_copy(model, masks).eval()
    before = parameter_count(model)
    speedup.shrink(model, masks, torch.randn(2, 4))
    assert_same_outputs(reference, model, torch.randn(5, 4))
    assert parameter_count(model) < before
    assert model.a.out_features == 4
