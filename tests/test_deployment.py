"""A sped-up model deploys as any model does: saved and loaded whole, copied, traced with
torch.jit.trace (its checks included), exported with torch.export, compiled; each computes what the
sped-up model computes. Its own modules (a convolution folding constants, norms counting removed
constants) must not compute differently the second time they run, or under tracing."""

import copy
import io

import pytest
import torch
from torch import nn

from speedup.modules import ConstantAwareGroupNorm, ConstantAwareLayerNorm, FoldedConv2d
from support.checks import check_speedup, rows


class ConvThenTokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1))
        self.group_norm = nn.GroupNorm(3, 6)
        self.embed = nn.Linear(6, 16)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        tokens = self.group_norm(self.conv(x)).flatten(2).transpose(1, 2)
        return self.head(self.norm(self.embed(tokens)))


def conv_then_tokens() -> tuple[nn.Module, dict]:
    """The model and masks that give each of the product's own modules: a convolution folding
    constants at its borders, a group norm and a layer norm counting removed constants."""
    torch.manual_seed(0)
    model = ConvThenTokens().eval()
    with torch.no_grad():
        model.conv[1].running_mean.uniform_(-1, 1)
        model.conv[1].bias.uniform_(-1, 1)
    keep, mapped = torch.arange(16) % 4 != 0, torch.arange(6) != 2
    masks = {"conv.0": {"weight": rows(torch.arange(8) % 2 == 0, (8, 3, 3, 3))},
             "conv.3": {"weight": rows(mapped, (6, 8, 3, 3))},  # its bias stays: constants reach the group norm
             "group_norm": {"weight": mapped, "bias": mapped},
             "embed": {"weight": rows(keep, (16, 6))},  # its bias stays: constants reach the norm
             "norm": {"weight": keep, "bias": keep}}
    return model, masks


def sped_up() -> nn.Module:
    model, masks = conv_then_tokens()
    check_speedup(model, masks, torch.randn(1, 3, 6, 6), torch.randn(2, 3, 6, 6),
                  shrunk=["conv.0.weight", "conv.3.weight", "group_norm.weight", "embed.weight"])
    assert isinstance(model.conv[3], FoldedConv2d) and isinstance(model.norm, ConstantAwareLayerNorm)
    assert isinstance(model.group_norm, ConstantAwareGroupNorm)
    return model


def reloaded(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


DEPLOYED = {
    "saved and loaded": reloaded,
    "deep-copied": copy.deepcopy,
    "jit.trace": lambda model: torch.jit.trace(model, torch.randn(2, 3, 6, 6)),  # checks two traces agree
    "export": lambda model: torch.export.export(model, (torch.randn(2, 3, 6, 6),)).module(),
    "compile": lambda model: torch.compile(model, backend="eager"),
}


@pytest.mark.filterwarnings("ignore:`torch.jit.trace.*` is deprecated")
@pytest.mark.parametrize("deploy", DEPLOYED.values(), ids=DEPLOYED.keys())
def test_a_sped_up_model_deploys(deploy):
    model = sped_up()
    deployed = deploy(model)
    x = torch.randn(2, 3, 6, 6)  # the shape traced and exported
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), model(x), rtol=1e-5, atol=1e-5)
