"""The module this plugin teaches speedup: a linear layer with a learnable scale per output feature."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ScaledLinear(nn.Module):
    """``y = (x @ weight.T + bias) * scale`` over the last dimension of ``x``.

    Deliberately *not* a subclass of :class:`torch.nn.Linear`: core's ``LinearRule`` claims
    subclasses of ``nn.Linear``, and the point of this layer is to be a type only a plugin knows.

    :param in_features: size of the last dimension of the input.
    :param out_features: size of the last dimension of the output.
    :param bias: whether the layer has an additive bias (applied before the scale).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features))
        else:
            self.register_parameter("bias", None)
        self.scale = nn.Parameter(torch.ones(out_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)
        nn.init.ones_(self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) * self.scale

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
