"""Dependency groups and consistent masks: everything masked consistently can really go."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from speedup.groups import consistent_masks, find_groups
from support.checks import check_speedup


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a = nn.Conv2d(16, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = x + self.b(torch.relu(self.a(x)))
        return self.head(x.mean((2, 3)))


def test_residual_and_depthwise_links_put_channels_in_one_group():
    model = Residual().eval()
    groups = find_groups(model, torch.randn(1, 3, 8, 8))
    touched = {(m.parameter, m.dim) for g in groups for m in g.members}
    shared = [g for g in groups if {m.parameter for m in g.members} >= {"stem.weight", "b.weight", "head.weight"}]
    assert len(shared) == 1 and shared[0].size == 16
    assert ("head.weight", 0) not in touched  # the model's output keeps its size


def test_consistent_masks_let_everything_masked_go():
    model = Residual().eval()
    masks = consistent_masks(model, torch.randn(1, 3, 8, 8), sparsity=0.5, seed=1)
    check_speedup(model, masks, torch.randn(2, 3, 8, 8), torch.randn(3, 3, 9, 7),
                  shrunk=["stem.weight", "a.weight", "b.weight", "head.weight"], max_param_ratio=0.35)


class Heads(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.out = nn.Linear(32, 2)

    def forward(self, x):
        h = self.embed(x)
        return self.out(h + self.attn(h, h, h, need_weights=False)[0])


def test_attention_heads_are_picked_whole():
    model = Heads().eval()
    masks = consistent_masks(model, torch.randn(1, 5, 8), seed=3)
    check_speedup(model, masks, torch.randn(2, 5, 8), torch.randn(3, 6, 8), shrunk=["attn.out_proj.weight"])
    assert model.attn.num_heads == 2 and model.attn.head_dim == 8


class FusedGroupedQueryAttention(nn.Module):
    """DBRX's attention: one fused projection split into 4 query heads and 2 key/value heads, each
    key/value head serving two queries (``repeat_interleave``)."""

    def __init__(self, width: int = 64, heads: int = 4, kv_heads: int = 2):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, width // heads
        self.qkv = nn.Linear(width, width + 2 * kv_heads * self.head_dim, bias=False)
        self.out = nn.Linear(width, width, bias=False)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).split([self.heads * self.head_dim] + [self.kv_heads * self.head_dim] * 2, dim=2)
        q, k, v = (z.view(b, t, -1, self.head_dim).transpose(1, 2) for z in (q, k, v))
        k, v = (z.repeat_interleave(self.heads // self.kv_heads, 1) for z in (k, v))
        return x + self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, -1))


def test_query_heads_made_of_a_key_value_group_and_a_position_in_it_are_picked_along_one_axis():
    """A query head is a key/value group and a position within it: two axes of one group. Half of
    all four picked at random could take both key/value groups, and with them every head: the whole
    projection was masked. The key/value groups (alone in the key and value rows) are picked from."""
    model = FusedGroupedQueryAttention().eval()
    dummy = torch.randn(2, 5, 64)
    for seed in range(4):
        masks = consistent_masks(model, dummy, seed=seed)
        assert int(masks["qkv"]["weight"].all(1).sum()) == 64  # half the 128 rows: one axis halved
    report = check_speedup(model, masks, dummy, torch.randn(3, 7, 64), shrunk=["qkv.weight", "out.weight"])
    assert not report.masked_but_kept and not report.kept_for_verification


def test_finding_groups_leaves_the_model_unchanged():
    model = Residual().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    find_groups(model, torch.randn(1, 3, 8, 8))
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class Concat(nn.Module):
    """Two producers concatenated and read together, as in a DenseNet block."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 24, 3, padding=1)
        self.norm = nn.BatchNorm2d(32)
        self.read = nn.Conv2d(32, 6, 1)

    def forward(self, x):
        return self.read(torch.relu(self.norm(torch.cat([self.a(x), self.b(x)], 1))))


def test_each_producer_of_a_concatenation_loses_its_own_share():
    model = Concat().eval()
    x = torch.randn(1, 3, 8, 8)
    (group,) = [g for g in find_groups(model, x) if g.size == 32]
    assert sorted(s.numel() for s in group.strata()) == [8, 24]
    for seed in range(3):
        masks = consistent_masks(model, x, 0.5, seed=seed)
        kept = [int(masks[name]["weight"].flatten(1).any(1).sum()) for name in ("a", "b")]
        assert kept == [4, 12]
    check_speedup(model, masks, x, torch.randn(2, 3, 10, 10), shrunk=["a.weight", "b.weight", "read.weight"])


class Grouped(nn.Module):
    """A ResNeXt/RegNet bottleneck: 1x1, a 3x3 convolution in 4 groups of 4 channels, 1x1."""

    def __init__(self):
        super().__init__()
        self.reduce = nn.Conv2d(3, 16, 1)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.expand = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        return self.expand(torch.relu(self.grouped(torch.relu(self.reduce(x)))))


def test_grouped_convolutions_lose_positions_in_every_group_not_whole_groups():
    model = Grouped().eval()
    masks = consistent_masks(model, torch.randn(1, 3, 8, 8), sparsity=0.5, seed=0)
    check_speedup(model, masks, torch.randn(2, 3, 8, 8), torch.randn(3, 3, 9, 7), shrunk=["grouped.weight"])
    # Two of the four channels of every group stay: the layer does a quarter of its work, not a half.
    assert model.grouped.groups == 4 and tuple(model.grouped.weight.shape[:2]) == (8, 2)



class ScriptedBlock(nn.Module):
    """An eager network holding a ``torch.jit.script``-ed residual block, then an MLP."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.block = torch.jit.script(nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 1)))
        self.post, self.head = nn.Linear(16, 32), nn.Linear(32, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = x + self.block(x)
        return self.head(torch.relu(self.post(x.mean((2, 3)))))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_masks_inside_a_torchscript_module_are_read_and_its_parameters_sliced():
    """Masks naming a scripted module's parameters (as consistent_masks offers them) raised a bare
    RuntimeError: a TorchScript module has no ``get_parameter``."""
    torch.manual_seed(0)
    model = ScriptedBlock().eval()
    masks = consistent_masks(model, torch.randn(2, 3, 8, 8), sparsity=0.5, seed=0)
    assert "block.0" in masks
    check_speedup(model, masks, torch.randn(2, 3, 8, 8), torch.randn(3, 3, 10, 10),
                  shrunk=["stem.weight", "block.0.weight", "post.weight"], max_param_ratio=0.35)
