"""Tensors of values counted out from numbers the code passes: ``arange``, ``linspace``, ``logspace``.

Their values follow those numbers, which code often reads from the input's shape (the positions
``torch.arange(x.shape[1])`` of a rotary or sinusoidal embedding), so they are no constants: taken for
constants, the dummy input's length decided them. On a dummy of one token every position was 0, whose
``sin`` is 0, and the channels it fed looked constant: Transformer-XL's position network lost half its
inputs, and a rotary key cache returned zeros. The analysis takes none of their values, nor of what is
computed from them, for constants (they stay constants of the recording otherwise: a helper cached
after its first call makes them once).

Their dimensions keep their sizes (no rule shrinks a count written in the code).
"""

from __future__ import annotations

from ..rule import OpRule


class CountedOut(OpRule):
    """``arange`` / ``linspace`` / ``logspace``: no tensor operand; their values are no constants."""

    varies_with_input_sizes = True


def register(registry) -> None:
    registry.add_ops(["aten.arange", "aten.linspace", "aten.logspace"], CountedOut())
