"""Whether the sped-up model's attention calls make their planned shapes, seen in the verification run.

Attention code may split its width into heads by a count it stored and a width it reads from the
stream (AIMv2's pooling head: ``reshape(b, s, self.num_heads, c // self.num_heads)``). Where the plan
removes whole heads and the stream loses as many channels, the sped-up model still runs: it splits the
narrower stream into the stored count of narrower heads, and ``scaled_dot_product_attention`` scales
their scores by another width. The outputs differ, but on a model whose outputs are small (random
weights) by less than the verification's tolerance, which is absolute below 1 (0.3% of AIMv2's
pooled output went unnoticed). Recording the sped-up model again would find the call (its rule asks
for its planned shapes, :attr:`~speedup.rule.Rule.rechecks_shapes`), at the cost of another recording
on every attention model.

So the verification run notes the shapes of the ``F.scaled_dot_product_attention`` calls, by the
line of the model's code issuing them, at the cost of a Python call per attention call; a call
departing from the planned shapes of the recorded calls at the same line (in the same order) sends
the sped-up model to be recorded again, which names the call and finds the stored size to set.
"""

from __future__ import annotations

import contextlib
import sys
from collections import defaultdict
from typing import Any, Iterator

import torch

from .graph import Graph, NodeKind
from .tracer import attribute_replaced, code_location

_OPERANDS = ("query", "key", "value")

Shapes = list[tuple[int, ...]]
"""The shapes of a call's query, key, value and output."""


@contextlib.contextmanager
def attention_calls_noted() -> Iterator[dict[str, list[Shapes]]]:
    """Inside, the shapes of each ``F.scaled_dot_product_attention`` call are noted by the line of the
    model's code issuing it (``file:line``, as the recording notes calls), in the order of the calls."""
    function = torch.nn.functional.scaled_dot_product_attention
    noted: dict[str, list[Shapes]] = defaultdict(list)

    def attention(*args: Any, **kwargs: Any) -> Any:
        out = function(*args, **kwargs)
        operands = [args[i] if i < len(args) else kwargs.get(name) for i, name in enumerate(_OPERANDS)]
        if all(isinstance(t, torch.Tensor) for t in operands) and isinstance(out, torch.Tensor):
            location = code_location(sys._getframe(1))
            if location is not None:
                noted[location].append([tuple(t.shape) for t in operands] + [tuple(out.shape)])
        return out

    with attribute_replaced(torch.nn.functional, "scaled_dot_product_attention", attention):
        yield noted


def departs_from_plan(graph: Graph, noted: dict[str, list[Shapes]]) -> bool:
    """Whether the attention calls noted at a line of code differ from the planned shapes of the calls
    recorded at that line whose rule asks for them (different shapes, or another number of calls).
    Lines with no such recorded call are passed over: calls inside a claimed module (a
    ``nn.MultiheadAttention``), or code the recording saw as separate operators."""
    if not noted:
        return False  # no attention call: no pass over the graph
    planned: dict[str, list[Shapes]] = defaultdict(list)
    for node in graph.nodes:
        if (node.kind is NodeKind.OP and node.location in noted and node.rule is not None
                and node.rule.rechecks_shapes and len(node.inputs) >= len(_OPERANDS) and node.outputs):
            planned[node.location].append([v.planned_shape() for v in node.inputs[:len(_OPERANDS)]]
                                          + [node.outputs[0].planned_shape()])
    return any(noted[location] != calls for location, calls in planned.items())
