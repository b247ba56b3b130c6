"""Numbers the code computes from sizes that shrink: a scale that must not change.

Attention code scales its scores by a number it computes from a size it reads
(``math.sqrt(q.size(-1))``, ``q.shape[-1] ** -0.5``, DeBERTa's ``torch.sqrt(torch.tensor(q.size(-1),
dtype=torch.float) * 3)``). Python computes it, out of the recording's sight: where the size shrinks,
the sped-up model passes another number and computes something else, by little enough on random
weights (softmax over nearly equal scores) to pass for round-off on the dummy input. Shapes, sizes and
indices are integers and may shrink with the model; a scale or a fill value is the code's.

So the numbers a call passes (its float arguments, and the values of a floating-point tensor Python
made of a few numbers) are compared with those recorded, call by call, whenever one of them may come
from a size that shrinks: equal to such a size, its square root or their inverses, up to a small
integer factor. That cannot tell a number computed from a size from an equal one written in the
code; it only costs another recording where it takes one for the other.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Iterator, Optional

import torch

from .graph import Graph, Node, NodeKind, TensorValue
from .tracer import FEW_NUMBERS

_LIFTS = (torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default)

_FACTORS = (1, 2, 3, 4)
"""Small integer factors a size may be multiplied by before its square root is taken (DeBERTa: 3)."""

_SMALLEST_SIZE = 8
"""Sizes below this are passed over: 0.5 and 0.25 are everywhere in code (GELU), and 4 or 2 is the
size of many small dimensions."""


def numbers_passed(node: Node) -> list[float]:
    """The numbers a call computes with: its float arguments, the integers it takes for a tensor
    operand (``z.sum(-1) / z.shape[-1]`` divides by an integer the code read from a size) or fills a
    tensor with, and the values of a tensor Python made of a few numbers that it lifts
    (``torch.tensor(16.0)``, RAFT's ``torch.tensor(num_channels)``).
    Integers passed as sizes, dimensions or indices are not among them: they follow the plan."""
    numbers = [a for a in list(node.args) + list(node.kwargs.values()) if type(a) is float]
    numbers += [float(node.args[i]) for i in node.integer_operands()]
    if node.target in _LIFTS and node.args and isinstance(node.args[0], TensorValue):
        lifted = node.args[0].tensor
        if lifted is not None and lifted.dtype is not torch.bool and lifted.numel() <= FEW_NUMBERS:
            numbers += [float(n) for n in lifted.detach().cpu().reshape(-1).tolist()]
    return numbers


def changed_number(old: Node, new: Node) -> Optional[str]:
    """Why ``new`` departs in the numbers it passes (None if it does not). Numbers the model read out
    of its tensors differ by round-off: those calls are passed over."""
    if old.reads_input_numbers or new.reads_input_numbers:
        return None
    for before, after in zip(numbers_passed(old), numbers_passed(new)):
        if before != after and not (math.isnan(before) and math.isnan(after)):
            return f"the code passed {after:.6g} where {before:.6g} was recorded (computed from a size that shrank)"
    return None


def counterparts(original: list[Node], again: list[Node]) -> Iterator[tuple[Node, Node]]:
    """Each re-recorded operator call with its recorded counterpart: the call of the same operator
    from the same line of code, the first with the first, and so on. The outputs were equal: calls
    may still differ where that changes nothing (a ``contiguous()`` copying in one run is a no-op in
    the other), which this passes over."""
    recorded = dict(_numbered(original))
    for key, new in _numbered(again):
        old = recorded.get(key)
        if old is not None:
            yield old, new


def _numbered(nodes: list[Node]) -> Iterator[tuple[tuple, Node]]:
    seen: Counter = Counter()
    for node in nodes:
        if node.kind is NodeKind.OP:
            seen[node.target, node.location] += 1
            yield (node.target, node.location, seen[node.target, node.location]), node


def shrunk_sizes(graph: Graph) -> set[int]:
    """The recorded sizes of the dimensions the plan shrinks (the one :func:`~speedup.planning.decide`
    left on the values), from :data:`_SMALLEST_SIZE` up."""
    return {value.shape[d] for value in graph.values for d, kept in enumerate(value.kept)
            if kept is not None and int(kept.numel()) < value.shape[d] and value.shape[d] >= _SMALLEST_SIZE}


def may_pass_shrunk_sizes(graph: Graph) -> bool:
    """Whether a call passes a number that a size the plan shrinks may have given (see the module's docstring)."""
    sizes = shrunk_sizes(graph)
    return bool(sizes) and any(sizes_behind(number, sizes) for node in graph.nodes
                               if node.kind is NodeKind.OP and not node.reads_input_numbers
                               for number in numbers_passed(node))


def sizes_behind(number: float, sizes: set[int]) -> set[int]:
    """The sizes ``n`` in ``sizes`` for which ``number`` is ``k * n``, ``sqrt(k * n)`` or the inverse
    of either, ``k`` in :data:`_FACTORS`."""
    number = abs(number)
    if not number or not math.isfinite(number):
        return set()
    found = set()
    square = number * number  # 0 or inf at a float64 model's extremes (an attention mask's fill value)
    for candidate in (number, square, 1 / number, 1 / square if square else math.inf):
        if not math.isfinite(candidate) or candidate < 1:
            continue
        for factor in _FACTORS:
            size = candidate / factor
            nearest = round(size)
            if nearest in sizes and abs(size - nearest) <= 1e-5 * size:
                found.add(nearest)
    return found
