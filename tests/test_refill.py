"""A module kept whole does not keep the residual stream whole: its inputs are refilled.

The attention below reads the stream's width from its input (``B, N, C = x.shape``) and reshapes its
own projections with it, as many vision transformers do. Once the stream loses channels that no
longer fits, so verification keeps the attention whole; the stream still shrinks everywhere else,
the attention getting back the channels it lost (non-zero constants here: biases) before it runs.
A module kept whole by its rule, not by verification, is refilled too (a Conv1d along the channels).
"""

import pickle
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from speedup.groups import consistent_masks
from speedup.refill import CutOutputs, RefillInputs
from support.checks import check_speedup, keep_mask, randomize_norms, rows
from test_deployment import DEPLOYED


class ShapeReadingAttention(nn.Module):
    def __init__(self, dim: int, heads: int, in_place: bool = False, pair: bool = False,
                 shared: Optional[nn.Module] = None):
        super().__init__()
        self.heads, self.in_place, self.pair = heads, in_place, pair
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.mix = shared  # a module every block holds (as CoaT's convolutional position encoding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        if self.in_place:
            x.mul_(0.5)  # the caller's tensor changes too
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.mix is not None:
            v = v + self.mix(v)
        out = F.scaled_dot_product_attention(q, k, v)
        out = self.proj(out.transpose(1, 2).reshape(B, N, C))
        return (out, {"input": x}) if self.pair else out


class Block(nn.Module):
    """``pair``: the attention is called with a keyword and returns its output and a dict holding its
    (refilled) input, which the block adds too."""

    def __init__(self, dim: int, heads: int, in_place: bool = False, pair: bool = False,
                 shared: Optional[nn.Module] = None):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = ShapeReadingAttention(dim, heads, in_place, pair, shared)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.in_place, self.pair = in_place, pair

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = self.norm1(x)
        if self.pair:
            out, extra = self.attn(x=normed)
            x = x + out + extra["input"]
        else:
            x = x + self.attn(normed)
        if self.in_place:
            x = x + normed  # as the attention left it
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class Net(nn.Module):
    """``shared``: the attentions hold one module, registered first in the model (its operators are
    recorded under its own name, not the attention's)."""

    def __init__(self, dim: int = 16, heads: int = 4, depth: int = 2, in_place: bool = False, pair: bool = False,
                 shared: bool = False):
        super().__init__()
        self.mix = nn.Linear(dim // heads, dim // heads) if shared else None
        self.embed = nn.Linear(6, dim)
        self.blocks = nn.Sequential(*[Block(dim, heads, in_place, pair, self.mix) for _ in range(depth)])
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(x)).mean(1))


def _stream_masks(model: Net, seed: int = 0) -> dict:
    """Half the stream's channels, masked in every layer writing to it (their biases kept: the
    removed channels hold non-zero constants) and in the norms reading it, and half of each block's
    hidden features."""
    generator = torch.Generator().manual_seed(seed)
    dim = model.embed.out_features
    stream = keep_mask(dim, 0.5, generator)
    masks = {"embed": {"weight": rows(stream, (dim, 6))}}
    for i, block in enumerate(model.blocks):
        masks[f"blocks.{i}.attn.proj"] = {"weight": rows(stream, (dim, dim))}
        masks[f"blocks.{i}.fc2"] = {"weight": rows(stream, (dim, 2 * dim))}
        for norm in ("norm1", "norm2"):
            masks[f"blocks.{i}.{norm}"] = {"weight": stream, "bias": stream}
        hidden = keep_mask(2 * dim, 0.5, generator)
        masks[f"blocks.{i}.fc1"] = {"weight": rows(hidden, (2 * dim, dim)), "bias": hidden}
    return masks


def _model(**options) -> Net:
    torch.manual_seed(0)
    return randomize_norms(Net(**options)).eval()


def _check(model: Net, **expected):
    return check_speedup(model, _stream_masks(model), torch.randn(1, 5, 6), torch.randn(3, 7, 6), **expected)


@pytest.mark.parametrize("variant", [{}, {"pair": True}, {"shared": True}],
                         ids=["tensor", "keyword-and-dict", "shared"])
def test_an_attention_kept_whole_gets_its_input_refilled_and_the_stream_shrinks_around_it(variant):
    model = _model(**variant)
    report = _check(model, shrunk=["embed.weight", "blocks.0.fc1.weight", "blocks.1.fc2.weight", "head.weight"])
    assert model.embed.out_features == 8 and model.head.in_features == 8
    for block in model.blocks:
        assert block.attn.qkv.in_features == 16 and block.attn.proj.out_features == 16  # kept whole
        assert block.fc1.weight.shape == (16, 8) and block.fc2.weight.shape == (8, 16)
        assert block.norm2.normalized_shape == (8,)
    assert sorted(report.refilled) == ["blocks.0.attn", "blocks.1.attn"]


@pytest.mark.filterwarnings("ignore:`torch.jit.trace.*` is deprecated")
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the hooks' shape checks hold for the traced shape
def test_a_sped_up_model_with_refilled_modules_deploys():
    """Saved whole, copied, pickled, traced, exported, compiled: each computes what it computes."""
    model = _model()
    _check(model)
    hooks = list(model.blocks[0].attn._forward_pre_hooks.values()) + list(model.blocks[0].attn._forward_hooks.values())
    assert {type(h) for h in hooks} == {RefillInputs, CutOutputs}
    x = torch.randn(2, 4, 6)
    deployed = {**DEPLOYED, "pickled": lambda m: pickle.loads(pickle.dumps(m)),
                "jit.trace": lambda m: torch.jit.trace(m, x), "export": lambda m: torch.export.export(m, (x,)).module()}
    with torch.no_grad():
        expected = model(x)
        for name, deploy in deployed.items():
            torch.testing.assert_close(deploy(model)(x), expected, rtol=1e-6, atol=1e-6, msg=name)


def test_a_module_whose_write_to_its_input_the_caller_reads_is_not_refilled_and_keeps_the_stream_whole():
    model = _model(in_place=True)
    report = _check(model, shrunk=["blocks.0.fc1.weight"])
    assert report.kept_for_verification and not report.refilled
    assert model.embed.out_features == 16 and not model.blocks[0].attn._forward_pre_hooks


def test_where_outputs_differ_and_no_call_is_to_blame_the_last_refill_is_undone(monkeypatch):
    """The safety net: the inputs of the module are then kept whole, as without refills."""
    import speedup.engine as engine

    verify, forced = engine._verify, []

    def failing_once_refilled(model, *rest, **options):
        if not forced and model.blocks[0].attn._forward_pre_hooks:
            forced.append(True)
            return engine._Check(False, None, "forced difference")
        return verify(model, *rest, **options)

    monkeypatch.setattr(engine, "_verify", failing_once_refilled)
    model = _model()
    report = _check(model, shrunk=["blocks.0.fc1.weight"])
    assert forced and [reason for reason in report.kept_for_verification if "no longer refilled" in reason]
    undone = report.kept_for_verification[-1].split("'")[1]  # the two attentions were refilled at once
    assert sorted(report.refilled + [undone]) == ["blocks.0.attn", "blocks.1.attn"]
    assert not dict(model.named_modules())[undone]._forward_pre_hooks


class ChannelAttention(nn.Module):
    """Efficient channel attention: a Conv1d run along the channels of the pooled input gates them."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 1, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.mean((2, 3)).unsqueeze(1)  # (N, 1, C)
        return x * self.conv(pooled).sigmoid().transpose(1, 2).unsqueeze(-1)


class GatedResidualNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.branch = nn.Sequential(nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1),
                                    nn.BatchNorm2d(16), ChannelAttention())
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.branch(x))
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("gate_mask", [False, True], ids=["gate unmasked", "gate masked with ones"])
def test_a_convolution_along_the_channels_is_refilled_and_no_longer_keeps_the_channels_of_the_network(gate_mask):
    """Also where the gate's conv has a mask keeping everything, as a per-layer pruner gives every layer."""
    torch.manual_seed(0)
    model = randomize_norms(GatedResidualNet()).eval()
    dummy = torch.randn(1, 3, 8, 8)
    masks = consistent_masks(model, dummy, sparsity=0.5)
    assert "stem.0" in masks and "branch.5.conv" not in masks  # the stream is offered, the gate's conv is not
    if gate_mask:
        masks["branch.5.conv"] = {"weight": torch.ones(1, 1, 3)}
    report = check_speedup(model, masks, dummy, torch.randn(2, 3, 11, 9), shrunk=["stem.0.weight", "head.weight"])
    assert report.refilled == ["branch.5.conv"]
    assert model.stem[0].out_channels == 8 and model.branch[3].out_channels == 8
    assert model.branch[5].conv.weight.shape == (1, 1, 3)


class PlainLayerNorm(nn.Module):
    """OLMo's norm: ``F.layer_norm`` without weight or bias, in a module holding no parameters."""

    def __init__(self, dim: int):
        super().__init__()
        self.normalized_shape = (dim,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, None, None, eps=1e-5)


class PlainNormNet(nn.Module):
    """A pre-norm residual stream whose norms hold no parameters: a removed stream channel is zero,
    but normalised it is not, so only the readers of each norm can stop reading it."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.embed = nn.Linear(6, dim)
        self.blocks = nn.ModuleList(nn.ModuleDict({"norm": PlainLayerNorm(dim), "fc1": nn.Linear(dim, 2 * dim),
                                                   "fc2": nn.Linear(2 * dim, dim)}) for _ in range(2))
        self.norm = PlainLayerNorm(dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = x + block["fc2"](F.gelu(block["fc1"](block["norm"](x))))
        return self.head(self.norm(x))


def test_a_norm_without_parameters_is_refilled_and_no_longer_keeps_the_stream_whole():
    torch.manual_seed(0)
    model = PlainNormNet().eval()
    dummy = torch.randn(1, 5, 6)
    masks = consistent_masks(model, dummy, sparsity=0.5)
    assert masks["embed"]["weight"].float().mean() == 0.5  # the stream is offered
    report = check_speedup(model, masks, dummy, torch.randn(3, 7, 6),
                           shrunk=["embed.weight", "blocks.0.fc1.weight", "blocks.1.fc2.weight", "head.weight"])
    assert sorted(report.refilled) == ["blocks.0.norm", "blocks.1.norm", "norm"]
    assert model.embed.out_features == 8 and model.blocks[0].fc1.weight.shape == (16, 8)
    assert model.blocks[1].norm.normalized_shape == (16,)  # it runs whole, its input refilled
