"""Operands the model computes during the call where torch's modules hold parameters: a filter modulated
by a style (StyleGAN), a norm's scale and shift from a condition (adaptive norms), a table or an index
computed from the input. What computes them must keep what the call reads: before, the layers
computing them lost every output but one (a convolution's weight, a norm's vectors, an embedding's
table and an ``index_select``'s index were not needed by their calls), and the speedup failed
verification, or with ``verify=False`` gave outputs off by 4.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from support.checks import check_speedup, keep_mask, rows


class Styled(nn.Module):
    """A style ``s`` and a shift ``t`` of eight channels computed from the input ``z`` by small MLPs,
    read by ``call(x, s, t)`` on features ``x`` (batch, 8, 3) made of the input too."""

    def __init__(self, call):
        super().__init__()
        self.call = call
        self.map, self.scale, self.shift = nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(16, 8)

    def forward(self, z):
        h = torch.relu(self.map(z))
        s, t = self.scale(h), self.shift(h)
        x = z.reshape(z.shape[0], 8, 1) * torch.tensor([1.0, -0.5, 2.0])  # varies along the 3 (instance norm)
        return self.call(x, s, t)


CALLS = {
    "conv weight": lambda x, s, t: F.conv1d(x, torch.outer(s[0], t[0])[:, :, None], t[0]),
    "conv_transpose weight": lambda x, s, t: F.conv_transpose1d(x, torch.outer(s[0], t[0])[:, :, None]),
    "layer_norm vectors": lambda x, s, t: F.layer_norm(x.transpose(1, 2), (8,), s[0], t[0]),
    "group_norm vectors": lambda x, s, t: F.group_norm(x, 2, s[0], t[0]),
    "batch_norm vectors": lambda x, s, t: F.batch_norm(x, torch.zeros(8), torch.ones(8), s[0], t[0]),
    "instance_norm vectors": lambda x, s, t: F.instance_norm(x, weight=s[0], bias=t[0]),
    "embedding table": lambda x, s, t: F.embedding(torch.tensor([[0, 3, 5]]), torch.outer(s[0], t[0])),
    "index_select index": lambda x, s, t: x.index_select(1, s[0].argsort()) * t[:, :, None],
    "indexing index": lambda x, s, t: x[torch.arange(x.shape[0])[:, None], s.argsort(-1)],
    "topk index": lambda x, s, t: x[:, s.topk(3, -1).indices[0]],
}


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
def test_an_operand_the_model_computes_keeps_what_computes_it(call):
    torch.manual_seed(0)
    model = Styled(call).eval()
    kept = keep_mask(16)
    masks = {"map": {"weight": rows(kept, (16, 8)), "bias": kept}}
    check_speedup(model, masks, torch.randn(2, 8), torch.randn(3, 8), shrunk=["map.weight"])
    assert model.map.out_features == 8 and model.scale.out_features == 8


class DepthwiseFromVectors(nn.Module):
    """H3's and S4's shift convolution: a depthwise filter made in forward as ``kernel.unsqueeze(1)``,
    the group count read from the input."""

    def __init__(self):
        super().__init__()
        self.proj, self.out = nn.Linear(16, 16), nn.Linear(16, 4)
        self.kernel = nn.Parameter(torch.randn(16, 4))

    def forward(self, u):
        k = self.proj(u).transpose(1, 2)
        k = F.conv1d(F.pad(k, (3, 0)), self.kernel.unsqueeze(1), groups=k.shape[1])
        return self.out(k.transpose(1, 2))


def test_a_depthwise_filter_made_from_a_parameter_loses_the_channels_its_input_loses():
    """Its dimension of one could not shrink, and the input's channels went alone: with verify=False
    the output was off by 1.4 (the groups followed the input, the filter did not)."""
    torch.manual_seed(0)
    model = DepthwiseFromVectors().eval()
    kept = keep_mask(16)
    masks = {"proj": {"weight": rows(kept, (16, 16)), "bias": kept}}
    check_speedup(model, masks, torch.randn(2, 10, 16), torch.randn(3, 7, 16), shrunk=["proj.weight", "kernel"],
                  verify=False)
    assert model.kernel.shape == (8, 4) and model.out.in_features == 8
