"""Random models, for checking the engine on graphs nobody wrote by hand.

An :class:`ImageProgram` is a random sequence of steps over ``(N, C, H, W)`` tensors, each reading
one earlier tensor (sometimes two): convolutions of every kind, norms, activations, residual adds,
concatenations, channel splits and shuffles, gates, slices, pooling, resizing, padding, attention
over positions, a module called twice. A :class:`TokenProgram` is a random stack of transformer
blocks over ``(N, L, D)``: hand-written and torch attention, MLPs, SwiGLU, norms, depthwise
convolutions over tokens, with or without residual links. Both end in a classifier ``head``.

Random programs found two crashes that no model of the zoos had shown (a transposed convolution
keeping an output nothing reads, a group norm with one channel per group).
"""

from __future__ import annotations

import random
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn


class ImageProgram(nn.Module):
    """A random program over images; ``steps[i] = (kind, module index, input indices, extra)``."""

    def __init__(self, rng: random.Random, channels: int = 8, size: int = 16):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.mods = nn.ModuleList()
        self.steps: list[tuple[str, Optional[int], list[int], object]] = []
        self.shapes = [(channels, size)]  # (channels, spatial size) of every tensor made so far
        for _ in range(rng.randint(3, 12)):
            source = rng.randrange(len(self.shapes)) if rng.random() < 0.3 else len(self.shapes) - 1
            _IMAGE_STEPS[rng.choice(sorted(_IMAGE_STEPS))](self, rng, source)
        self.head = nn.Linear(self.shapes[-1][0], 5)

    def add(self, kind: str, sources: list[int], shape: tuple, module: Optional[nn.Module] = None,
            extra: object = None) -> None:
        index = None
        if module is not None:
            self.mods.append(module)
            index = len(self.mods) - 1
        self.steps.append((kind, index, sources, extra))
        self.shapes.append(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = [self.stem(x)]
        for kind, index, sources, extra in self.steps:
            module = self.mods[index] if index is not None else None
            xs.append(_IMAGE_APPLY[kind](self, [xs[i] for i in sources], module, extra))
        return self.head(xs[-1].mean((2, 3)))


def _conv(program, rng, i):
    c, s = program.shapes[i]
    k, out = rng.choice([1, 3]), rng.choice([4, 6, 8, 12, 16])
    stride = 2 if s >= 4 and rng.random() < 0.3 else 1
    conv = nn.Conv2d(c, out, k, stride=stride, padding=k // 2, bias=rng.random() < 0.5)
    program.add("module", [i], (out, (s + stride - 1) // stride), conv)


def _other_conv(program, rng, i):
    c, s = program.shapes[i]
    choices = {
        "depthwise": lambda: (nn.Conv2d(c, c, 3, padding=1, groups=c, bias=rng.random() < 0.5), (c, s)),
        "dilated": lambda: (nn.Conv2d(c, c, 3, padding=2, dilation=2), (c, s)),
        "padding mode": lambda: (nn.Conv2d(c, 8, 3, padding=1, padding_mode=rng.choice(["reflect", "replicate", "circular"])), (8, s)),
        "transposed": lambda: (nn.ConvTranspose2d(c, rng.choice([4, 8]), 2, stride=2), None),
    }
    if c % 2 == 0:
        choices["grouped"] = lambda: (nn.Conv2d(c, rng.choice([4, 8, 12]), 3, padding=1, groups=2), None)
    module, shape = choices[rng.choice(sorted(choices))]()
    if isinstance(module, nn.ConvTranspose2d):
        if s > 16:
            return
        shape = (module.out_channels, 2 * s)
    program.add("module", [i], shape or (module.out_channels, s), module)


def _shared(program, rng, i):
    """A convolution of an earlier step called again (shared weights)."""
    c, s = program.shapes[i]
    convs = [index for kind, index, _, _ in program.steps if kind == "module"
             and type(program.mods[index]) is nn.Conv2d and program.mods[index].in_channels == c
             and program.mods[index].stride == (1, 1) and program.mods[index].groups == 1]
    if convs:
        index = rng.choice(convs)
        program.steps.append(("module", index, [i], None))
        program.shapes.append((program.mods[index].out_channels, s))


def _norm_or_activation(program, rng, i):
    c, s = program.shapes[i]
    module = rng.choice([
        nn.BatchNorm2d(c), nn.InstanceNorm2d(c, affine=rng.random() < 0.5), nn.PReLU(c),
        nn.GroupNorm(rng.choice([g for g in (1, 2, 4) if c % g == 0]), c),
        nn.ReLU(), nn.GELU(), nn.Sigmoid(), nn.Hardswish(), nn.SiLU(), nn.Tanh(), nn.LeakyReLU(0.1), nn.ReLU6(),
    ])
    program.add("module", [i], (c, s), module)


def _pool(program, rng, i):
    c, s = program.shapes[i]
    if s >= 4:
        program.add("module", [i], (c, s // 2),
                    rng.choice([nn.MaxPool2d(2), nn.AvgPool2d(2), nn.AvgPool2d(3, 2, 1, count_include_pad=False)]))


def _two_inputs(program, rng, i):
    c, s = program.shapes[i]
    same = [j for j, shape in enumerate(program.shapes) if shape == (c, s) and j != i]
    if same and rng.random() < 0.5:
        program.add("add", [i, rng.choice(same)], (c, s))
    else:
        j = rng.choice([j for j, shape in enumerate(program.shapes) if shape[1] == s])
        program.add("cat", [i, j], (c + program.shapes[j][0], s))


def _channel_moves(program, rng, i):
    c, s = program.shapes[i]
    kind = rng.choice(["swap halves", "sum halves", "shuffle", "slice", "strided slice"])
    if kind in ("swap halves", "sum halves", "shuffle") and c % 2:
        return
    if kind in ("slice", "strided slice") and c < 4:
        return
    shape = {"sum halves": (c // 2, s), "strided slice": ((c + 1) // 2, s)}.get(kind, (c, s))
    extra = rng.randint(1, c - 1) if kind == "slice" else None
    program.add(kind, [i], shape if kind != "slice" else (extra, s), extra=extra)


def _gates(program, rng, i):
    c, s = program.shapes[i]
    kind = rng.choice(["squeeze excite", "hard gate", "layer scale", "times constant"])
    if kind == "squeeze excite":
        r = max(1, c // 2)
        program.add(kind, [i], (c, s), nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, r, 1), nn.ReLU(),
                                                     nn.Conv2d(r, c, 1), nn.Sigmoid()))
    elif kind == "layer scale":
        name = f"gamma{len(program.steps)}"
        program.register_parameter(name, nn.Parameter(torch.rand(c, 1, 1) + 0.5))
        program.add(kind, [i], (c, s), extra=name)
    else:
        program.add(kind, [i], (c, s), extra=rng.choice([0.5, -2.0]))


def _spatial(program, rng, i):
    c, s = program.shapes[i]
    kind = rng.choice(["nearest", "bilinear", "pad", "centre", "in place"])
    if kind in ("nearest", "bilinear") and s > 16:
        return
    program.add(kind, [i], (c, {"nearest": 2 * s, "bilinear": 2 * s, "pad": s + 2}.get(kind, s)))


def _across_channels(program, rng, i):
    c, s = program.shapes[i]
    kind = rng.choice(["channel mean", "channel max", "channel softmax", "layer norm", "mlp"])
    if kind in ("channel mean", "channel max", "channel softmax"):
        program.add(kind, [i], (1 if kind != "channel softmax" else c, s))
    elif kind == "layer norm":
        program.add(kind, [i], (c, s), nn.LayerNorm(c))
    else:
        hidden = rng.choice([8, 16])
        program.add(kind, [i], (c, s), nn.Sequential(nn.Linear(c, hidden), nn.GELU(), nn.Linear(hidden, c)))


def _positions(program, rng, i):
    """Attention over positions, or a linear layer over the flattened map."""
    c, s = program.shapes[i]
    if c % 2 == 0 and s <= 8 and rng.random() < 0.5:
        program.add("attention", [i], (c, s), nn.MultiheadAttention(c, 2, batch_first=True))
    elif s <= 4:
        program.add("flat linear", [i], (c, s), nn.Linear(c * s * s, c * s * s))


_IMAGE_STEPS: dict[str, Callable] = {
    "conv": _conv, "conv again": _conv, "other conv": _other_conv, "shared": _shared, "norm": _norm_or_activation,
    "norm again": _norm_or_activation, "pool": _pool, "two inputs": _two_inputs, "channels": _channel_moves,
    "gates": _gates, "spatial": _spatial, "across channels": _across_channels, "positions": _positions,
}


def _attention(program, xs, module, extra):
    x = xs[0]
    n, c, h, w = x.shape
    tokens = x.flatten(2).transpose(1, 2)
    return (tokens + module(tokens, tokens, tokens, need_weights=False)[0]).transpose(1, 2).reshape(n, c, h, w)


def _in_place(program, xs, module, extra):
    y = xs[0].clone()
    y.mul_(2.0).add_(1.0)
    return F.relu(y, inplace=True)


def _halves(x):
    return x.chunk(2, 1)


_IMAGE_APPLY: dict[str, Callable] = {
    "module": lambda p, xs, m, e: m(xs[0]),
    "add": lambda p, xs, m, e: xs[0] + xs[1],
    "cat": lambda p, xs, m, e: torch.cat(xs, 1),
    "swap halves": lambda p, xs, m, e: torch.cat(_halves(xs[0])[::-1], 1),
    "sum halves": lambda p, xs, m, e: _halves(xs[0])[0] + _halves(xs[0])[1],
    "shuffle": lambda p, xs, m, e: xs[0].view(xs[0].shape[0], 2, -1, *xs[0].shape[2:]).transpose(1, 2).reshape(xs[0].shape),
    "slice": lambda p, xs, m, e: xs[0][:, :e],
    "strided slice": lambda p, xs, m, e: xs[0][:, ::2],
    "squeeze excite": lambda p, xs, m, e: xs[0] * m(xs[0]),
    "hard gate": lambda p, xs, m, e: xs[0] * F.hardsigmoid(xs[0].mean((2, 3), keepdim=True)),
    "layer scale": lambda p, xs, m, e: xs[0] * getattr(p, e),
    "times constant": lambda p, xs, m, e: xs[0] * e,
    "nearest": lambda p, xs, m, e: F.interpolate(xs[0], scale_factor=2, mode="nearest"),
    "bilinear": lambda p, xs, m, e: F.interpolate(xs[0], scale_factor=2, mode="bilinear", align_corners=False),
    "pad": lambda p, xs, m, e: F.pad(xs[0], (1, 1, 1, 1)),
    "centre": lambda p, xs, m, e: xs[0] - xs[0].mean((2, 3), keepdim=True),
    "in place": _in_place,
    "channel mean": lambda p, xs, m, e: xs[0].mean(1, keepdim=True),
    "channel max": lambda p, xs, m, e: xs[0].amax(1, keepdim=True),
    "channel softmax": lambda p, xs, m, e: xs[0].softmax(1),
    "layer norm": lambda p, xs, m, e: m(xs[0].permute(0, 2, 3, 1)).permute(0, 3, 1, 2),
    "mlp": lambda p, xs, m, e: xs[0] + m(xs[0].permute(0, 2, 3, 1)).permute(0, 3, 1, 2),
    "attention": _attention,
    "flat linear": lambda p, xs, m, e: m(xs[0].flatten(1)).view(xs[0].shape),
}


class HandWrittenAttention(nn.Module):
    """Multi-head attention as timm writes it (head count and size are attributes)."""

    def __init__(self, dim: int, heads: int, fused: bool, fused_kernel: bool):
        super().__init__()
        self.heads, self.head_dim, self.fused, self.fused_kernel = heads, dim // heads, fused, fused_kernel
        if fused:
            self.qkv = nn.Linear(dim, 3 * dim)
        else:
            self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        if self.fused:
            q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = (p(x).view(b, n, self.heads, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        if self.fused_kernel:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = ((q @ k.transpose(-2, -1)) * self.head_dim ** -0.5).softmax(-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class TokenProgram(nn.Module):
    """A random stack of transformer blocks over token ids; ``blocks[i] = (pre-norm, body)``."""

    def __init__(self, rng: random.Random, dim: int = 16, vocabulary: int = 50):
        super().__init__()
        self.embed = nn.Embedding(vocabulary, dim)
        self.positions = nn.Parameter(torch.randn(1, 12, dim) * 0.1) if rng.random() < 0.5 else None
        self.cls = nn.Parameter(torch.randn(1, 1, dim)) if rng.random() < 0.3 else None
        self.blocks = nn.ModuleList()
        self.kinds: list[tuple[str, bool]] = []
        for _ in range(rng.randint(2, 7)):
            kind = rng.choice(sorted(_TOKEN_BODIES))
            norm = rng.choice([nn.LayerNorm(dim), nn.LayerNorm(dim), nn.RMSNorm(dim), nn.Identity()])
            self.blocks.append(nn.ModuleList([norm, _TOKEN_BODIES[kind](rng, dim)]))
            self.kinds.append((kind, rng.random() < 0.8))  # residual or not
        self.final = nn.LayerNorm(dim) if rng.random() < 0.6 else nn.Identity()
        self.pool = rng.choice(["cls", "mean", "last"])
        self.head = nn.Linear(dim, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        if self.positions is not None:
            x = x + self.positions[:, : x.shape[1]]
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1)
        for (kind, residual), (norm, body) in zip(self.kinds, self.blocks):
            h = norm(x)
            if kind == "torch attention":
                h = body(h, h, h, need_weights=False)[0]
            elif kind == "token conv":
                h = body(h.transpose(1, 2)).transpose(1, 2)
            else:
                h = body(h)
            x = x + h if residual else h
        x = self.final(x)
        x = x[:, 0] if self.pool == "cls" else x.mean(1) if self.pool == "mean" else x[:, -1]
        return self.head(x)


_TOKEN_BODIES: dict[str, Callable[[random.Random, int], nn.Module]] = {
    "attention": lambda rng, d: HandWrittenAttention(d, rng.choice([2, 4]), rng.random() < 0.5, rng.random() < 0.5),
    "torch attention": lambda rng, d: nn.MultiheadAttention(d, rng.choice([2, 4]), batch_first=True),
    "mlp": lambda rng, d: nn.Sequential(nn.Linear(d, 2 * d), rng.choice([nn.GELU(), nn.ReLU(), nn.SiLU()]),
                                        nn.Dropout(0.1), nn.Linear(2 * d, d)),
    "swiglu": lambda rng, d: SwiGLU(d, 2 * d),
    "norm": lambda rng, d: rng.choice([nn.LayerNorm(d), nn.RMSNorm(d)]),
    "token conv": lambda rng, d: nn.Conv1d(d, d, 3, padding=1, groups=rng.choice([1, d])),
    "linear": lambda rng, d: nn.Linear(d, d),
}


def random_output_masks(model: nn.Module, rng: random.Random, skip: str = "head") -> dict:
    """A random share (none to all but one) of the output channels of every conv / linear but ``skip``,
    the bias masked with them or left whole."""
    masks = {}
    for name, module in model.named_modules():
        if name == skip or not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d)):
            continue
        dim = 1 if isinstance(module, nn.ConvTranspose2d) else 0
        count = module.weight.shape[dim]
        keep = torch.ones(count, dtype=torch.bool)
        keep[rng.sample(range(count), rng.randint(0, count - 1))] = False
        shape = [1] * module.weight.dim()
        shape[dim] = count
        masks[name] = {"weight": keep.reshape(shape).expand_as(module.weight).float()}
        if module.bias is not None and rng.random() < 0.7:
            masks[name]["bias"] = keep.float()
    return masks


def varied_masks(model: nn.Module, rng: random.Random, skip: str = "head") -> dict:
    """Masks of every layout a pruner may give, a random one per layer with parameters (or none):
    single weights, input channels, rows times columns, the bias alone, and NNI's ``_input_0`` /
    ``_output_0`` targets on convolutions and linear layers."""
    masks = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if name == skip or not isinstance(weight, torch.Tensor):
            continue
        layer = isinstance(module, (nn.Conv2d, nn.Linear))
        style = rng.choice(["none", "none", "single weights", "columns", "rows and columns", "bias"]
                           + (["output", "input"] if layer else []))
        if style == "single weights":
            masks[name] = {"weight": (torch.rand(weight.shape) > 0.5).float()}
        elif style in ("columns", "rows and columns") and weight.dim() >= 2:
            columns = _line(torch.rand(weight.shape[1]) > 0.5, 1, weight.dim())
            lines = columns & _line(torch.rand(weight.shape[0]) > 0.5, 0, weight.dim()) if style != "columns" else columns
            masks[name] = {"weight": lines.expand_as(weight).float()}
        elif style == "bias" and getattr(module, "bias", None) is not None:
            masks[name] = {"bias": (torch.rand(module.bias.shape) > 0.5).float()}
        elif style in ("output", "input"):
            conv = isinstance(module, nn.Conv2d)
            count = {("output", True): "out_channels", ("input", True): "in_channels",
                     ("output", False): "out_features", ("input", False): "in_features"}[style, conv]
            count = getattr(module, count)
            keep = (torch.rand(count) > 0.5).float()
            masks[name] = {f"_{style}_0": keep.reshape(1, count, 1, 1) if weight.dim() == 4 else keep}
    return masks


def _line(keep: torch.Tensor, dim: int, ndim: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[dim] = -1
    return keep.reshape(shape)
