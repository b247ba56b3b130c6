"""Mixture-of-experts layers that reshape with a stored hidden size.

A router scores the tokens against one row per expert; the families listed here flatten the tokens
first with ``hidden_states.reshape(-1, self.hidden_dim)``, ``hidden_dim`` copied from the config.
Granite's blocks put the tokens back with ``view(bsz, length, self.input_size)``. Once hidden
channels have gone (the router's weight loses the same columns), those attributes must follow, or
the reshape would fold channels into tokens. The width is read off the router's weight.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .layer_kinds import LayerKind

_ROUTERS = {
    "mixtral": "MixtralTopKRouter",
    "qwen2_moe": "Qwen2MoeTopKRouter",
    "qwen3_moe": "Qwen3MoeTopKRouter",
    "qwen3_next": "Qwen3NextTopKRouter",
    "qwen3_5_moe": "Qwen3_5MoeTopKRouter",
    "qwen3_vl_moe": "Qwen3VLMoeTextTopKRouter",
    "olmoe": "OlmoeTopKRouter",
    "flex_olmo": "FlexOlmoTopKRouter",
    "minimax": "MiniMaxTopKRouter",
    "minimax_m2": "MiniMaxM2TopKRouter",
    "deepseek_v4": "DeepseekV4TopKRouter",
}


@dataclass(frozen=True)
class RouterSizes:
    hidden: int


def _measure(router: nn.Module) -> RouterSizes:
    return RouterSizes(router.weight.shape[-1])


_GRANITE_BLOCKS = {
    "granitemoe": "GraniteMoeMoE",
    "granitemoeshared": "GraniteMoeSharedMoE",
    "granitemoehybrid": "GraniteMoeHybridMoE",
}


def _names(classes: dict[str, str]) -> tuple[str, ...]:
    return tuple(f"transformers.models.{family}.modeling_{family}.{name}" for family, name in classes.items())


ROUTERS = (
    LayerKind(_names(_ROUTERS), _measure, lambda sizes: {"hidden_dim": sizes.hidden}),
    LayerKind(_names(_GRANITE_BLOCKS), lambda block: _measure(block.router), lambda sizes: {"input_size": sizes.hidden}),
)
