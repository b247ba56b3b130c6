"""Kinds of Hugging Face layers that repeat their sizes in attributes and in the model's config.

An attention layer stores its number of heads (``num_heads``, ``n_heads``, GPT-2's ``split_size``,
Llama's ``num_key_value_groups``) and reads it in ``forward``; the model's config states the same
sizes for every layer (``num_attention_heads``, ``intermediate_size``, ``hidden_size``), and code
outside the layers reads them too (key/value caches, rotary embeddings, ``generate``). Once the
speedup has shrunk a layer's projections, both must follow.

A :class:`LayerKind` reads a layer's sizes off its parts' shapes, never off the stale attributes,
and says which attributes and which config fields repeat them. Kinds are keyed by the qualified
names of the classes they describe, so nothing here imports transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Mapping, Optional, TypeVar

from torch import nn

Sizes = TypeVar("Sizes")


@dataclass(frozen=True)
class LayerKind(Generic[Sizes]):
    """How one kind of layer (several classes, one per model family that copies it) stores its sizes."""

    classes: tuple[str, ...]
    """Qualified names of the classes of this kind."""
    measure: Callable[[nn.Module], Sizes]
    """The layer's sizes, read off the shapes of its (already shrunk) parts."""
    attributes: Optional[Callable[[Sizes], dict[str, Any]]] = None
    """Attributes of the layer repeating its sizes (dotted for a part's attribute: ``"self.num_heads"``)."""
    config: Mapping[str, str] = field(default_factory=dict)
    """Config field -> the name of the size it repeats (``{"num_attention_heads": "heads"}``)."""
    recognise: Optional[Callable[[nn.Module], bool]] = None
    """For the classes not listed: whether a transformers module is laid out as this kind (the parts
    and attributes every family that copies the kind keeps under the same names)."""

    def size_attributes(self, layer: nn.Module) -> dict[str, Any]:
        return self.attributes(self.measure(layer)) if self.attributes is not None else {}

    def config_fields(self, layer: nn.Module) -> dict[str, Any]:
        sizes = self.measure(layer)
        return {name: getattr(sizes, size) for name, size in self.config.items()}


class LayerKinds:
    """Layer kinds by the qualified names of their classes."""

    def __init__(self, *kinds: LayerKind) -> None:
        self.kinds = kinds
        self._by_name = {name: kind for kind in kinds for name in kind.classes}

    def of(self, module: nn.Module) -> Optional[LayerKind]:
        """The kind of ``module``'s class or of its nearest described base class; else, for a module of
        transformers, the kind it is laid out as."""
        for base in type(module).__mro__:
            kind = self._by_name.get(f"{base.__module__}.{base.__qualname__}")
            if kind is not None:
                return kind
        return self.recognised(module)

    def recognised(self, module: nn.Module) -> Optional[LayerKind]:
        """The kind a transformers module of an unlisted class is laid out as, if any."""
        if not type(module).__module__.startswith("transformers."):
            return None
        return next((kind for kind in self.kinds if kind.recognise is not None and kind.recognise(module)), None)


def laid_out_as(parts: tuple[str, ...], sizes: tuple[str, ...]) -> Callable[[nn.Module], bool]:
    """A module holding these submodules (each with an output width) and these integer attributes."""

    def recognise(module: nn.Module) -> bool:
        held = module._modules
        return (all(name in held and hasattr(held[name], "out_features") for name in parts)
                and all(isinstance(module.__dict__.get(name), int) for name in sizes))

    return recognise


def output_width(layer: nn.Module) -> int:
    """Output features of a ``Linear`` (``out_features``) or of GPT-2's transposed ``Conv1D`` (``nf``)."""
    return layer.nf if hasattr(layer, "nf") else layer.out_features
