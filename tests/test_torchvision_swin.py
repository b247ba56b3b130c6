"""torchvision's Swin attention (V1 and V2): whole heads, constant heads, input and output features, whole models."""

import pytest
import torch
from torch import nn

import speedup
import speedup.groups
from speedup.testing import assert_same_outputs, masked_copy, parameter_count
from support.checks import check_speedup, rows

swin = pytest.importorskip("torchvision.models.swin_transformer")
from speedup_torchvision.swin import PrunedShiftedWindowAttention, PrunedShiftedWindowAttentionV2  # noqa: E402

C, HEADS, WINDOW = 32, 4, [4, 4]
HEAD_DIM = C // HEADS
SHIFTS = {"shifted": [2, 2], "unshifted": [0, 0]}


def attention(v2: bool, shift: list, **options) -> nn.Module:
    """Attention with non-zero biases everywhere (V2's key bias too, which it must keep ignoring)."""
    kind = swin.ShiftedWindowAttentionV2 if v2 else swin.ShiftedWindowAttention
    module = kind(C, WINDOW, shift, HEADS, **options)
    with torch.no_grad():
        module.qkv.bias.uniform_(-1, 1)
        module.proj.bias.uniform_(-1, 1)
        if v2:
            module.logit_scale.uniform_(0, 5)
        else:
            module.relative_position_bias_table.normal_()
    return module


class Block(nn.Module):
    """Linear layers around the attention, so that its input and output features can shrink too."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.inp = nn.Linear(C, C)
        self.attn = attn
        self.out = nn.Linear(C, C)

    def forward(self, x):
        return self.out(self.attn(self.inp(x)))


def maps(batch: int, height: int, width: int) -> torch.Tensor:
    """``(B, H, W, C)``; sizes that are not multiples of the window exercise the padding."""
    return torch.randn(batch, height, width, C)


def head_rows(heads: torch.Tensor, parts: tuple = (True, True, True)) -> torch.Tensor:
    """Rows of ``qkv`` laid out (q|k|v) x heads x head_dim, selected for the given heads and parts."""
    per_head = heads.repeat_interleave(HEAD_DIM)
    return torch.cat([per_head if part else torch.ones_like(per_head) for part in parts])


def head_params(v2: bool) -> list:
    return ["attn.logit_scale", "attn.cpb_mlp.2.weight"] if v2 else ["attn.relative_position_bias_table"]


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("shift", SHIFTS.values(), ids=SHIFTS.keys())
def test_unpruned_replacement_computes_what_torchvision_computes(v2, shift):
    original = attention(v2, shift, attention_dropout=0.3, dropout=0.2)
    common = (original.qkv, original.proj, HEADS, HEAD_DIM, WINDOW, shift, 0.3, 0.2, original.relative_position_index)
    if v2:
        pruned = PrunedShiftedWindowAttentionV2(*common, original.logit_scale, original.cpb_mlp,
                                                original.relative_coords_table)
    else:
        pruned = PrunedShiftedWindowAttention(*common, original.relative_position_bias_table)
    assert_computes_the_same(original, pruned, maps(2, 9, 10))


def assert_computes_the_same(original: nn.Module, pruned: nn.Module, x: torch.Tensor) -> None:
    """In eval and training mode, the same outputs (the same dropouts, drawn in the same order)."""
    for training in (False, True):
        original.train(training)
        pruned.train(training)
        torch.manual_seed(1)
        expected = original(x)
        torch.manual_seed(1)
        torch.testing.assert_close(pruned(x), expected)


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("shift", SHIFTS.values(), ids=SHIFTS.keys())
def test_masked_heads_go_with_their_rows_columns_and_position_biases(v2, shift):
    model = Block(attention(v2, shift))
    heads = torch.tensor([True, False, True, False])
    masks = {"attn.qkv": {"weight": rows(head_rows(heads), (3 * C, C)), "bias": head_rows(heads)}}
    check_speedup(model, masks, maps(2, 9, 10), maps(3, 7, 11),
                  shrunk=["attn.qkv.weight", "attn.proj.weight", *head_params(v2)])
    assert model.attn.num_heads == 2 and model.attn.head_dim == HEAD_DIM
    assert isinstance(model.attn, PrunedShiftedWindowAttentionV2 if v2 else PrunedShiftedWindowAttention)


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_heads_without_values_are_folded_into_the_projection_bias(v2):
    model = Block(attention(v2, SHIFTS["shifted"]))
    heads = torch.tensor([False, True, False, True])
    value_rows = head_rows(heads, parts=(False, False, True))  # value weights only: the value bias stays
    masks = {"attn.qkv": {"weight": rows(value_rows, (3 * C, C))}}
    check_speedup(model, masks, maps(2, 9, 10), maps(1, 6, 13),
                  shrunk=["attn.qkv.weight", "attn.proj.weight", *head_params(v2)])
    assert model.attn.num_heads == 2


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_input_and_output_features_shrink_independently_of_heads(v2):
    model = Block(attention(v2, SHIFTS["shifted"]))
    features = torch.rand(C) < 0.5
    outputs = torch.rand(C) < 0.5
    masks = {"attn.qkv": {"weight": features[None, :].expand(3 * C, C)},
             # proj rows only: those outputs hold proj.bias, a constant that `out` folds into its bias
             "attn.proj": {"weight": rows(outputs, (C, C))}}
    check_speedup(model, masks, maps(2, 9, 10), maps(3, 7, 11),
                  shrunk=["inp.weight", "attn.qkv.weight", "attn.proj.weight", "out.weight"])
    assert model.attn.qkv.in_features == int(features.sum()) and model.attn.proj.out_features == int(outputs.sum())
    assert model.attn.num_heads == HEADS


def test_non_zero_constant_input_features_stay_since_padding_tokens_do_not_hold_them():
    model = Block(attention(False, SHIFTS["shifted"]))
    features = torch.arange(C) % 2 == 0
    masks = {"inp": {"weight": rows(features, (C, C))}}  # odd features hold inp.bias, a non-zero constant
    report = check_speedup(model, masks, maps(2, 9, 10), maps(3, 7, 11))
    assert model.attn.qkv.in_features == C and not report.kept_for_verification


def test_a_sped_up_attention_can_be_sped_up_again():
    model = Block(attention(True, SHIFTS["shifted"]))
    first = torch.tensor([True, True, True, False])
    masks = {"attn.qkv": {"weight": rows(head_rows(first), (3 * C, C)), "bias": head_rows(first)}}
    check_speedup(model, masks, maps(2, 9, 10), maps(3, 7, 11))
    second = torch.tensor([False, True, True])
    masks = {"attn.qkv": {"weight": rows(second.repeat_interleave(HEAD_DIM).repeat(3), (9 * HEAD_DIM, C))}}
    check_speedup(model, masks, maps(2, 9, 10), maps(3, 7, 11), shrunk=["attn.qkv.weight", "attn.logit_scale"])
    assert model.attn.num_heads == 2


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_whole_swin_under_consistent_masks(v2):
    options = {"block": swin.SwinTransformerBlockV2, "downsample_layer": swin.PatchMergingV2} if v2 else {}
    model = swin.SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
                                 num_classes=10, **options).eval()
    dummy = torch.randn(1, 3, 36, 36)  # 9x9 then 5x5 tokens: padded and shifted in both stages
    masks = speedup.groups.consistent_masks(model, dummy)
    reference = masked_copy(model, masks).eval()
    before = parameter_count(model)
    report = speedup.shrink(model, masks, dummy)
    assert_same_outputs(reference, model, torch.randn(2, 3, 44, 44))
    assert not report.barriers
    assert parameter_count(model) / before < 0.3
    attn = model.features[3][0].attn
    assert attn.num_heads == 2 and attn.qkv.in_features == 32 and attn.proj.out_features == 32
    if v2:
        assert attn.cpb_mlp[0].out_features == 256


# -- video Swin: windows over time, height and width -------------------------------------------

video_swin = pytest.importorskip("torchvision.models.video.swin_transformer")
from speedup_torchvision.swin import PrunedShiftedWindowAttention3d  # noqa: E402

WINDOW_3D = [2, 4, 4]
SHIFTS_3D = {"shifted": [1, 2, 2], "unshifted": [0, 0, 0]}


def attention_3d(shift: list, **options) -> nn.Module:
    module = video_swin.ShiftedWindowAttention3d(C, list(WINDOW_3D), list(shift), HEADS, **options)
    with torch.no_grad():
        module.qkv.bias.uniform_(-1, 1)
        module.proj.bias.uniform_(-1, 1)
        module.relative_position_bias_table.normal_()
    return module


def clips(batch: int, frames: int, height: int, width: int) -> torch.Tensor:
    """``(B, T, H, W, C)``; one frame (shorter than the window) makes the window adapt to it."""
    return torch.randn(batch, frames, height, width, C)


@pytest.mark.parametrize("shift", SHIFTS_3D.values(), ids=SHIFTS_3D.keys())
@pytest.mark.parametrize("frames", [3, 1])
def test_unpruned_3d_replacement_computes_what_torchvision_computes(shift, frames):
    original = attention_3d(shift, attention_dropout=0.3, dropout=0.2)
    pruned = PrunedShiftedWindowAttention3d(original.qkv, original.proj, HEADS, HEAD_DIM, WINDOW_3D, shift, 0.3, 0.2,
                                            original.relative_position_index, original.relative_position_bias_table)
    assert_computes_the_same(original, pruned, clips(2, frames, 9, 6))  # 6 wide: whole windows; 9 high: padded


@pytest.mark.parametrize("shift", SHIFTS_3D.values(), ids=SHIFTS_3D.keys())
def test_3d_heads_and_features_go(shift):
    model = Block(attention_3d(shift))
    heads = torch.tensor([False, True, True, False])
    outputs = torch.rand(C, generator=torch.Generator().manual_seed(0)) < 0.5
    masks = {"attn.qkv": {"weight": rows(head_rows(heads), (3 * C, C)), "bias": head_rows(heads)},
             "attn.proj": {"weight": rows(outputs, (C, C))}}
    check_speedup(model, masks, clips(2, 3, 9, 10), clips(1, 5, 7, 11),
                  shrunk=["attn.qkv.weight", "attn.proj.weight", "attn.relative_position_bias_table", "out.weight"])
    assert isinstance(model.attn, PrunedShiftedWindowAttention3d)
    assert model.attn.num_heads == 2 and model.attn.proj.out_features == int(outputs.sum())


def test_whole_video_swin_under_consistent_masks():
    torch.manual_seed(0)
    model = video_swin.SwinTransformer3d(patch_size=[2, 4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4],
                                         window_size=[2, 4, 4], num_classes=10).eval()
    dummy = torch.randn(1, 3, 6, 36, 36)  # 3x9x9 then 3x5x5 patches: padded and shifted in both stages
    masks = speedup.groups.consistent_masks(model, dummy)
    reference = masked_copy(model, masks).eval()
    before = parameter_count(model)
    report = speedup.shrink(model, masks, dummy)
    assert_same_outputs(reference, model, torch.randn(2, 3, 4, 44, 28))
    assert not report.barriers and not report.kept_for_verification
    assert parameter_count(model) / before < 0.3
    attn = model.features[2][0].attn
    assert isinstance(attn, PrunedShiftedWindowAttention3d) and attn.num_heads == 2 and attn.qkv.in_features == 32
