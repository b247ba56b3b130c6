"""torchvision's MaxViT: whole attention heads, features of the residual stream, and the whole model."""

import pytest
import torch
from torch import nn

import speedup
import speedup.groups
from support.checks import check_speedup, rows

maxvit = pytest.importorskip("torchvision.models.maxvit")
from speedup_torchvision.maxvit import PrunedRelativePositionalMultiHeadAttention  # noqa: E402

FEATURES, HEAD_DIM, SEQ = 32, 8, 16
HEADS = FEATURES // HEAD_DIM


def attention() -> nn.Module:
    module = maxvit.RelativePositionalMultiHeadAttention(FEATURES, HEAD_DIM, SEQ)
    with torch.no_grad():
        module.to_qkv.bias.uniform_(-1, 1)  # non-zero value biases: a constant head must be folded, not dropped
    return module


class Block(nn.Module):
    """A projection into the attention and a classifier after it, so both its feature widths can shrink."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(FEATURES, FEATURES)
        self.attn = attention()
        self.head = nn.Linear(FEATURES, 10)

    def forward(self, x):
        return self.head(self.attn(self.proj(x)))


def windows(batch: int = 2, count: int = 3) -> torch.Tensor:
    return torch.randn(batch, count, SEQ, FEATURES)


def head_rows(heads: torch.Tensor) -> torch.Tensor:
    """Rows of ``to_qkv`` (q, k and v) belonging to the selected heads."""
    return heads.repeat_interleave(HEAD_DIM).repeat(3)


def test_unpruned_replacement_computes_what_torchvision_computes():
    original = attention().eval()
    pruned = PrunedRelativePositionalMultiHeadAttention(
        original.to_qkv, original.merge, original.relative_position_bias_table, original.relative_position_index,
        HEAD_DIM, original.scale_factor, SEQ)
    x = windows()
    torch.testing.assert_close(pruned(x), original(x))


def test_masked_heads_go_with_their_rows_columns_and_position_biases():
    model = Block()
    heads = torch.tensor([True, False, True, False])
    masks = {"attn.to_qkv": {"weight": rows(head_rows(heads), (3 * FEATURES, FEATURES)), "bias": head_rows(heads)}}
    check_speedup(model, masks, windows(), windows(3, 5), shrunk=["attn.to_qkv.weight", "attn.merge.weight",
                                                                    "attn.relative_position_bias_table"])
    assert isinstance(model.attn, PrunedRelativePositionalMultiHeadAttention)
    assert model.attn.n_heads == 2 and model.attn.head_dim == HEAD_DIM
    assert model.attn.scale_factor == FEATURES ** -0.5  # the trained model's scale, not head_dim's
    assert model.attn.relative_position_bias_table.shape[1] == 2


def test_head_with_masked_values_is_a_constant_folded_into_merge():
    model = Block()
    values = torch.zeros(3 * FEATURES, dtype=torch.bool)
    values[2 * FEATURES + HEAD_DIM:2 * FEATURES + 2 * HEAD_DIM] = True  # v rows of head 1, bias kept
    masks = {"attn.to_qkv": {"weight": rows(~values, (3 * FEATURES, FEATURES))}}
    check_speedup(model, masks, windows(), windows(1, 4), shrunk=["attn.to_qkv.weight"])
    assert model.attn.n_heads == HEADS - 1


def test_input_and_output_features_shrink_independently_of_heads():
    model = Block()
    unread = torch.zeros(FEATURES, dtype=torch.bool)
    unread[[1, 5, 6]] = True
    constant = torch.zeros(FEATURES, dtype=torch.bool)
    constant[[2, 9]] = True  # proj outputs equal to their bias: folded into to_qkv's bias
    silent = torch.zeros(FEATURES, dtype=torch.bool)
    silent[[0, 3, 30]] = True  # merge rows equal to merge.bias: folded into the classifier
    masks = {"attn.to_qkv": {"weight": (~unread)[None, :].expand(3 * FEATURES, FEATURES)},
             "proj": {"weight": rows(~constant, (FEATURES, FEATURES))},
             "attn.merge": {"weight": rows(~silent, (FEATURES, FEATURES))}}
    check_speedup(model, masks, windows(), windows(3, 2), shrunk=["proj.weight", "head.weight"])
    assert model.attn.to_qkv.weight.shape == (3 * FEATURES, FEATURES - 5)
    assert model.attn.merge.weight.shape == (FEATURES - 3, FEATURES)
    assert model.attn.n_heads == HEADS


def test_a_pruned_attention_shrinks_again():
    model = Block()
    first = torch.tensor([True, True, True, False])
    masks = {"attn.to_qkv": {"weight": rows(head_rows(first), (3 * FEATURES, FEATURES)), "bias": head_rows(first)}}
    speedup.shrink(model.eval(), masks, windows())
    second = torch.tensor([False, True, True])
    masks = {"attn.to_qkv": {"weight": rows(head_rows(second), (9 * HEAD_DIM, FEATURES)), "bias": head_rows(second)}}
    check_speedup(model, masks, windows(), windows(1, 2), shrunk=["attn.merge.weight"])
    assert model.attn.n_heads == 2


def test_tiny_maxvit_under_consistent_masks():
    model = maxvit.MaxVit(input_size=(32, 32), stem_channels=16, partition_size=2, block_channels=[16, 32],
                          block_layers=[1, 1], head_dim=8, stochastic_depth_prob=0.1, num_classes=10).eval()
    dummy = torch.randn(1, 3, 32, 32)
    heads = {name: m.n_heads for name, m in model.named_modules()
             if isinstance(m, maxvit.RelativePositionalMultiHeadAttention)}
    masks = speedup.groups.consistent_masks(model, dummy)
    report = check_speedup(model, masks, dummy, torch.randn(2, 3, 32, 32), max_param_ratio=0.35)
    assert not report.barriers and not report.kept_for_verification
    modules = dict(model.named_modules())
    for name, count in heads.items():
        assert isinstance(modules[name], PrunedRelativePositionalMultiHeadAttention)
        assert modules[name].n_heads < count
