"""Attention, normalisation of the hidden size, embeddings, shared modules: against the masked model."""

import copy
import functools
import math
import warnings
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from speedup.groups import consistent_masks
from speedup.modules import ConstantAwareLayerNorm, ConstantAwareRMSNorm, GatheredNorm, PrunedMultiheadAttention
from speedup.testing import masked_copy
from support.checks import check_speedup, keep_mask, output_channel_masks, rows

E, H = 32, 4
D = E // H


def head_rows(heads: torch.Tensor, copies: int = 3) -> torch.Tensor:
    """Rows of a (copies * E)-row projection belonging to the kept heads."""
    return heads.repeat_interleave(D).repeat(copies)


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_loses_whole_heads(batch_first):
    attention = nn.MultiheadAttention(E, H, batch_first=batch_first)
    model = nn.ModuleDict({"attn": attention})
    heads = torch.tensor([True, False, True, False])
    masks = {"attn": {"in_proj_weight": rows(head_rows(heads), (3 * E, E)), "in_proj_bias": head_rows(heads)}}

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = attention

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    model = Wrapper()
    shape = (2, 5, E) if batch_first else (5, 2, E)
    fresh = (3, 7, E) if batch_first else (7, 3, E)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new module's parts are not "modules that did not run"
        check_speedup(model, masks, torch.randn(shape), torch.randn(fresh), shrunk=["attn.out_proj.weight"])
    assert isinstance(model.attn, PrunedMultiheadAttention) and model.attn.num_heads == 2


def test_attention_weights_that_are_returned_keep_every_head():
    attention = nn.MultiheadAttention(E, H, batch_first=True)

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = attention

        def forward(self, x):
            return self.attn(x, x, x)  # (output, weights averaged over heads)

    heads = torch.tensor([True, False, True, True])
    masks = {"attn": {"in_proj_weight": rows(head_rows(heads), (3 * E, E)), "in_proj_bias": head_rows(heads)}}
    check_speedup(Wrapper(), masks, torch.randn(2, 5, E), torch.randn(1, 6, E))


class CrossAttendingTwice(nn.Module):
    """Two attention layers reading one memory, each with its own columns of the memory (and of its
    query, normalised apart) masked."""

    def __init__(self):
        super().__init__()
        self.memory, self.embed = nn.Linear(12, E), nn.Linear(5, E)
        self.norms = nn.ModuleList([nn.LayerNorm(E) for _ in range(2)])
        self.attn = nn.ModuleList([nn.MultiheadAttention(E, H, batch_first=True) for _ in range(2)])
        self.head = nn.Linear(E, 3)

    def forward(self, x, memory):
        memory, x = self.memory(memory), self.embed(x)
        for norm, attention in zip(self.norms, self.attn):
            x = x + attention(norm(x), memory, memory, need_weights=False)[0]
        return self.head(x)


def test_an_attention_rebuilt_keeps_its_masked_columns_that_another_layer_reads_masked():
    """Memory channel 5, masked in both layers, goes; channel 3, masked in the first only, stays: the
    first layer's projections were rebuilt with its values in column 3 unmasked (off by 0.01, a
    VerificationError; with ``verify=False``, silently off by 0.02)."""
    torch.manual_seed(0)
    model = CrossAttendingTwice().eval()
    masks = {f"attn.{i}": {"in_proj_weight": torch.ones(3 * E, E).index_fill(1, torch.tensor(columns), 0)}
             for i, columns in enumerate([[3, 5], [5]])}
    check_speedup(model, masks, (torch.randn(2, 6, 5), torch.randn(2, 9, 12)),
                  (torch.randn(3, 4, 5), torch.randn(3, 7, 12)), shrunk=["memory.weight"])
    assert model.attn[0].k_proj.in_features == E - 1 and not bool(model.attn[0].k_proj.weight[:, 3].any())

def test_transformer_encoder_heads_and_feed_forward_with_padding_mask():
    layer = nn.TransformerEncoderLayer(E, H, 64, batch_first=True, dropout=0.1)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    masks = {}
    for i in range(2):
        heads = keep_mask(H)
        masks[f"layers.{i}.self_attn"] = {"in_proj_weight": rows(head_rows(heads), (3 * E, E)),
                                          "in_proj_bias": head_rows(heads)}
        ffn = keep_mask(64)
        masks[f"layers.{i}.linear1"] = {"weight": rows(ffn, (64, E)), "bias": ffn}
    padding = torch.zeros(3, 6, dtype=torch.bool)
    padding[1, -2:] = True
    check_speedup(model, masks, torch.randn(2, 5, E), {"src": torch.randn(3, 6, E), "src_key_padding_mask": padding},
                  shrunk=["layers.0.linear1.weight", "layers.1.linear2.weight", "layers.0.self_attn.out_proj.weight"])


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")  # the masked model's nested path
def test_transformer_encoder_with_masked_norm_scales_leaves_its_fused_path_where_a_part_was_rebuilt():
    """Masked norm scales make constant outputs the next layer folds: the norms are rebuilt (counting
    removed constants, passing on fewer outputs). Inference then ran torch's fused path, which reads the
    norms' tensors and bypasses their ``forward``: it failed on the gathered norm (no ``eps``). Layers
    with a rebuilt part now take their ordinary path, and the encoder packs no nested tensors for them."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, 64, batch_first=True, dropout=0.0)
    model = nn.TransformerEncoder(layer, 2).eval()
    generator = torch.Generator().manual_seed(0)
    masks = {name: {"weight": torch.rand(E, generator=generator) > 0.5}
             for name, module in model.named_modules() if isinstance(module, nn.LayerNorm)}
    reference = masked_copy(model, masks)
    check_speedup(model, masks, torch.randn(2, 5, E), torch.randn(3, 6, E))
    rebuilt = [i for i, part in enumerate(model.layers) if type(part.norm2) is not nn.LayerNorm]
    assert rebuilt and all(model.layers[i].activation_relu_or_gelu == 0 for i in rebuilt)
    # A padded batch: the masked model's nested path gives zeros at padded positions, the ordinary path
    # computes them; every other position is equal.
    assert not model.use_nested_tensor
    src, padding = torch.randn(3, 6, E), torch.zeros(3, 6, dtype=torch.bool)
    padding[1, -2:] = True
    with torch.no_grad():
        expected, actual = reference(src, src_key_padding_mask=padding), model(src, src_key_padding_mask=padding)
    torch.testing.assert_close(actual[~padding], expected[~padding], rtol=1e-5, atol=1e-5)
    model(src).sum().backward()  # the ordinary path, with gradients too


def test_torch_transformer_takes_the_width_its_layers_now_have():
    """``nn.Transformer`` checks its inputs against ``d_model``: it follows the stream's new width."""
    torch.manual_seed(0)

    class Translator(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.head = nn.Linear(6, E), nn.Linear(E, 5)
            self.transformer = nn.Transformer(E, H, 1, 1, 64, 0.0, batch_first=True)

        def forward(self, src, tgt):
            return self.head(self.transformer(self.embed(src), self.embed(tgt)))

    model = Translator().eval()
    dummy = (torch.randn(2, 7, 6), torch.randn(2, 5, 6))
    masks = consistent_masks(model, dummy, sparsity=0.5, seed=0)
    report = check_speedup(model, masks, dummy, (torch.randn(3, 9, 6), torch.randn(3, 4, 6)),
                           shrunk=["embed.weight", "transformer.decoder.layers.0.multihead_attn.out_proj.weight"])
    assert report.attributes["transformer.d_model"] == (E, E // 2) and not report.kept_for_verification


class HandAttention(nn.Module):
    """Attention written with view/transpose and SDPA, the way most model code does it."""

    def __init__(self, heads_in_view: int = -1):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(E, E) for _ in range(4))
        self.heads_in_view = heads_in_view

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.heads_in_view, D).transpose(1, 2)
        k = self.k(x).view(b, t, -1, D).transpose(1, 2)
        v = self.v(x).view(b, t, -1, D).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(out.transpose(1, 2).reshape(b, t, -1))


class HeadsInTheBatch(nn.Module):
    """ViTDet's and SAM's attention: heads folded into the batch, and a relative position term along
    the height as an ``einsum`` of the queries with a table all heads share (which torch runs as
    permutes, a merge of heads with token positions, a batched product and the split back)."""

    def __init__(self, dim: int = 32, heads: int = 4, side: int = 4):
        super().__init__()
        self.heads, self.side = heads, side
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.randn(2 * side - 1, dim // heads) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4).reshape(
            3, b * self.heads, n, -1).unbind(0)
        scores = q @ k.transpose(-2, -1) * 0.5
        h = self.side
        table = self.rel_pos_h[torch.arange(h)[:, None] - torch.arange(h)[None, :] + h - 1]
        along_h = torch.einsum("bhwc,hkc->bhwk", q.reshape(q.shape[0], h, h, -1), table)
        scores = (scores.view(-1, h, h, h, h) + along_h[..., None]).view(-1, n, n)
        out = (scores.softmax(-1) @ v).view(b, self.heads, n, -1).permute(0, 2, 1, 3).reshape(b, n, -1)
        return self.proj(out)


def test_heads_folded_into_the_batch_with_a_shared_relative_position_table_go():
    """The einsum merged the heads (repeated along the batch) with token positions, which cannot go;
    its split back defined the heads as a conjunction of themselves, a cycle: nothing of the attention
    could go. The width of the heads (the relative position table's too) now goes."""
    torch.manual_seed(0)
    model = HeadsInTheBatch().eval()
    dummy = torch.randn(2, 16, 32)
    masks = consistent_masks(model, dummy)
    assert "qkv" in masks and "proj" in masks
    check_speedup(model, masks, dummy, torch.randn(3, 16, 32), shrunk=["qkv.weight", "proj.weight"])
    assert model.qkv.out_features == 48 and model.proj.in_features == 16 and model.rel_pos_h.shape[1] * 2 == 32 // 4


def test_heads_of_hand_written_attention_go_when_q_k_v_are_masked_alike():
    model = HandAttention()
    heads = torch.tensor([False, True, True, False])
    feature = heads.repeat_interleave(D)
    masks = {name: {"weight": rows(feature, (E, E)), "bias": feature} for name in ("q", "k", "v")}
    check_speedup(model, masks, torch.randn(2, 5, E), torch.randn(3, 5, E),
                  shrunk=["q.weight", "k.weight", "v.weight", "o.weight"])


class MatmulAttention(HandAttention):
    """The same written with ``softmax(q @ k^T) @ v`` (latent diffusion's and lucidrains' attention)."""

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (f(x).view(b, t, -1, D).transpose(1, 2) for f in (self.q, self.k, self.v))
        out = (q @ k.transpose(-2, -1) * D ** -0.5).softmax(-1) @ v
        return self.o(out.transpose(1, 2).reshape(b, t, -1))


def test_a_head_whose_values_are_masked_goes_from_attention_written_with_matmuls():
    """Its output is zero: a matrix of the batch that is zero in one operand of a product gives zeros
    (only its rows and columns were followed, and nothing went)."""
    model = MatmulAttention()
    feature = torch.tensor([False, True, True, False]).repeat_interleave(D)
    masks = {"v": {"weight": rows(feature, (E, E)), "bias": feature}}
    check_speedup(model, masks, torch.randn(2, 5, E), torch.randn(3, 7, E),
                  shrunk=["q.weight", "k.weight", "v.weight", "o.weight"])
    assert model.o.in_features == E // 2


class FusedQKV(nn.Module):
    """timm's attention: one qkv projection split with ``unbind``, its head size computed from the stream."""

    def __init__(self, heads: int = 4):
        super().__init__()
        self.num_heads = heads
        self.inp, self.qkv, self.proj = nn.Linear(8, E), nn.Linear(E, 3 * E, bias=False), nn.Linear(E, E)

    def forward(self, x):
        x = self.inp(x)
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q @ k.transpose(-2, -1)) * (c // self.num_heads) ** -0.5).softmax(dim=-1)
        return x + self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


def test_heads_of_a_fused_projection_split_by_unbind_go_with_the_stream():
    """Half the heads and half the stream: ``c // num_heads`` still gives the head size once the
    stored ``num_heads`` follows (``unbind`` passes the heads through)."""
    model = nn.Sequential(FusedQKV())
    heads = torch.tensor([False, True, True, False]).repeat_interleave(D)
    stream = torch.tensor([True, False] * (E // 2))
    masks = {"0.inp": {"weight": rows(stream, (E, 8)), "bias": stream},
             "0.qkv": {"weight": heads.repeat(3)[:, None] & stream[None, :]},
             "0.proj": {"weight": stream[:, None] & heads[None, :], "bias": stream}}
    report = check_speedup(model, masks, torch.randn(2, 5, 8), torch.randn(3, 7, 8),
                           shrunk=["0.inp.weight", "0.qkv.weight", "0.proj.weight"])
    assert model[0].num_heads == 2 and model[0].qkv.weight.shape == (3 * E // 2, E // 2)
    assert report.attributes == {"0.num_heads": (4, 2)}


class Restacked(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, E), nn.Linear(E, 3)

    def forward(self, x):
        return self.b(torch.stack(self.a(x).unbind(0), 0) * 2)  # the batch unbound and stacked again


def test_features_pass_through_unbind_and_stack():
    model = Restacked()
    check_speedup(model, output_channel_masks(model, ["a"]), torch.randn(2, 8), torch.randn(2, 8), shrunk=["a.weight", "b.weight"])


class PerHeadBias(nn.Module):
    """Attention given a per-head additive mask (T5's relative position bias, one table column per head)."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(E, E) for _ in range(4))
        self.bias = nn.Embedding(9, H)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, -1, D).transpose(1, 2) for p in (self.q, self.k, self.v))
        distance = (torch.arange(t)[None, :] - torch.arange(t)[:, None]).clamp(-4, 4) + 4
        mask = self.bias(distance).permute(2, 0, 1).unsqueeze(0)  # (1, heads, t, t)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o(out.transpose(1, 2).reshape(b, t, -1))


def test_a_per_head_attention_mask_loses_the_slices_of_removed_heads():
    model = PerHeadBias()
    heads = torch.tensor([True, False, True, False])
    feature = heads.repeat_interleave(D)
    masks = {name: {"weight": rows(feature, (E, E)), "bias": feature} for name in ("q", "k", "v")}
    check_speedup(model, masks, torch.randn(2, 5, E), torch.randn(3, 7, E),
                  shrunk=["q.weight", "o.weight", "bias.weight"])


def test_a_literal_head_dim_keeps_only_the_head_dim_after_verification():
    """v loses entries inside its heads too; ``view(b, t, -1, D)`` cannot follow, the heads still go."""
    model = HandAttention()
    heads = torch.tensor([False, True, True, False])
    feature = heads.repeat_interleave(D)
    inner = feature & (torch.arange(E) % D < D - 2)
    masks = {name: {"weight": rows(feature, (E, E)), "bias": feature} for name in ("q", "k")}
    masks["v"] = {"weight": rows(inner, (E, E)), "bias": inner}
    report = check_speedup(model, masks, torch.randn(2, 5, E), torch.randn(3, 5, E),
                           shrunk=["q.weight", "k.weight", "v.weight", "o.weight"])
    assert model.v.out_features == 2 * D
    assert report.kept_for_verification and "dimension 3 kept" in report.kept_for_verification[0]


class SilentView(nn.Module):
    """``view(b, -1, 4)`` makes a wrong shape without raising once ``proj`` loses its inner entries;
    a size read from it then breaks an unrelated operator further on."""

    def __init__(self):
        super().__init__()
        self.proj, self.gate, self.out = nn.Linear(8, 16), nn.Linear(8, 4), nn.Linear(16, 2)

    def forward(self, x):
        blocks = torch.relu(self.proj(x)).view(x.shape[0], -1, 4)
        gated = self.gate(x) * torch.ones(blocks.shape[1])
        return self.out(blocks.flatten(1)) + gated.sum(1, keepdim=True)


def test_verification_blames_the_call_that_went_off_plan_not_the_one_that_raised():
    model = SilentView()
    inner = torch.arange(16) % 4 < 2  # the last two entries of every block of 4
    masks = {"proj": {"weight": rows(inner, (16, 8)), "bias": inner}}
    report = check_speedup(model, masks, torch.randn(4, 8), torch.randn(6, 8))
    assert report.kept_for_verification and "view" in report.kept_for_verification[0]


class LiteralHeads(HandAttention):
    """``view(b, t, 4, 8)`` for the queries, written in the code: it would not adapt to fewer heads."""

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, 4, 8).transpose(1, 2)
        k, v = (f(x).view(b, t, -1, D).transpose(1, 2) for f in (self.k, self.v))
        return self.o(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, -1))


class CausalMaskMadeInForward(MatmulAttention):
    """nanoGPT's attention with its causal mask made in forward by ``torch.tril``."""

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (f(x).view(b, t, -1, D).transpose(1, 2) for f in (self.q, self.k, self.v))
        causal = torch.tril(torch.ones(t, t)).view(1, 1, t, t)
        scores = (q @ k.transpose(-2, -1) * D ** -0.5).masked_fill(causal == 0, float("-inf"))
        return self.o((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, -1))


def test_a_causal_mask_made_with_tril_is_no_barrier():
    """``tril`` and ``triu`` zero entries by their positions: they were barriers, with a warning."""
    model = CausalMaskMadeInForward()
    feature = torch.tensor([False, True, True, False]).repeat_interleave(D)
    masks = {name: {"weight": rows(feature, (E, E)), "bias": feature} for name in ("q", "k", "v")}
    report = check_speedup(model, masks, torch.randn(2, 5, E), torch.randn(3, 7, E), shrunk=["q.weight", "o.weight"])
    assert not report.barriers


def test_a_literal_head_count_in_view_keeps_the_heads_after_verification():
    model = LiteralHeads()
    heads = torch.tensor([False, True, True, False])
    feature = heads.repeat_interleave(D)
    masks = {name: {"weight": rows(feature, (E, E)), "bias": feature} for name in ("q", "k", "v")}
    report = check_speedup(model, masks, torch.randn(2, 5, E), torch.randn(3, 5, E))
    assert report.kept_for_verification and "view" in report.kept_for_verification[0]


def test_half_of_a_head_cannot_go():
    model = HandAttention()
    feature = torch.tensor([True, False] * (E // 2))
    masks = {name: {"weight": rows(feature, (E, E)), "bias": feature} for name in ("v",)}
    report = check_speedup(model, masks, torch.randn(2, 5, E), torch.randn(3, 5, E))
    assert model.v.weight.shape == (E, E)
    del report


class EinsumMixer(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(E, E)
        self.b = nn.Linear(E, E)
        self.out = nn.Linear(E, 8)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        scores = torch.einsum("bte,bse->bts", a, b) / math.sqrt(E)
        mixed = torch.bmm(torch.softmax(scores, -1), b)
        return self.out(mixed + torch.matmul(a, torch.eye(E)))


def test_contracted_features_that_are_zero_on_either_side_go():
    model = EinsumMixer()
    keep = keep_mask(E)
    masks = {"a": {"weight": rows(keep, (E, E)), "bias": keep}}
    check_speedup(model, masks, torch.randn(2, 5, E), torch.randn(3, 4, E))


class HiddenStream(nn.Module):
    """A residual stream with LayerNorms, whose hidden channels are masked everywhere."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, E)
        self.blocks = nn.ModuleList(nn.ModuleDict({"norm": nn.LayerNorm(E), "fc": nn.Linear(E, 64), "proj": nn.Linear(64, E)})
                                    for _ in range(2))
        self.final = nn.LayerNorm(E)
        self.head = nn.Linear(E, 50)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = x + block["proj"](F.gelu(block["fc"](block["norm"](x))))
        return self.head(self.final(x))


def test_hidden_size_pruned_through_layer_norms_keeps_their_statistics():
    model = HiddenStream()
    hidden = keep_mask(E)
    masks = {"embed": {"weight": hidden[None, :].expand(50, E)}, "final": {"weight": hidden, "bias": hidden}}
    for i in range(2):
        masks[f"blocks.{i}.norm"] = {"weight": hidden, "bias": hidden}
        masks[f"blocks.{i}.proj"] = {"weight": rows(hidden, (E, 64)), "bias": hidden}
    check_speedup(model, masks, torch.randint(0, 50, (2, 6)), torch.randint(0, 50, (3, 9)),
                  shrunk=["embed.weight", "blocks.0.fc.weight", "blocks.1.proj.weight", "head.weight"])
    assert isinstance(model.final, ConstantAwareLayerNorm)


@pytest.mark.parametrize("constants", [[0.0, 0.0, 0.0], [0.5, -1.0, 2.0]])
def test_constant_aware_layer_norm_equals_the_full_norm_in_values_and_gradients(constants):
    removed = torch.tensor(constants)
    norm = ConstantAwareLayerNorm.convert(nn.LayerNorm(5), 8, removed)
    full = nn.LayerNorm(8)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
        full.weight[:5], full.bias[:5] = norm.weight, norm.bias
    x = (torch.randn(4, 5) * 3 + 7).requires_grad_()
    expected = full(torch.cat([x, removed.expand(4, 3)], 1))[:, :5]
    with torch.no_grad():
        assert torch.allclose(norm(x), expected, atol=1e-5)  # the fused inference path
    actual = norm(x)  # the differentiable path
    assert torch.allclose(actual, expected, atol=1e-5)
    (gradient,) = torch.autograd.grad(actual.pow(3).sum(), x)
    (reference,) = torch.autograd.grad(expected.pow(3).sum(), x)
    assert torch.allclose(gradient, reference, atol=1e-4)


NORMS_WITH_CONSTANTS = {"layer norm": (ConstantAwareLayerNorm, nn.LayerNorm), "rms norm": (ConstantAwareRMSNorm, nn.RMSNorm)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kinds", NORMS_WITH_CONSTANTS.values(), ids=NORMS_WITH_CONSTANTS.keys())
def test_constant_aware_norms_in_half_precision_are_as_close_as_the_full_norm(kinds, dtype):
    """Statistics taken in float32 and rounded once, as torch's own norm kernels do: rounding each
    step in bfloat16 doubled the error, and a few layers made it ten times the masked model's."""
    aware, plain = kinds
    full = plain(16)
    with torch.no_grad():
        full.weight.uniform_(0.5, 1.5)
        if getattr(full, "bias", None) is not None:
            full.bias.uniform_(-1, 1)
    kept = torch.arange(16) % 2 == 0
    small = aware.convert(copy.deepcopy(full), 16, torch.zeros(8))  # the removed channels are zeros
    with torch.no_grad():
        small.weight = nn.Parameter(full.weight[kept].clone())
        if getattr(full, "bias", None) is not None:
            small.bias = nn.Parameter(full.bias[kept].clone())
        small.normalized_shape = (8,)
        x = torch.randn(2000, 16) * 2 + 0.5
        x[:, ~kept] = 0
        truth = full(x)[:, kept]
        error_full = (copy.deepcopy(full).to(dtype)(x.to(dtype)).float()[:, kept] - truth).abs().max()
        error_aware = (small.to(dtype)(x[:, kept].to(dtype)).float() - truth).abs().max()
    assert error_aware <= error_full * 1.25, f"{error_aware:.4f} against the full norm's {error_full:.4f}"


class RelativePositionsByGather(nn.Module):
    """DeBERTa-v2's way: per-head scores against position keys (tiled over the batch with ``repeat``),
    the relative position of each pair picked with a ``gather`` whose index is expanded to every row."""

    def __init__(self, heads: int = 4, dim: int = 32):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.positions = nn.Parameter(torch.randn(6, dim))

    def split(self, x):  # (B, T, E) -> (B * heads, T, E / heads)
        x = x.view(*x.shape[:-1], self.heads, -1)
        return x.permute(0, 2, 1, 3).contiguous().view(-1, x.size(1), x.size(-1))

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        keys = self.split(self.k(self.positions.unsqueeze(0))).repeat(b, 1, 1)
        relative = torch.clamp(torch.arange(t)[:, None] - torch.arange(t)[None, :] + 3, 0, 5)
        scores = torch.bmm(q, k.transpose(1, 2)) + torch.gather(
            torch.bmm(q, keys.transpose(1, 2)), -1, relative.unsqueeze(0).expand(q.size(0), t, t))
        out = torch.bmm(scores.softmax(-1), v).view(b, self.heads, t, -1).permute(0, 2, 1, 3).reshape(b, t, -1)
        return self.o(out)


def test_heads_go_through_a_gather_of_relative_positions():
    model = nn.Sequential(RelativePositionsByGather()).eval()
    heads = torch.tensor([True, False, True, False]).repeat_interleave(8)
    masks = {f"0.{name}": {"weight": rows(heads, (32, 32)), "bias": heads} for name in ("q", "k", "v")}
    masks["0.o"] = {"weight": heads[None, :].expand(32, 32)}
    report = check_speedup(model, masks, torch.randn(2, 5, 32), torch.randn(3, 6, 32),
                           shrunk=["0.q.weight", "0.k.weight", "0.v.weight", "0.o.weight"])
    assert not report.barriers and model[0].q.out_features == 16


class ComplexRotary(nn.Module):
    """Rotary embedding written with complex numbers (DeepSeek-V2, Llama 4): a complex buffer broadcast."""

    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Linear(8, 8), nn.Linear(8, 4)
        self.register_buffer("angles", torch.arange(4.0), persistent=False)

    def forward(self, x):
        pairs = torch.view_as_complex(self.inp(x).reshape(*x.shape[:-1], -1, 2))
        freqs = torch.polar(torch.ones_like(self.angles), self.angles)
        return self.out(torch.view_as_real(pairs * freqs).flatten(-2))


def test_pairs_viewed_as_complex_numbers_go_whole():
    """The last two pairs are read by nothing: they go from the input projection through the complex
    view, the product with the complex buffer and back. A complex constant has no real value to
    propagate: the analysis goes on without it (it raised "min_all not implemented for ComplexFloat")."""
    model = ComplexRotary().eval()
    masks = {"out": {"weight": torch.cat([torch.ones(4, 4), torch.zeros(4, 4)], 1)}}
    report = check_speedup(model, masks, torch.randn(2, 5, 8), torch.randn(3, 4, 8), shrunk=["inp.weight", "out.weight"])
    assert not report.barriers and model.inp.out_features == 4


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(E, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x, y):
        return self.out(torch.relu(self.fc(x))) + self.out(torch.relu(self.fc(y)))


def test_module_called_twice_is_pruned_consistently_for_both_calls():
    model = Shared()
    keep = keep_mask(16)
    masks = {"fc": {"weight": rows(keep, (16, E)), "bias": keep}}
    check_speedup(model, masks, (torch.randn(2, E), torch.randn(2, E)), (torch.randn(5, E), torch.randn(5, E)),
                  shrunk=["fc.weight", "out.weight"])


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(40, E)
        self.body = nn.Linear(E, E)
        self.head = nn.Linear(E, 40, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.body(self.embed(ids))))


def test_tied_embedding_and_head_stay_tied():
    model = Tied()
    hidden = keep_mask(E)
    masks = {"embed": {"weight": hidden[None, :].expand(40, E)}, "body": {"weight": rows(hidden, (E, E)), "bias": hidden}}
    check_speedup(model, masks, torch.randint(0, 40, (2, 5)), torch.randint(0, 40, (3, 7)), shrunk=["embed.weight"])
    assert model.head.weight is model.embed.weight


class SharedEmbeddingUnderTwoNames(nn.Module):
    """Like T5: the model holds ``shared``; the encoder holds another Embedding with the same weight and calls it."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Embedding(40, E)
        self.encoder = nn.ModuleDict({"embed": nn.Embedding(40, E), "body": nn.Linear(E, 6)})
        self.encoder["embed"].weight = self.shared.weight

    def forward(self, ids):
        return self.encoder["body"](self.encoder["embed"](ids))


def test_an_embedding_tied_under_another_name_shrinks_with_the_one_called():
    model = SharedEmbeddingUnderTwoNames()
    hidden = keep_mask(E)
    masks = {"shared": {"weight": hidden[None, :].expand(40, E)}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # both embeddings ran, in effect: no "did not run" warning
        check_speedup(model, masks, torch.randint(0, 40, (2, 5)), torch.randint(0, 40, (3, 7)),
                      shrunk=["shared.weight", "encoder.body.weight"])
    assert model.shared.weight is model.encoder["embed"].weight
    assert model.shared is not model.encoder["embed"] and model.shared.embedding_dim == int(hidden.sum())


@pytest.mark.parametrize("masked", ["table columns", "consumer columns"])
def test_an_embedding_with_max_norm_loses_only_the_columns_it_holds_zero(masked):
    """It renormalises each row it looks up by the row's norm over every column: a column the consumer
    does not read still counts (it went, and rows the dummy did not look up were off by 0.19)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(30, 16, max_norm=1.0), nn.Linear(16, 4))
    keep = keep_mask(16)
    masks = ({"0": {"weight": keep[None, :].expand(30, 16)}} if masked == "table columns"
             else {"1": {"weight": keep[None, :].expand(4, 16)}})
    check_speedup(model, masks, torch.arange(10).view(2, 5), torch.arange(10, 30).view(4, 5),
                  shrunk=["0.weight"] if masked == "table columns" else [])
    assert model[0].embedding_dim == (8 if masked == "table columns" else 16)


class Bags(nn.Module):
    """A recommendation model's sparse features: bags of ids (offsets mark where each bag starts)."""

    def __init__(self, mode: str, max_norm):
        super().__init__()
        self.bag, self.mlp = nn.EmbeddingBag(30, 8, mode=mode, max_norm=max_norm), nn.Linear(8, 4)

    def forward(self, ids, offsets):
        return self.mlp(self.bag(ids, offsets))


@pytest.mark.parametrize("max_norm", [None, 1.0], ids=["plain", "max_norm"])
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_an_embedding_bag_loses_its_zero_columns(mode, max_norm):
    """It was traced through, and its columns never went (with ``max_norm``, a barrier). Empty bags
    included: they give zeros."""
    torch.manual_seed(0)
    model = Bags(mode, max_norm)
    keep = keep_mask(8)
    dummy = (torch.randint(0, 30, (10,)), torch.tensor([0, 3, 3, 7]))
    fresh = (torch.randint(0, 30, (12,)), torch.tensor([0, 5, 6, 6]))
    check_speedup(model, {"bag": {"weight": keep[None, :].expand(30, 8)}}, dummy, fresh,
                  shrunk=["bag.weight", "mlp.weight"])
    assert model.bag.embedding_dim == 4 and model.mlp.in_features == 4


@pytest.mark.parametrize("same", [True, False], ids=["same masks", "different masks"])
def test_masks_naming_one_tied_tensor_under_several_names_all_apply(same):
    """The weight is one tensor: the masked model multiplies it by every mask given for it, whatever
    name each mask uses; different masks are said to be combined."""
    model = SharedEmbeddingUnderTwoNames()
    first = keep_mask(E, generator=torch.Generator().manual_seed(1))
    second = first if same else keep_mask(E, generator=torch.Generator().manual_seed(2))
    masks = {"shared": {"weight": first[None, :].expand(40, E)},
             "encoder.embed": {"weight": second[None, :].expand(40, E)}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_speedup(model, masks, torch.randint(0, 40, (2, 5)), torch.randint(0, 40, (3, 7)),
                      shrunk=["shared.weight", "encoder.body.weight"])
    assert model.shared.embedding_dim == int((first & second).sum())
    combined = [str(w.message) for w in caught if "tied" in str(w.message)]
    if same:
        assert not combined
    else:
        assert len(combined) == 1 and "'shared.weight', 'encoder.embed.weight'" in combined[0]


class ShapeControlFlow(nn.Module):
    """Python branches on tensor shapes: symbolic tracers cannot follow this; a real run can."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(E, 16)
        self.b = nn.Linear(16, 8)

    def forward(self, x):
        if x.shape[1] > 3:
            x = x[:, : x.shape[1] // 2 * 2].reshape(x.shape[0], -1, 2, E).mean(2)
        h = torch.relu(self.a(x))
        for _ in range(x.shape[1] // 2):
            h = h * 0.5
        return self.b(h)


def test_python_control_flow_on_shapes():
    model = ShapeControlFlow()
    masks = {"a": {"weight": rows(keep_mask(16), (16, E))}}
    check_speedup(model, masks, torch.randn(2, 6, E), torch.randn(3, 6, E), shrunk=["a.weight", "b.weight"])


class LoopsOverChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(E, 16)
        self.b = nn.Linear(16, 8)

    def forward(self, x):
        h = torch.relu(self.a(x))
        for _ in range(h.shape[-1] // 8):  # the channel count itself steers the computation
            h = h * 0.5
        return self.b(h)


def test_control_flow_on_a_prunable_size_is_kept_as_it_was():
    model = LoopsOverChannels()
    masks = {"a": {"weight": rows(keep_mask(16), (16, E))}}
    report = check_speedup(model, masks, torch.randn(2, 6, E), torch.randn(3, 5, E))
    assert report.kept_for_verification


class TinyEncoder(nn.Module):
    """Embedding, attention, FFN and first-token pooling: the residual stream crosses all of them."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(30, E)
        self.norm = nn.LayerNorm(E)
        self.attn = nn.MultiheadAttention(E, H, batch_first=True)
        self.fc = nn.Linear(E, 64)
        self.proj = nn.Linear(64, E)
        self.head = nn.Linear(E, 3)

    def forward(self, ids):
        x = self.norm(self.embed(ids))
        x = x + self.attn(x, x, x, need_weights=False)[0]
        x = x + self.proj(torch.relu(self.fc(x)))
        return self.head(x[:, 0])


def test_hidden_size_pruned_through_attention_and_first_token_pooling():
    model = TinyEncoder()
    hidden = keep_mask(E)
    masks = {"embed": {"weight": hidden[None, :].expand(30, E)}, "norm": {"weight": hidden, "bias": hidden},
             "attn": {"out_proj.weight": rows(hidden, (E, E)), "out_proj.bias": hidden},
             "proj": {"weight": rows(hidden, (E, 64)), "bias": hidden}}
    check_speedup(model, masks, torch.randint(0, 30, (2, 6)), torch.randint(0, 30, (3, 8)),
                  shrunk=["embed.weight", "attn.out_proj.weight", "fc.weight", "head.weight"])
    assert model.head.in_features == int(hidden.sum())
    assert model.attn.q_proj.in_features == int(hidden.sum())


def test_constant_inputs_of_attention_without_bias_become_a_bias():
    """Features masked in the layer before hold its bias; attention without biases folds them into new ones."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(8, E)
            self.attn = nn.MultiheadAttention(E, H, bias=False, batch_first=True)

        def forward(self, x):
            h = self.inp(x)
            return self.attn(h, h, h, need_weights=False)[0]

    model = Block()
    masks = {"inp": {"weight": rows(keep_mask(E), (E, 8))}}
    check_speedup(model, masks, torch.randn(2, 5, 8), torch.randn(3, 7, 8), shrunk=["inp.weight"])


class WidthFromInput(nn.Module):
    """XCiT's cross-covariance attention: the head size comes from the input's width (``c // heads``),
    while the projection it reshapes is free to keep its size."""

    def __init__(self, c=8, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(c, 2 * c)
        self.proj = nn.Linear(2 * c, c)

    def forward(self, x):
        b, c = x.shape
        y = self.qkv(x).reshape(b, 2, self.heads, c // self.heads)
        return x + self.proj(torch.relu(y).reshape(b, -1))


def test_a_size_taken_from_another_tensor_keeps_the_module_around_it_whole():
    model = nn.Sequential(nn.Linear(4, 8), WidthFromInput(), nn.Linear(8, 3))
    stream = torch.tensor([True, False] * 4)
    masks = {"0": {"weight": rows(stream, (8, 4)), "bias": stream},
             "1.proj": {"weight": rows(stream, (8, 16)), "bias": stream}}
    report = check_speedup(model, masks, torch.randn(2, 4), torch.randn(5, 4))
    assert model[1].qkv.in_features == 8
    assert any("everything in '1' kept" in line for line in report.kept_for_verification)


class HandWrittenRMSNorm(nn.Module):
    """What every Hugging Face family copies under its own name: the mean square in float32."""

    def __init__(self, width, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(width) + 0.5)
        self.variance_epsilon = eps

    def forward(self, x):
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x.float() * torch.rsqrt(variance + self.variance_epsilon)).to(x.dtype)


class OffsetRMSNorm(nn.Module):
    """Gemma's: scaled by ``1 + weight``, the epsilon in ``eps``."""

    def __init__(self, width, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(width) - 0.5)
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)


class CenteredNorm(HandWrittenRMSNorm):
    """Subtracts the mean first: a layer norm without shift, not an RMS norm."""

    def forward(self, x):
        x = x - x.mean(-1, keepdim=True)
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


class Stream(nn.Module):
    """A residual stream of width 16 read through a norm: its masked channels can go everywhere only
    where the norm is known to count them in its statistics."""

    def __init__(self, norm):
        super().__init__()
        self.embed, self.norm, self.up, self.down, self.head = (nn.Linear(6, 16), norm(16), nn.Linear(16, 32),
                                                               nn.Linear(32, 16), nn.Linear(16, 3))

    def forward(self, x):
        h = self.embed(x)
        h = h + self.down(torch.relu(self.up(self.norm(h))))
        return self.head(self.norm(h))


@pytest.mark.parametrize("norm", [HandWrittenRMSNorm, OffsetRMSNorm, CenteredNorm])
def test_rms_norms_written_by_hand_are_recognised_by_what_they_compute(norm):
    model = Stream(norm)
    keep = keep_mask(16)
    masks = {"embed": {"weight": rows(keep, (16, 6)), "bias": keep}, "down": {"weight": rows(keep, (16, 32)), "bias": keep}}
    recognised = norm is not CenteredNorm
    check_speedup(model, masks, torch.randn(4, 6), torch.randn(7, 6),
                  shrunk=["embed.weight", "down.weight", "head.weight", "norm.weight"] if recognised else [])
    assert type(model.norm) is norm  # the model's own class, its weight and epsilon rescaled
    assert model.embed.out_features == (8 if recognised else 16)


class FunctionalRMSNorm(nn.Module):
    """``F.rms_norm`` with its epsilon in the call, the scale called ``g``."""

    def __init__(self, width):
        super().__init__()
        self.g = nn.Parameter(torch.rand(width) + 0.5)

    def forward(self, x):
        return F.rms_norm(x, x.shape[-1:], self.g, 1e-6)


class GammaBetaLayerNorm(nn.Module):
    """x-transformers' layer norm: ``gamma`` learned, ``beta`` a buffer of zeros."""

    def __init__(self, width):
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(width) + 0.5)
        self.register_buffer("beta", torch.zeros(width))

    def forward(self, x):
        return F.layer_norm(x, x.shape[-1:], self.gamma, self.beta)


@pytest.mark.parametrize("norm", [FunctionalRMSNorm, GammaBetaLayerNorm])
@pytest.mark.parametrize("constants", ["zeros", "counted"])
def test_norms_written_with_their_own_names_and_epsilons_count_the_channels_they_lose(norm, constants):
    """Traced through, their mean over the stream kept it whole; with an epsilon in the code, the norm
    counting removed constants is torch's, with that epsilon. Counted: the removed channels hold the
    embedding's bias."""
    model = Stream(norm)
    keep = keep_mask(16)
    scale = next(name for name, _ in model.norm.named_parameters())
    masks = {"embed": {"weight": rows(keep, (16, 6))}, "down": {"weight": rows(keep, (16, 32)), "bias": keep},
             "norm": {scale: keep}}  # a layer norm's output is its shift where its scale is zero
    if constants == "zeros":
        masks["embed"]["bias"] = keep
    check_speedup(model, masks, torch.randn(4, 6), torch.randn(7, 6),
                  shrunk=["embed.weight", "down.weight", "head.weight"])
    assert model.embed.out_features == 8 and model.norm.weight.numel() == 8
    assert model.norm.eps == {FunctionalRMSNorm: 1e-6, GammaBetaLayerNorm: 1e-5}[norm]  # found on small probes


class NormBetweenLinears(nn.Module):
    def __init__(self, norm: Callable[[int], nn.Module]):
        super().__init__()
        self.a, self.norm, self.b = nn.Linear(6, 16), norm(16), nn.Linear(16, 5)

    def forward(self, x):
        return self.b(self.norm(self.a(x)))


NORMS = {"layer norm": nn.LayerNorm, "rms norm": nn.RMSNorm, "rms norm written by hand": HandWrittenRMSNorm}


@pytest.mark.parametrize("masked", ["norm weights", "consumer columns"])
@pytest.mark.parametrize("norm", NORMS.values(), ids=NORMS.keys())
def test_a_norm_passes_on_fewer_outputs_than_its_statistics_read(norm, masked):
    """Every input entry of a norm feeds its statistics, but an output entry whose scale is masked is a
    constant (its shift) the consumer folds, and one the consumer does not read is unused: the norm
    passes on only the others, and the consumer loses those columns."""
    torch.manual_seed(0)
    model = NormBetweenLinears(norm).eval()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
        if getattr(model.norm, "bias", None) is not None:
            model.norm.bias.uniform_(-1, 1)
    keep = keep_mask(16)
    masks = ({"norm": {"weight": keep}} if masked == "norm weights"
             else {"b": {"weight": keep[None, :].expand(5, 16)}})
    check_speedup(model, masks, torch.randn(2, 3, 6), torch.randn(4, 5, 6), shrunk=["b.weight"])
    assert model.a.out_features == 16 and model.b.in_features == 8
    assert isinstance(model.norm, GatheredNorm) and model.norm.gather.index.numel() == 8
    assert model.norm.weight is model.norm.norm.weight  # code around a norm reads its attributes
    again = {"b": {"weight": rows(keep_mask(5), (5, 8))}, "a": {"weight": rows(keep_mask(16), (16, 6))}}
    check_speedup(model, again, torch.randn(2, 3, 6), torch.randn(4, 5, 6), shrunk=["b.weight"])  # sped up again


def test_a_norm_output_kept_whole_keeps_the_input_entries_it_is_computed_from():
    """Half the inputs hold zeros the norm counts without reading, but the model returns the norm's
    output whole: each output entry is computed from its input entry, which stays."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16)).eval()
    keep = keep_mask(16)
    check_speedup(model, {"0": {"weight": rows(keep, (16, 6)), "bias": keep}}, torch.randn(2, 6), torch.randn(3, 6))
    assert model[0].out_features == 16


class GroupedExperts(nn.Module):
    """A mixture of experts as transformers runs it: tokens sorted by expert (a computed index), one
    ``_grouped_mm`` per projection over every expert's weight, and the routing undone."""

    def __init__(self, width=8, inner=16, experts=3):
        super().__init__()
        self.router = nn.Linear(width, experts, bias=False)
        self.up = nn.Parameter(torch.randn(experts, inner, width) / width**0.5)
        self.down = nn.Parameter(torch.randn(experts, width, inner) / inner**0.5)

    def forward(self, x):
        expert = self.router(x).argmax(-1)
        order = torch.argsort(expert)
        offsets = torch.cumsum(torch.bincount(expert, minlength=self.up.shape[0]), 0).to(torch.int32)
        hidden = torch.relu(torch._grouped_mm(x[order], self.up.transpose(-2, -1), offs=offsets))
        out = torch._grouped_mm(hidden, self.down.transpose(-2, -1), offs=offsets)
        return x + out[torch.argsort(order)]


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch without _grouped_mm")
def test_experts_in_a_grouped_matrix_product_lose_their_masked_channels():
    model = nn.Sequential(GroupedExperts())
    keep = keep_mask(16)
    masks = {"0": {"up": keep[None, :, None].expand(3, 16, 8)}}
    report = check_speedup(model, masks, torch.randn(10, 8), torch.randn(13, 8), shrunk=["0.up", "0.down"])
    assert model[0].up.shape == (3, 8, 8) and model[0].down.shape == (3, 8, 8)
    assert not report.barriers and not report.kept_for_verification

    # The CPU kernel wants strides of whole 16-byte units: 6 of 12 kept would not run, and stay.
    model = nn.Sequential(GroupedExperts(inner=12))
    keep = keep_mask(12)
    report = check_speedup(model, {"0": {"up": keep[None, :, None].expand(3, 12, 8)}}, torch.randn(10, 8),
                           torch.randn(13, 8))
    assert model[0].up.shape == (3, 12, 8) and report.kept_for_verification


def test_a_layer_norm_without_shift_written_out_counts_the_channels_it_loses():
    """Cohere's ``CohereLayerNorm``: the mean subtracted by hand, ``variance_epsilon``, no ``bias`` at all.
    Where its scale is masked with the stream, the channels go, and still count in its statistics."""
    model = Stream(CenteredNorm)
    keep = keep_mask(16)
    masks = {"embed": {"weight": rows(keep, (16, 6)), "bias": keep}, "down": {"weight": rows(keep, (16, 32)), "bias": keep},
             "norm": {"weight": keep}}
    check_speedup(model, masks, torch.randn(4, 6), torch.randn(7, 6), shrunk=["embed.weight", "norm.weight", "head.weight"])
    assert isinstance(model.norm, ConstantAwareLayerNorm) and model.norm.bias is None


class ScaledEmbedding(nn.Embedding):
    """BART's ``BartScaledWordEmbedding``: an ``nn.Embedding`` with a forward of its own, traced through."""

    def forward(self, ids):
        return super().forward(ids) * 2.0


class TiedThroughTracedModules(nn.Module):
    """The model holds ``shared``; the encoder holds another embedding module with the same weight and
    calls it (BART ties ``encoder.embed_tokens`` and ``decoder.embed_tokens`` to ``shared``)."""

    def __init__(self):
        super().__init__()
        self.shared, self.encoder_embed, self.head = ScaledEmbedding(20, 8), ScaledEmbedding(20, 8), nn.Linear(8, 3)
        self.encoder_embed.weight = self.shared.weight

    def forward(self, ids):
        return self.head(torch.relu(self.encoder_embed(ids)))


def test_a_weight_tied_between_modules_traced_through_stays_one_tensor():
    model = TiedThroughTracedModules()
    features = keep_mask(8)
    masks = {"shared": {"weight": features[None, :].expand(20, 8)}}
    ids = torch.arange(20).reshape(4, 5)
    check_speedup(model, masks, ids, ids.flip(1)[:, :3], shrunk=["shared.weight", "head.weight"])
    assert model.encoder_embed.weight is model.shared.weight and model.shared.weight.shape == (20, 4)


class LayerWeightListedAgain(nn.Module):
    """A layer's weight also held by a ``ParameterList`` the code reads it from (``F.linear``)."""

    def __init__(self):
        super().__init__()
        self.embed, self.layer, self.head = nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 3)
        self.listed = nn.ParameterList([self.layer.weight])

    def forward(self, x):
        h = torch.relu(self.layer(torch.relu(self.embed(x))))
        return self.head(torch.relu(F.linear(h, self.listed[0])))


def test_a_weight_a_rebuilt_layer_holds_and_the_code_reads_elsewhere_stays_one_tensor():
    """The list kept the full weight: verification kept the whole model (with ``verify=False``, the
    sped-up model raised on every input)."""
    torch.manual_seed(0)
    model = LayerWeightListedAgain().eval()
    keep = keep_mask(16)
    masks = {"embed": {"weight": rows(keep, (16, 6)), "bias": keep},
             "layer": {"weight": rows(keep, (16, 16)), "bias": keep}}
    check_speedup(model, masks, torch.randn(2, 6), torch.randn(5, 6),
                  shrunk=["embed.weight", "layer.weight", "head.weight"])
    assert model.listed[0] is model.layer.weight and model.layer.weight.shape == (8, 8)


@functools.lru_cache(maxsize=4)
def _relative_position_index(tokens: int) -> torch.Tensor:
    """BEiT's helper, cached: made on the first call only, written in place through a view."""
    coords = torch.arange(tokens)
    index = torch.zeros(tokens, tokens, dtype=torch.long)
    index[1:] = coords[1:, None] - coords[None, :]
    index[0] = -coords
    index += tokens - 1
    return index


class CachedBiasBlock(nn.Module):
    """BEiT's block: attention with a relative position bias indexed by a cached helper, its heads
    sized by stored attributes that the queries, keys and values all read, then an MLP."""

    def __init__(self, dim: int = 16, heads: int = 4, tokens: int = 8):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))
        self.table = nn.Parameter(torch.randn(2 * tokens - 1, heads))
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        bias = self.table[_relative_position_index(N)].permute(2, 0, 1)
        q, k, v = (f(x).view(B, N, self.heads, self.head_dim).transpose(1, 2) for f in (self.q, self.k, self.v))
        attention = (q @ k.transpose(-2, -1) / 2 + bias).softmax(-1)
        x = x + self.proj((attention @ v).transpose(1, 2).reshape(B, N, C))
        return x + self.fc2(F.gelu(self.fc1(x)))


def test_constants_a_cached_helper_makes_on_the_first_call_only_do_not_confuse_verification():
    """Queries and keys lose the first entry of every head, so the stored head size fits them and not
    the values, and verification keeps a view whole. It re-records the model, which now gets the
    index from the cache: the recorded calls that made it are passed over, and the blame falls on
    the view (not on the helper, which would keep the whole block)."""
    _relative_position_index.cache_clear()
    torch.manual_seed(0)
    model = CachedBiasBlock().eval()
    first_of_each_head = torch.arange(16) % 4 != 0
    masks = {name: {"weight": rows(first_of_each_head, (16, 16)), "bias": first_of_each_head} for name in ("q", "k")}
    masks.update(output_channel_masks(model, ["fc1"]))
    report = check_speedup(model, masks, torch.randn(2, 8, 16), torch.randn(3, 8, 16), shrunk=["fc1.weight", "fc2.weight"])
    assert report.kept_for_verification and all("aten.view" in r for r in report.kept_for_verification)


class SinusoidalPositions(nn.Module):
    """Transformer-XL's relative positions: ``sin`` and ``cos`` of positions counted from the input's
    length, projected and added to the token embeddings."""

    def __init__(self, dim: int = 16, vocabulary: int = 30):
        super().__init__()
        self.embed, self.positions = nn.Embedding(vocabulary, dim), nn.Linear(dim, dim)
        self.hidden, self.out = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, 4)
        self.register_buffer("inv_freq", 1 / (10000 ** (torch.arange(0.0, dim, 2.0) / dim)))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        angles = torch.outer(torch.arange(ids.shape[1] - 1, -1, -1.0), self.inv_freq)
        x = self.embed(ids) + self.positions(torch.cat([angles.sin(), angles.cos()], -1))
        return self.out(torch.relu(self.hidden(x)))


def test_values_counted_from_the_input_length_are_no_constants_on_a_dummy_of_one_token():
    """On one token every position is 0, whose sine is 0: the projection's sine inputs looked constant,
    and went (folded into its bias, with half of ``inv_freq``), unmasked; other lengths were off."""
    torch.manual_seed(0)
    model = SinusoidalPositions().eval()
    masks = output_channel_masks(model, ["hidden"])
    check_speedup(model, masks, torch.randint(0, 30, (2, 1)), torch.randint(0, 30, (3, 7)), shrunk=["hidden.weight"])
    assert model.positions.in_features == 16 and model.inv_freq.shape == (8,)


class AttentionOfRank(nn.Module):
    """Scaled dot-product attention on inputs of 3 (heads folded into the batch) or 5 dimensions,
    which torch runs on its math path, as several operators; ``scale`` given or not."""

    def __init__(self, rank: int, scale: bool, dim: int = 32, heads: int = 2):
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))
        self.rank, self.heads, self.scale = rank, heads, 0.25 if scale else None

    def forward(self, x):
        b, n, _ = x.shape

        def split(t):
            t = t.reshape(b, n, self.heads, -1).transpose(1, 2)
            return t.reshape(b * self.heads, n, -1) if self.rank == 3 else t.unsqueeze(2)

        out = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)), scale=self.scale)
        return self.out(out.reshape(b, self.heads, n, -1).transpose(1, 2).reshape(b, n, -1))


@pytest.mark.parametrize("rank", [3, 5])
@pytest.mark.parametrize("scale", [False, True])
def test_attention_on_its_math_path_keeps_its_scale(rank, scale):
    """The default scale is ``E ** -0.5``: features within heads of ``q`` and ``k`` may go only where
    the call gives its scale. Recorded as its operators, ``E ** -0.25`` multiplying both looked like a
    number of the code's, and the scale changed."""
    torch.manual_seed(0)
    model = AttentionOfRank(rank, scale).eval()
    keep = torch.arange(32) % 4 != 0
    masks = {name: {"weight": rows(keep, (32, 32)), "bias": keep} for name in ("q", "k")}
    report = check_speedup(model, masks, torch.randn(2, 6, 32), torch.randn(3, 7, 32),
                           shrunk=["q.weight", "k.weight"] if scale else [])
    assert not report.kept_for_verification
    assert model.q.out_features == (24 if scale else 32)


POOLINGS = {  # picks one token per sequence, by index tensors on batch and tokens
    "adjacent": lambda h, tokens: h[torch.arange(h.shape[0]), tokens.argmax(-1)],
    "apart": lambda h, tokens: h.permute(1, 2, 0)[tokens.argmax(-1), :, torch.arange(h.shape[0])],
}


class PooledEncoder(nn.Module):
    """Token embeddings plus a learned position table read up to the length (``pos[:T]``), a residual
    feed-forward block, and a pooling by index tensors (CLIP's end-of-text token)."""

    def __init__(self, pool):
        super().__init__()
        self.tokens, self.positions = nn.Embedding(20, E), nn.Parameter(torch.randn(12, E))
        self.up, self.down, self.head = nn.Linear(E, 64), nn.Linear(64, E), nn.Linear(E, 5)
        self.pool = pool

    def forward(self, tokens):
        h = self.tokens(tokens) + self.positions[: tokens.shape[1]]
        h = h + self.down(F.gelu(self.up(h)))
        return self.head(self.pool(h, tokens))


@pytest.mark.parametrize("pool", POOLINGS.values(), ids=POOLINGS.keys())
def test_pooling_by_index_tensors_passes_the_features_and_positions_beyond_the_dummy_stay(pool):
    """Several index tensors (batch and token) pick rows; the features pass through, so the stream
    shrinks (it was kept whole). The position table's rows past the dummy's length are not channels:
    ``consistent_masks`` masked half of them (the masked model broke on longer inputs) and the speedup
    kept them; they are neither masked nor removed now."""
    torch.manual_seed(0)
    model = PooledEncoder(pool).eval()
    dummy = torch.randint(0, 20, (2, 6))
    masks = consistent_masks(model, dummy, sparsity=0.5, seed=0)
    assert bool(masks[""]["positions"].any(1).all())  # no whole position row masked
    report = check_speedup(model, masks, dummy, torch.randint(0, 20, (3, 11)),
                           shrunk=["tokens.weight", "positions", "up.weight"], max_param_ratio=0.45)
    assert model.positions.shape == (12, E // 2) and not report.masked_but_kept


class MergedImageTokens(nn.Module):
    """LLaVA's merge of projected image features into the token embeddings at the image tokens."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.embed, self.projector = nn.Embedding(20, 16), nn.Linear(8, 16)
        self.fc, self.head = nn.Linear(16, 32), nn.Linear(32, 20)

    def forward(self, features, ids):
        tokens, images = self.embed(ids), self.projector(features)
        is_image = ids == 19
        if self.how == "masked_scatter":
            tokens = tokens.masked_scatter(is_image.unsqueeze(-1).expand_as(tokens), images)
        elif self.how == "index_put":
            tokens = tokens.clone()
            tokens[is_image] = images.reshape(-1, images.shape[-1])
        else:  # a number written at the padding, integer rows written
            tokens = tokens.clone()
            tokens[ids == 0] = 0.0
            rows = torch.arange(ids.shape[0])[:, None].expand(-1, images.shape[1])
            tokens[rows, torch.arange(1, 1 + images.shape[1]).expand_as(rows)] = images
        return self.head(torch.relu(self.fc(tokens)))


def _image_tokens(batch: int, length: int) -> tuple:
    ids = torch.randint(0, 19, (batch, length))
    ids[:, 1:4] = 19
    return torch.randn(batch, 3, 8), ids


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("how", ["masked_scatter", "index_put", "scalar and integer rows"])
def test_features_written_into_selected_positions_pass_through(how, verify):
    """``masked_scatter`` and ``index_put`` were barriers: the hidden channels masked in the table, the
    projector and the next layer all stayed (1668 parameters; 1180 with the merge written with ``where``)."""
    torch.manual_seed(0)
    model = MergedImageTokens(how).eval()
    keep = torch.arange(16) % 2 == 0
    masks = {"embed": {"weight": keep[None, :].expand(20, 16)},
             "projector": {"weight": rows(keep, (16, 8)), "bias": keep},
             "fc": {"weight": keep[None, :].expand(32, 16)}}
    report = check_speedup(model, masks, _image_tokens(2, 8), _image_tokens(3, 11),
                           shrunk=["embed.weight", "projector.weight", "fc.weight"], verify=verify)
    assert model.fc.in_features == 8 and not report.barriers
