"""Sizes a module stored when it was built and reads in ``forward`` follow the dimensions that shrank."""

import math
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from speedup.groups import consistent_masks
from speedup.testing import masked_copy
from support.checks import check_speedup, rows


class SplitInHalves(nn.Module):
    """Splits its input in halves by a size it stored (as timm's selective-kernel convolution), or by
    a literal size."""

    def __init__(self, channels: int, literal: bool = False):
        super().__init__()
        self.in_channels, self.out_channels, self.literal = channels, channels, literal
        self.convs = nn.ModuleList(nn.Conv2d(channels // 2, channels, 3, padding=1) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        halves = torch.split(x, 4 if self.literal else self.in_channels // 2, 1)
        return sum(conv(half) for conv, half in zip(self.convs, halves))


def _model(literal: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), SplitInHalves(8, literal), nn.Conv2d(8, 4, 1)).eval()


def _first_conv_keeps(kept: list[int]) -> dict:
    keep = torch.zeros(8, dtype=torch.bool)
    keep[kept] = True
    return {"0": {"weight": rows(keep, (8, 3, 3, 3)), "bias": keep}}


def _check(model: nn.Module, kept: list[int], **expected):
    return check_speedup(model, _first_conv_keeps(kept), torch.randn(1, 3, 6, 6), torch.randn(2, 3, 9, 7), **expected)


def test_a_stored_size_equal_to_a_dimension_that_shrank_is_set_to_its_new_size():
    model = _model()
    report = _check(model, [0, 1, 4, 5], shrunk=["0.weight", "2.convs.0.weight", "2.convs.1.weight"])
    # out_channels was 8 as well, but the outputs kept their 8 channels: only in_channels changed
    assert report.attributes == {"2.in_channels": (8, 4)}
    assert model[2].in_channels == 4 and model[2].out_channels == 8
    assert not report.kept_for_verification


def test_halves_stay_equal_where_the_masks_make_them_unequal():
    model = _model()
    # three channels of the first half and one of the second: two zero channels of the second half
    # are kept, so that halving the stored size still splits the input right
    report = _check(model, [0, 1, 2, 4], shrunk=["0.weight"])
    assert report.attributes == {"2.in_channels": (8, 6)}


def test_where_no_stored_size_makes_the_call_meet_its_plan_the_sizes_go_back_and_the_call_stays_whole():
    model = _model(literal=True)
    report = _check(model, [0, 1, 4, 5])
    assert (model[2].in_channels, model[2].out_channels) == (8, 8) and not report.attributes
    assert [reason for reason in report.kept_for_verification if "split" in reason]
    assert model[0].weight.shape[0] == 8  # the split needs all of its input


class OneSizeReadTwice(nn.Module):
    """Reads one stored size where one tensor shrinks and where another keeps its size."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.width = nn.Linear(8, 8), nn.Linear(8, 8), 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q(x).reshape(-1, self.width), self.k(x).reshape(-1, self.width)], -1)


def test_a_size_that_fits_one_read_and_breaks_another_goes_back():
    torch.manual_seed(0)
    model = nn.Sequential(OneSizeReadTwice(), nn.Linear(16, 3)).eval()
    keep = torch.tensor([1, 0, 1, 0, 1, 0, 1, 0], dtype=torch.bool)
    masks = {"0.q": {"weight": rows(keep, (8, 8)), "bias": keep}}
    report = check_speedup(model, masks, torch.randn(2, 5, 8), torch.randn(3, 4, 8))
    assert model[0].width == 8 and not report.attributes
    assert [reason for reason in report.kept_for_verification if "view" in reason or "reshape" in reason]


class CheckedPatchEmbedding(nn.Module):
    """PVT's patch embedding: checks its input's channels against a size it stored, in Python, then
    calls a convolution (whose own sizes its rule keeps in step)."""

    def __init__(self, channels: int, out: int):
        super().__init__()
        self.num_channels = channels
        self.projection = nn.Conv2d(channels, out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.num_channels:
            raise ValueError("the channel dimension does not match the configuration")
        return self.projection(x)


def test_a_size_checked_before_a_known_module_is_called_is_set_in_the_module_calling_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), CheckedPatchEmbedding(8, 4)).eval()
    report = _check(model, [0, 1, 4, 5], shrunk=["0.weight", "2.projection.weight"])
    assert report.attributes == {"2.num_channels": (8, 4)} and not report.kept_for_verification
    assert model[2].projection.in_channels == 4


class SplitAndScale(SplitInHalves):
    """Splits by its stored size and scales by a factor it picks, in Python, by that size: a size read
    outside shapes that no call's numbers show (a number computed from it would, see ``HandWrittenMean``)."""

    def __init__(self, channels: int):
        super().__init__(channels)
        self.register_buffer("factors", torch.tensor([2.0, 3.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.factors[0 if self.in_channels == 8 else 1]


class PoolByStoredWidth(nn.Module):
    """Averages each channel, reshaping with the channel count it stored."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], self.channels, -1).mean(-1)


def test_outputs_differing_with_no_call_to_blame_blame_each_size_set_latest_first():
    """The first size set (``in_channels``, read as a factor too) makes the outputs differ, the
    later one (``channels``) is innocent: once the later call is kept whole, the earlier size is
    blamed and goes back, where before the speedup gave up with an error."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), SplitAndScale(8), nn.Conv2d(8, 8, 1), PoolByStoredWidth(8),
                          nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    masks = _first_conv_keeps([0, 1, 4, 5])
    masks["2"] = {"weight": rows(torch.tensor([1, 0, 1, 0, 1, 0, 1, 0], dtype=torch.bool), (8, 8, 1, 1))}
    masks["4"] = {"weight": rows(torch.arange(16) % 2 == 0, (16, 8))}
    report = check_speedup(model, masks, torch.randn(1, 3, 6, 6), torch.randn(2, 3, 9, 7),
                           shrunk=["4.weight", "6.weight"])
    assert model[1].in_channels == 8 and not report.attributes
    assert [reason for reason in report.kept_for_verification if "split" in reason]


class CachedOffsets(nn.Module):
    """Adds offsets made from its buffer and the input's size, made on the first call and kept until
    the size changes (as YOLO's detection head keeps its anchors)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("stride", torch.tensor([8.0, 16.0]))
        self.size, self.offsets = None, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.size != x.shape[-1]:
            self.size = x.shape[-1]
            self.offsets = torch.cat([x.new_full((1, x.shape[-1]), float(self.stride[i])) for i in range(2)])
        return x + self.offsets.sum(0)


def test_calls_a_module_makes_on_its_first_call_only_do_not_take_the_blame():
    """The recording made the offsets; the sped-up model, run after it, reuses them: the calls that
    made them are passed over, and the size read as a factor is blamed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), SplitAndScale(8), nn.Conv2d(8, 8, 1), CachedOffsets(),
                          nn.Flatten(), nn.Linear(8 * 36, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    masks = _first_conv_keeps([0, 1, 4, 5])
    masks["5"] = {"weight": rows(torch.arange(16) % 2 == 0, (16, 8 * 36))}
    report = check_speedup(model, masks, torch.randn(1, 3, 6, 6), torch.randn(2, 3, 6, 6),
                           shrunk=["5.weight", "7.weight"])
    assert model[1].in_channels == 8 and not report.attributes
    assert [reason for reason in report.kept_for_verification if "split" in reason]
    assert not [reason for reason in report.kept_for_verification if "'3'" in reason]


class PartialConvolution(nn.Module):
    """FasterNet's partial convolution: a convolution over the first channels only, the others passed
    through, split by sizes it stored (or written in the code)."""

    def __init__(self, channels: int, convolved: int, literal: bool = False):
        super().__init__()
        self.dim_conv, self.dim_untouched, self.literal = convolved, channels - convolved, literal
        self.conv = nn.Conv2d(convolved, convolved, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sizes = [3, 5] if self.literal else [self.dim_conv, self.dim_untouched]
        first, rest = torch.split(x, sizes, 1)
        return torch.cat([self.conv(first), rest], 1)


class PartialBlock(nn.Module):
    def __init__(self, literal: bool = False):
        super().__init__()
        self.mix, self.mlp = PartialConvolution(8, 3, literal), nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.mix(x))


def _partial_model(literal: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), PartialBlock(literal), nn.Conv2d(8, 4, 1)).eval()


def _stream_keeps(kept: list[int], **more: torch.Tensor) -> dict:
    keep = torch.zeros(8, dtype=torch.bool)
    keep[kept] = True
    masks = {"0": {"weight": rows(keep, (8, 3, 3, 3)), "bias": keep}, "1.mlp": {"weight": rows(keep, (8, 8, 1, 1)), "bias": keep}}
    masks.update({name: {"weight": rows(k, (k.numel(), 3, 3, 3)), "bias": k} for name, k in more.items()})
    return masks


def test_parts_of_a_split_of_different_sizes_each_lose_their_own_channels():
    model = _partial_model()
    masks = _stream_keeps([0, 1, 2, 3, 5, 7])  # the convolved part keeps its 3 channels, the rest 3 of 5
    report = check_speedup(model, masks, torch.randn(1, 3, 6, 6), torch.randn(2, 3, 9, 7), shrunk=["0.weight", "1.mlp.weight"])
    assert report.attributes == {"1.mix.dim_untouched": (5, 3)} and not report.kept_for_verification
    assert model[1].mix.conv.weight.shape == (3, 3, 3, 3)


def test_a_part_of_a_split_takes_the_size_of_that_part_where_a_layer_inside_shrank_to_another():
    model = _partial_model()
    # the convolved part keeps 2 of its 3 channels, the convolution 1 of its 3 outputs
    masks = _stream_keeps([0, 2, 3, 4, 5, 6, 7], **{"1.mix.conv": torch.tensor([1, 0, 0], dtype=torch.bool)})
    report = check_speedup(model, masks, torch.randn(1, 3, 6, 6), torch.randn(2, 3, 9, 7),
                           shrunk=["0.weight", "1.mix.conv.weight"])
    assert report.attributes == {"1.mix.dim_conv": (3, 2)} and not report.kept_for_verification
    assert model[1].mix.conv.weight.shape == (1, 2, 3, 3)


def test_a_split_by_sizes_written_in_the_code_keeps_its_input_whole():
    model = _partial_model(literal=True)
    report = check_speedup(model, _stream_keeps([0, 1, 2, 3, 5, 7]), torch.randn(1, 3, 6, 6), torch.randn(2, 3, 9, 7))
    assert [reason for reason in report.kept_for_verification if "split" in reason]
    assert model[0].weight.shape[0] == 8


class HeadsFromWidth(nn.Module):
    """Attention splitting the stream's width ``C`` into its stored count of heads (timm's CaiT class attention)."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.num_heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj(torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class OtherHeadsFromWidth(HeadsFromWidth):
    """The same code in another class: a size set for one class is not set for it at once."""


class FaintBranch(nn.Module):
    """Two attention branches, the second scaled by 1e-5 as CaiT's layer scales start."""

    def __init__(self):
        super().__init__()
        self.embed, self.a, self.b, self.head = nn.Linear(6, 32), HeadsFromWidth(), OtherHeadsFromWidth(), nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        x = x + self.a(x)
        return self.head(x + 1e-5 * self.b(x))


def test_an_attention_splitting_heads_otherwise_than_planned_is_found_below_round_off():
    """Once a stored size was set (``a.num_heads``), the sped-up model is recorded again, and an
    attention call must make its planned shapes even where its branch changes the outputs by less
    than round-off (in float64 here: 5e-8 of the output with ``b.num_heads`` left at 4)."""
    torch.manual_seed(0)
    model = FaintBranch().double().eval()
    dummy = torch.randn(2, 5, 6, dtype=torch.float64)
    masks = consistent_masks(model, dummy, sparsity=0.5, seed=0)
    reference = masked_copy(model, masks).eval()
    fresh = torch.randn(3, 7, 6, dtype=torch.float64)
    report = check_speedup(model, masks, dummy, fresh, shrunk=["a.qkv.weight", "b.qkv.weight"])
    assert report.attributes == {"a.num_heads": (4, 2), "b.num_heads": (4, 2)}
    with torch.no_grad():
        torch.testing.assert_close(model(fresh), reference(fresh), rtol=1e-12, atol=1e-12)


class PoolingHead(nn.Module):
    """AIMv2's attention pooling: a learned query attends over the tokens, heads split by a count it
    stored and a width read from the stream; its outputs scaled down, as a freshly initialised model's are."""

    def __init__(self, dim: int, heads: int, scale: float):
        super().__init__()
        self.num_heads = heads
        self.k, self.v, self.out = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.query = nn.Parameter(torch.randn(1, 1, dim))
        with torch.no_grad():
            self.out.weight.mul_(scale)
            self.out.bias.mul_(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        k, v = (f(x).reshape(batch, tokens, self.num_heads, width // self.num_heads).transpose(1, 2)
                for f in (self.k, self.v))
        q = self.query.expand(batch, -1, -1).reshape(batch, 1, self.num_heads, width // self.num_heads).transpose(1, 2)
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, width))


def test_an_attention_splitting_a_narrower_stream_into_its_stored_head_count_is_found_on_small_outputs():
    """With the stream halved and two of four heads planned to go, the sped-up head split the stream
    into four heads of half the width (``c // self.num_heads``) and ran: 13% off the masked model's
    outputs, within the tolerance on the dummy because the outputs are small (1e-5). The shapes of the
    attention calls in the verification run are now compared with the plan, and the head count is set."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), PoolingHead(16, 4, scale=1e-5)).eval()
    dummy = torch.randn(2, 5, 6)
    masks = consistent_masks(model, dummy, sparsity=0.5, seed=0)
    reference = masked_copy(model, masks).eval()
    fresh = torch.randn(3, 7, 6)
    report = check_speedup(model, masks, dummy, fresh, shrunk=["1.k.weight", "1.v.weight"])
    assert report.attributes == {"1.num_heads": (4, 2)}
    with torch.no_grad():
        expected = reference(fresh)
        torch.testing.assert_close(model(fresh), expected, rtol=0, atol=1e-5 * float(expected.abs().max()))


class PositionBiasMlp(nn.Module):
    """timm's ``RelPosMlp``: one bias per head and pair of tokens, from an MLP over their offsets, the
    head count and the bias' shape stored."""

    def __init__(self, tokens: int, heads: int):
        super().__init__()
        self.num_heads, self.bias_shape = heads, (tokens, tokens, heads)
        self.mlp = nn.Sequential(nn.Linear(1, 16), nn.ReLU(), nn.Linear(16, heads))
        self.register_buffer("offsets", (torch.arange(tokens)[:, None] - torch.arange(tokens)[None]).float())

    def forward(self) -> torch.Tensor:
        bias = self.mlp(self.offsets.reshape(-1, 1)).view(-1, self.num_heads).view(self.bias_shape)
        return bias.permute(2, 0, 1)


class BiasedAttention(nn.Module):
    """Attention adding the biases of a submodule that stores the head count too."""

    def __init__(self, dim: int, heads: int, tokens: int):
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.rel_pos = PositionBiasMlp(tokens, heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        mixed = F.scaled_dot_product_attention(q, k, v, attn_mask=self.rel_pos())
        return self.proj(mixed.transpose(1, 2).reshape(batch, tokens, width))


def test_a_submodule_storing_the_head_count_too_has_it_set_with_its_module_s():
    """Setting ``num_heads`` in the attention, the submodule computing its biases then departed with its
    own stale ``num_heads``: that departure blamed the attention's choice, none fitted, and the
    attention stayed whole (vit_relpos in timm: half the parameters kept). The submodule's stored sizes
    are now tried with its module's still set: the count and the bias' shape."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), BiasedAttention(16, 4, tokens=5), nn.Linear(16, 3)).eval()
    dummy = torch.randn(2, 5, 6)
    masks = consistent_masks(model, dummy, sparsity=0.5, seed=0)
    report = check_speedup(model, masks, dummy, torch.randn(3, 5, 6),
                           shrunk=["1.qkv.weight", "1.rel_pos.mlp.2.weight"])
    assert not report.kept_for_verification
    assert report.attributes == {"1.num_heads": (4, 2), "1.rel_pos.num_heads": (4, 2),
                                 "1.rel_pos.bias_shape": ((5, 5, 4), (5, 5, 2))}


class Decoder(nn.Module):
    """A VAE's decoder: the latent made feature maps by a Linear and ``nn.Unflatten``, then upsampled."""

    def __init__(self):
        super().__init__()
        self.fc, self.unflatten = nn.Linear(8, 16 * 4 * 4), nn.Unflatten(1, (16, 4, 4))
        self.up, self.out = nn.ConvTranspose2d(16, 8, 2, stride=2), nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.up(F.relu(self.unflatten(self.fc(z))))))


def test_a_size_a_torch_module_stores_is_set_in_step():
    """``nn.Unflatten``'s view is recorded as its caller's call (torch's code is passed over to find
    the model's), so only the caller's attributes were looked at, none fitted, and the decoder kept
    every channel. The sizes of the caller's torch parts are now candidates too."""
    torch.manual_seed(0)
    model = Decoder().eval()
    masks = consistent_masks(model, torch.randn(2, 8), sparsity=0.5, seed=0)
    report = check_speedup(model, masks, torch.randn(2, 8), torch.randn(3, 8), shrunk=["fc.weight", "up.weight"])
    assert report.attributes == {"unflatten.unflattened_size": ((16, 4, 4), (8, 4, 4))}
    assert not report.kept_for_verification


class TwoHeadAttention(nn.Module):
    """Attention written out, its heads split by a stored count and the stream's width (Twins' windows)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.num_heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, width // self.num_heads).permute(
            2, 0, 3, 1, 4).unbind(0)
        mixed = (q @ k.transpose(-2, -1) * 0.25).softmax(-1) @ v
        return x + self.proj(mixed.transpose(1, 2).reshape(batch, tokens, width))


class OtherTwoHeadAttention(TwoHeadAttention):
    """The same code in another class: its stored count is set on its own."""


def test_a_reshape_that_copied_when_recorded_and_views_once_one_head_is_left_is_the_same_call():
    """With two heads, ``transpose(1, 2).reshape`` copies (``clone``, ``_unsafe_view``); with one left it
    is a view. Looking for the call the second attention's outputs departed at, the first's view was
    taken for a call the recording never made: it was blamed, and both attentions stayed whole."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 64), TwoHeadAttention(64, 2), OtherTwoHeadAttention(64, 2), nn.Linear(64, 3))
    dummy = torch.randn(2, 5, 6)
    masks = consistent_masks(model.eval(), dummy, sparsity=0.5, seed=0)
    report = check_speedup(model, masks, dummy, torch.randn(3, 7, 6), shrunk=["1.qkv.weight", "2.qkv.weight"])
    assert report.attributes == {"1.num_heads": (2, 1), "2.num_heads": (2, 1)} and not report.kept_for_verification


class AttentionWithoutSelf(nn.Module):
    """Self-attention whose methods name their module ``this``, splitting heads by sizes read in Python."""

    def __init__(this, dim: int, heads: int):
        super().__init__()
        this.heads, this.qkv, this.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(this, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        q, k, v = this.qkv(x).reshape(batch, tokens, 3, this.heads, width // this.heads).permute(2, 0, 3, 1, 4)
        mixed = (q @ k.transpose(-2, -1)).softmax(-1) @ v
        return this.proj(mixed.transpose(1, 2).reshape(batch, tokens, width))


def test_code_of_a_module_naming_itself_otherwise_than_self_is_known_as_that_module_s():
    """The operators a module's ``forward`` issues belong to that module whatever its first parameter is
    called: a call failing verification is kept within its own module. Before, ops of a ``forward(this,
    x)`` were the whole model's, and one view whose sizes follow the stream kept every layer whole."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), AttentionWithoutSelf(8, 2), AttentionWithoutSelf(8, 2), nn.Linear(8, 3))
    dummy = torch.randn(1, 5, 6)
    masks = consistent_masks(model.eval(), dummy, sparsity=0.5, seed=0)
    report = check_speedup(model, masks, dummy, torch.randn(2, 7, 6),
                           shrunk=["0.weight", "1.qkv.weight", "2.proj.weight"], max_param_ratio=0.4)
    assert not report.kept_for_verification


class StoredHeadsAttention(nn.Module):
    """Attention splitting heads by a count it stored, by hand or with ``scaled_dot_product_attention``."""

    def __init__(self, dim: int, heads: int, fused: bool):
        super().__init__()
        self.num_heads, self.fused = heads, fused
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, allowed: Optional[torch.Tensor] = None) -> torch.Tensor:
        batch, tokens, width = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, width // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.fused:
            mixed = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        else:
            scores = q @ k.transpose(-2, -1) * 0.3
            if allowed is not None:
                scores = scores.masked_fill(~allowed, -math.inf)
            mixed = scores.softmax(-1) @ v
        return self.proj(mixed.transpose(1, 2).reshape(batch, tokens, width))


@pytest.mark.parametrize("fused", [False, True], ids=["softmax", "scaled_dot_product_attention"])
def test_a_dummy_of_one_token_still_finds_the_head_count_the_code_stored(fused):
    """Over one key, attention gives each query its value whatever the heads: the sped-up model, still
    splitting its width into the 4 heads it stored where 2 remain, gave the masked model's outputs on a
    one-token dummy and was off by 0.4 of 34 on longer inputs. Verification now compares every call's
    shapes with the plan where a call hides its input's layout, and sets the stored count."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), StoredHeadsAttention(16, 4, fused), StoredHeadsAttention(16, 4, fused))
    masks = consistent_masks(model.eval(), torch.randn(2, 5, 6), sparsity=0.5, seed=0)
    report = check_speedup(model, masks, torch.randn(2, 1, 6), torch.randn(3, 7, 6), shrunk=["1.qkv.weight"])
    assert report.attributes == {"1.num_heads": (4, 2), "2.num_heads": (4, 2)}


class PaddedTokens(nn.Module):
    """Embeds tokens and attends over the first ``lengths`` of them (keys past a sequence's length masked)."""

    def __init__(self, fused: bool):
        super().__init__()
        self.embed, self.attention = nn.Linear(6, 16), StoredHeadsAttention(16, 4, fused)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        allowed = torch.arange(x.shape[1]) < lengths[:, None]
        return self.attention(self.embed(x), allowed[:, None, None, :])


@pytest.mark.parametrize("fused", [False, True], ids=["softmax", "scaled_dot_product_attention"])
@pytest.mark.parametrize("dummy", ["one token repeated", "one key per query"])
def test_a_dummy_giving_every_head_the_same_weights_still_finds_the_head_count_the_code_stored(fused, dummy):
    """A dummy of one token repeated weighs every key alike, and one whose padding leaves each query one
    key weighs it alone: in every head, so the outputs were equal whatever the heads, and the stale head
    count went unnoticed (off by 0.05 of 2 on other inputs)."""
    torch.manual_seed(0)
    model = PaddedTokens(fused).eval()
    tokens = torch.randn(2, 5, 6)
    lengths = torch.tensor([5, 5])
    if dummy == "one token repeated":
        tokens = tokens[:, :1].expand(2, 5, 6).contiguous()
    else:
        lengths = torch.tensor([1, 1])
    masks = consistent_masks(model, (torch.randn(2, 5, 6), torch.tensor([5, 3])), sparsity=0.5, seed=0)
    report = check_speedup(model, masks, (tokens, lengths), (torch.randn(3, 7, 6), torch.tensor([7, 4, 2])),
                           shrunk=["attention.qkv.weight"])
    assert report.attributes == {"attention.num_heads": (4, 2)}


class SlidingWindowAttention(nn.Module):
    """Mistral's attention, written out: heads split by a count it stored, each query attending to the
    ``self.window`` latest tokens, a window of as many tokens as there are heads."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.heads, self.head_dim, self.window = heads, dim // heads, heads
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        q, k, v = (f(x).view(batch, tokens, self.heads, self.head_dim).transpose(1, 2)
                   for f in (self.q, self.k, self.v))
        position = torch.arange(tokens)
        back = position[:, None] - position[None, :]
        scores = (q @ k.transpose(-2, -1) * 0.5).masked_fill((back < 0) | (back >= self.window), -math.inf)
        return self.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, tokens, -1))


def test_an_attribute_equal_to_a_head_count_by_chance_keeps_its_value():
    """Both stored 4s were set to 2, the window too: on a dummy of two tokens a window of 2 or 4 is the
    same, and longer inputs attended to fewer tokens than the masked model. The window's comparison
    now shows the number it computes with, and the head count is set alone."""
    torch.manual_seed(0)
    model = SlidingWindowAttention().eval()
    heads_kept = torch.tensor([0, 1, 1, 0], dtype=torch.bool).repeat_interleave(8)
    masks = {name: {"weight": rows(heads_kept, (32, 32)), "bias": heads_kept} for name in ("q", "k", "v")}
    report = check_speedup(model, masks, torch.randn(2, 2, 32), torch.randn(3, 9, 32), shrunk=["v.weight"])
    assert report.attributes == {"heads": (4, 2)} and model.window == 4


class WindowOnLongInputs(nn.Module):
    """Attention that, on inputs longer than ``self.window`` tokens, attends within that window only
    (Reformer's local attention and its ``chunk_length``): a window equal to the width by chance."""

    def __init__(self, width: int = 64, heads: int = 4):
        super().__init__()
        self.heads, self.head_dim, self.window = heads, width // heads, width
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) * 0.25
        if tokens > self.window:
            position = torch.arange(tokens)
            scores = scores.masked_fill((position[:, None] - position[None, :]).abs() >= self.window, -math.inf)
        return self.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, tokens, -1))


def test_a_stored_number_read_only_where_the_dummy_does_not_go_keeps_its_value():
    """Both stored 64 and 4 equal full sizes that shrank, and setting both verifies on a dummy of 16
    tokens; but the window set to 32 would make inputs of 33 to 64 tokens attend within it. Only
    what the dummy's run needs changed is changed."""
    torch.manual_seed(0)
    model = WindowOnLongInputs().eval()
    heads_kept = torch.tensor([1, 1, 0, 0], dtype=torch.bool).repeat_interleave(16)
    masks = {"qkv": {"weight": rows(heads_kept.repeat(3), (192, 64)), "bias": heads_kept.repeat(3)},
             "out": {"weight": heads_kept[None, :].expand(64, 64).clone()}}
    report = check_speedup(model, masks, torch.randn(2, 16, 64), torch.randn(3, 48, 64), shrunk=["qkv.weight"])
    assert report.attributes == {"heads": (4, 2)} and model.window == 64


class HandWrittenMean(nn.Module):
    """Features and their mean written out: a sum divided by the width the code reads."""

    def __init__(self):
        super().__init__()
        self.fc, self.fc2, self.head = nn.Linear(6, 16), nn.Linear(16, 6), nn.Linear(7, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.fc(x)
        mean = z.sum(-1, keepdim=True) / z.shape[-1]
        return self.head(torch.cat([self.fc2(F.gelu(z)), mean], -1))


def test_an_integer_operand_read_from_a_size_that_shrank_keeps_that_size():
    """``z.sum(-1) / z.shape[-1]`` divides by 8 in the sped-up model where 16 was recorded: the call is
    found by that number (integer operands count as the floats do) and the width is kept; before, no
    call was to blame and the speedup failed. Layers elsewhere still shrink."""
    torch.manual_seed(0)
    model = HandWrittenMean().eval()
    keep = torch.arange(16) % 2 == 0
    masks = {"fc": {"weight": rows(keep, (16, 6)), "bias": keep}, "fc2": {"weight": rows(keep[:6], (6, 16))}}
    report = check_speedup(model, masks, torch.randn(2, 5, 6), torch.randn(3, 7, 6), shrunk=["fc2.weight"])
    assert model.fc.out_features == 16 and any("the code passed 8 where 16" in r for r in report.kept_for_verification)


class RootAttention(nn.Module):
    """Attention splitting its projections into the heads it stored, the head size following."""

    def __init__(self, width: int = 16, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (f(x).reshape(b, n, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        return x + self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1))


def test_a_model_whose_own_forward_reads_a_stored_head_count_has_it_set():
    """The model itself is the attention: its own forward's sizes are looked at as a module's are (its
    heads were all kept, the verification failing for the count it stored)."""
    torch.manual_seed(0)
    model = RootAttention().eval()
    head = torch.tensor([False, True]).repeat_interleave(8)
    masks = {name: {"weight": rows(head, (16, 16)), "bias": head} for name in ("q", "k", "v")}
    masks["out"] = {"weight": head[None, :].expand(16, 16)}
    report = check_speedup(model, masks, torch.randn(2, 5, 16), torch.randn(3, 7, 16),
                           shrunk=["q.weight", "out.weight"])
    assert report.attributes == {"heads": (2, 1)}


class SplitByStreamWidth(nn.Module):
    """A projection to queries, keys and values split by the stream's width ``D``, which the code reads
    from the stream (wav2vec2's and Hugging Face's way), in the model's own forward."""

    def __init__(self):
        super().__init__()
        self.inp, self.qkv, self.out = nn.Linear(6, 16), nn.Linear(16, 48), nn.Linear(16, 16)
        self.head, self.up, self.down = nn.Linear(16, 3), nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        q, k, v = self.qkv(h).split(h.shape[-1], dim=-1)
        h = h + self.out(F.scaled_dot_product_attention(q, k, v))
        h = h + self.down(torch.relu(self.up(h)))
        return self.head(h)


def test_a_split_by_a_size_read_from_another_tensor_keeps_that_size_only():
    """The split cannot follow the plan (the stream and the features it cuts shrink apart): the
    dimensions of the stream's size are kept whole, not the whole model (which nothing can refill)."""
    torch.manual_seed(0)
    model = SplitByStreamWidth().eval()
    dummy = torch.randn(2, 5, 6)
    masks = consistent_masks(model, dummy, sparsity=0.5, seed=0)
    report = check_speedup(model, masks, dummy, torch.randn(3, 7, 6), shrunk=["up.weight"])
    assert any("dimensions of size 16 in '<model>' kept" in reason for reason in report.kept_for_verification)
    assert model.inp.out_features == 16 and model.up.out_features == 16


class Correlation(nn.Module):
    """RAFT's correlation, divided by the square root of the features' width read from their shape,
    next to a context branch as wide that has nothing to do with it."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 16, 1))
        self.context = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 16, 3, 1, 1))
        self.head = nn.Conv2d(17, 2, 3, padding=1)

    def forward(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        f1, f2 = self.features(torch.cat([first, second], dim=0)).chunk(2, dim=0)
        b, c, h, w = f1.shape
        corr = torch.einsum("bchw,bcuv->bhwuv", f1, f2) / c ** 0.5
        corr = corr.reshape(b, h * w, h, w).amax(1, keepdim=True)
        return self.head(torch.cat([corr, torch.relu(self.context(first))], 1))


def test_a_scale_read_from_a_size_keeps_that_size_where_the_call_reads_it_first():
    """The scale's size is looked for among what the call computes from before the whole module: the
    context branch, as wide, kept its channels too (3796 parameters stayed 3796)."""
    torch.manual_seed(0)
    model = Correlation().eval()
    dummy = (torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16))
    masks = consistent_masks(model, dummy, sparsity=0.5, seed=0)
    check_speedup(model, masks, dummy, (torch.randn(3, 3, 12, 20), torch.randn(3, 3, 12, 20)),
                  shrunk=["context.0.weight"])
    assert model.features[2].out_channels == 16 and model.context[0].out_channels == 8
