"""The config fields of a shrunk model: set where every layer agrees on the size they state.

``config.num_attention_heads`` is read outside the layers (caches, rotary embeddings, masks,
``generate``) and is what a model is rebuilt from. Where every layer of the model now has the same
number of heads (or intermediate width, hidden size, ...), the field is set to it; where layers
differ, it keeps its value and the layers' own attributes hold their sizes (saved and restored by
:mod:`speedup_transformers.persistence`).
"""

from __future__ import annotations

from typing import Any, Iterator

from torch import nn

from .attention import ATTENTION
from .embeddings import EMBEDDINGS
from .feed_forward import FEED_FORWARD
from .layer_kinds import LayerKinds
from .moe import ROUTERS

KINDS = LayerKinds(*ATTENTION, *FEED_FORWARD, *EMBEDDINGS, *ROUTERS)


def agreed_config_fields(model: nn.Module) -> dict[str, Any]:
    """``{"config.field": size}`` for every config field on which all described layers of ``model`` agree."""
    seen: dict[str, set] = {}
    for layer in _layers_of(model):
        kind = KINDS.of(layer)
        if kind is not None:
            for name, value in kind.config_fields(layer).items():
                seen.setdefault(name, set()).add(value)
    return {f"config.{name}": values.pop() for name, values in seen.items() if len(values) == 1}


def recognised_size_attributes(module: nn.Module) -> dict[str, Any]:
    """The size attributes of a transformers layer of an unlisted class laid out as a listed kind."""
    kind = KINDS.recognised(module)
    return kind.size_attributes(module) if kind is not None and kind.attributes is not None else {}


def _layers_of(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` and its parts, without the parts of another model it holds.

    A part holding a config of another class (a vision tower in a multimodal model) has sizes its
    own config states, not this one's; the speedup updates that config when it reaches that part.
    """
    kind = type(getattr(model, "config", None))
    pending = [model]
    while pending:
        module = pending.pop()
        config = getattr(module, "config", None)
        if config is not None and type(config) is not kind:
            continue
        yield module
        pending.extend(module.children())
