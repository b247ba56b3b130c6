"""Modules kept whole inside a smaller model: their inputs refilled, their outputs cut.

Verification keeps a module whole when its code sizes one tensor after another (``B, N, C =
x.shape`` ... ``attention.reshape(B, N, C)``, the two having lost different channels). Keeping
every tensor such a module reads at full size would keep the residual stream it reads whole, in
every block of the network. Instead the module is *refilled*: the entries its inputs lost, constants
all of them, are written back before it runs, by a forward pre-hook (as
:mod:`speedup.output_constants` does for what the model returns), and what it returns is cut to the
entries the model around it keeps, by a forward hook. Only the module itself runs at full size.
A claimed module whose rule keeps a dimension of its input whole, where that dimension could
shrink (a Conv1d run along the channels, as efficient channel attention does), and that the masks
leave alone, is refilled the same way from the start, and so is a module without parameters whose
code keeps a whole dimension of its input (OLMo's norm, ``F.layer_norm`` with no weight; see
:func:`refill_pinning_modules`).

In the graph, a refilled module's boundary becomes synthetic nodes (:attr:`~speedup.graph.NodeKind.REFILL`):
a *refill* between each tensor argument and the module's operators reading it, which needs every entry
of the argument but the constant ones, and a *cut* between each tensor the module makes and returns
and the operators after it, which offers the entries of the dimensions its arguments may lose.

A module is refilled only where that is sound: it is called once, and everything it makes that the
model reads later is among what it returns (a tensor it was given and wrote in place, which the
caller reads again, is not: the refill would have given it a copy to write).
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.utils._python_dispatch import _disable_current_modes

from .graph import Boundary, Graph, Node, NodeKind, Origin, TensorValue
from .output_constants import DimensionRestore, dimension_restore, value_at, with_value_at
from .propagation import Analysis
from .rule import Rule
from .tracer import recording
from .transaction import Transaction


class _RefillRule(Rule):
    """Outside, the argument may lose any entry (the hook writes it back); inside, it is whole."""

    def couple(self, node: Node, ctx: Analysis) -> None:
        outer, inner = node.inputs[0], node.outputs[0]
        for d in range(outer.ndim):
            ctx.accept(outer, d)
            ctx.assign(inner, d, None)

    def forward(self, node: Node, ctx: Analysis) -> None:
        outer, inner = node.inputs[0], node.outputs[0]
        for d in range(outer.ndim):
            ctx.set_const(inner, d, ctx.const(outer, d))

    def backward(self, node: Node, ctx: Analysis) -> None:
        outer, inner = node.inputs[0], node.outputs[0]
        if ctx.is_demanded(inner):
            consts = [ctx.const(outer, d) for d in range(outer.ndim)]
            ctx.demand(outer, {d: ~c.mask for d, c in enumerate(consts) if c is not None})


class _CutRule(Rule):
    """Inside, the result is whole; outside, it offers the entries of the dimensions along which the
    module's refilled arguments of its rank may lose entries (its channels, not its batch)."""

    def couple(self, node: Node, ctx: Analysis) -> None:
        inner, outer = node.inputs[0], node.outputs[0]
        arguments = node.kwargs["arguments"]
        for d in range(inner.ndim):
            ctx.accept(inner, d)
            prunable = any(v.ndim == inner.ndim and v.atoms and v.atoms[d] is not None for v in arguments)
            ctx.assign(outer, d, ctx.fresh(outer.shape[d]) if prunable else None)

    def forward(self, node: Node, ctx: Analysis) -> None:
        inner, outer = node.inputs[0], node.outputs[0]
        for d in range(inner.ndim):
            ctx.set_const(outer, d, ctx.const(inner, d))

    def backward(self, node: Node, ctx: Analysis) -> None:
        if ctx.is_demanded(node.outputs[0]):
            ctx.demand_all(node.inputs[0])


_REFILL, _CUT = _RefillRule(), _CutRule()


@dataclass(eq=False)
class Refill:
    """One refilled module: its boundary and the changes made to the graph, to install or undo."""

    boundary: Boundary
    nodes: list[Node] = field(default_factory=list)
    swaps: list[tuple[Node, TensorValue, TensorValue]] = field(default_factory=list)
    """(consumer, value it read, value it reads now)."""
    returned: list[tuple[TensorValue, TensorValue]] = field(default_factory=list)
    """(value the model returned, the cut value it returns now)."""

    def outside(self, value: TensorValue) -> TensorValue:
        """What the model around the module reads for one of the module's results."""
        for node in self.nodes:
            if node.rule is _CUT and node.inputs[0] is value:
                return node.outputs[0]
        return value

    def undo(self, graph: Graph) -> None:
        """Takes the synthetic nodes out again: the module's arguments are then kept whole."""
        for consumer, old, new in reversed(self.swaps):
            _swap(consumer, new, old)
        for old, new in self.returned:
            _redirect_output(graph, new, old)
        synthetic = {id(n) for n in self.nodes}
        graph.nodes[:] = [n for n in graph.nodes if id(n) not in synthetic]
        for node in self.nodes:
            node.inputs[0].consumers.remove(node)


def refill(graph: Graph, boundary: Optional[Boundary]) -> Optional[Refill]:
    """Puts a refill before and a cut after the module of ``boundary`` in ``graph``; ``None`` (and
    nothing changed) where that would not be sound or would change nothing."""
    if boundary is None or boundary.calls != 1 or not boundary.name:
        return None
    positions = [i for i, n in enumerate(graph.nodes) if boundary.ran(n)]
    if not positions:
        return None
    inside = {id(graph.nodes[i]) for i in positions}
    arguments = _distinct(v for v in boundary.inputs if v is not None and v.origin is not Origin.PARAMETER
                          and (v.producer is None or id(v.producer) not in inside))
    results = _distinct(v for v in boundary.outputs if v is not None and v.producer is not None
                        and id(v.producer) in inside)
    if _escapes(graph, positions, inside, results):
        return None
    found = Refill(boundary)
    first, last = positions[0], positions[-1]
    indices = itertools.count(max(n.index for n in graph.nodes) + 1)
    refills = [_put_refill(graph, found, value, inside, indices) for value in arguments]
    refills = [n for n in refills if n is not None]
    cuts = [_put_cut(graph, found, value, inside, [n.inputs[0] for n in refills], indices) for value in results]
    cuts = [n for n in cuts if n is not None]
    if not refills and not cuts:
        return None
    graph.nodes[last + 1:last + 1] = cuts
    graph.nodes[first:first] = refills
    found.nodes = refills + cuts
    return found


def refill_pinning_modules(graph: Graph, analysis: Analysis,
                           eligible: Callable[[Node], bool]) -> list[tuple[Node, Refill]]:
    """Refills the modules around the nodes that kept a dimension of a tensor they were given whole,
    though it could have shrunk (:attr:`~speedup.propagation.Analysis.pinning`, after a coupling):

    * a claimed module called once (and ``eligible``): a Conv1d run along the channels, as efficient
      channel attention does, no longer keeps the channels of the whole network. Its node must be
      pinned from then on;
    * the innermost module traced through without parameters of its own around an operator that kept
      a whole dimension of one of the module's arguments: a norm calling ``F.layer_norm`` with no
      weight (OLMo's), which loses nothing of its own when refilled. Not where the operator kept a
      factor of a dimension (the radix of ResNeSt's softmax, its channels passing through): a refilled
      module reads every entry its arguments do not hold as constants, and that would keep them all.
    """
    found = []
    refilled: set[str] = set()
    for node in [n for n in graph.nodes if n.index in analysis.pinning]:
        if node.kind is NodeKind.MODULE:
            if len(graph.module_calls[node.scope]) != 1 or not eligible(node):
                continue
            inputs = [v for v in pytree.tree_leaves((node.args, node.kwargs)) if isinstance(v, TensorValue)]
            boundary = Boundary(node.module, node.scope, inputs, list(node.outputs),
                                list(zip(node.paths, node.outputs)), span=(node.index, node.index + 1))
        else:
            boundary = _parameterless_module_around(graph, node)
            if boundary is None or boundary.name in refilled or not _pins_an_argument(analysis, node, boundary):
                continue
        done = refill(graph, boundary)
        if done is not None:
            refilled.add(boundary.name)
            found.append((node, done))
    return found


def _parameterless_module_around(graph: Graph, node: Node) -> Optional[Boundary]:
    """The innermost module traced through whose call made ``node``, if it holds no parameters."""
    parts = node.scope.split(".") if node.scope else []
    for end in range(len(parts), 0, -1):
        boundary = graph.observed.get(".".join(parts[:end]))
        if boundary is not None and boundary.ran(node):
            return None if next(boundary.module.parameters(), None) is not None else boundary
    return None


def _pins_an_argument(analysis: Analysis, node: Node, boundary: Boundary) -> bool:
    """Whether ``node`` kept a dimension coupled whole to a dimension of one of the module's arguments."""
    root = analysis.solution.root
    arguments = [atoms for v in boundary.inputs if v is not None for atoms in v.atoms if isinstance(atoms, torch.Tensor)]
    for value, d in analysis.pinning[node.index]:
        pinned = root[value.atoms[d]]
        if any(atoms.shape == pinned.shape and torch.equal(root[atoms], pinned) for atoms in arguments):
            return True
    return False


def _distinct(values: Iterator[TensorValue]) -> list[TensorValue]:
    return list({id(v): v for v in values}.values())


def _escapes(graph: Graph, positions: list[int], inside: set[int], results: list[TensorValue]) -> bool:
    """Whether the model reads something the module makes other than what it returns (a write in place
    to a tensor it was given, or to a view of one, makes a new value the caller reads)."""
    returned = {id(v) for v in results}
    for i in positions:
        for value in graph.nodes[i].outputs:
            if id(value) in returned:
                continue
            if value.is_output or any(id(c) not in inside for c in value.consumers):
                return True
    return False


def _put_refill(graph: Graph, found: Refill, outer: TensorValue, inside: set[int],
                indices: Iterator[int]) -> Optional[Node]:
    readers = [c for c in _distinct(iter(outer.consumers)) if id(c) in inside]
    if not readers:
        return None
    inner = _twin_value(graph, outer)
    node = _synthetic(next(indices), "refill", found.boundary, outer, inner, {})
    node.rule = _REFILL
    for reader in readers:
        _swap(reader, outer, inner)
        found.swaps.append((reader, outer, inner))
    return node


def _put_cut(graph: Graph, found: Refill, inner: TensorValue, inside: set[int], arguments: list[TensorValue],
             indices: Iterator[int]) -> Optional[Node]:
    readers = [c for c in _distinct(iter(inner.consumers)) if id(c) not in inside]
    if not readers and not inner.is_output:
        return None
    outer = _twin_value(graph, inner)
    node = _synthetic(next(indices), "cut", found.boundary, inner, outer, {"arguments": arguments})
    node.rule = _CUT
    for reader in readers:
        _swap(reader, inner, outer)
        found.swaps.append((reader, inner, outer))
    if inner.is_output:
        _redirect_output(graph, inner, outer)
        found.returned.append((inner, outer))
    return node


def _twin_value(graph: Graph, value: TensorValue) -> TensorValue:
    twin = TensorValue(len(graph.values), value.shape, value.dtype, value.origin, tensor=value.tensor,
                       strides=value.strides, mask=value.mask)
    graph.values.append(twin)
    return twin


def _synthetic(index: int, what: str, boundary: Boundary, read: TensorValue, made: TensorValue,
               kwargs: dict) -> Node:
    """A REFILL node ``read -> made`` at the call of a module, in the code calling it."""
    node = Node(index, NodeKind.REFILL, f"{what} of '{boundary.name}'", (read,), {**kwargs, "span": boundary.span},
                [read], [made], boundary.name.rpartition(".")[0])
    read.consumers.append(node)
    made.producer = node
    return node


def _swap(node: Node, old: TensorValue, new: TensorValue) -> None:
    """Makes ``node`` read ``new`` wherever it read ``old``."""
    count = sum(v is old for v in node.inputs)
    node.inputs = [new if v is old else v for v in node.inputs]
    node.args = _replaced(node.args, old, new)
    node.kwargs = _replaced(node.kwargs, old, new)
    old.consumers[:] = [c for c in old.consumers if c is not node]
    new.consumers.extend([node] * count)


def _replaced(obj: Any, old: TensorValue, new: TensorValue) -> Any:
    if obj is old:
        return new
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_replaced(o, old, new) for o in obj)
    if isinstance(obj, dict):
        return {k: _replaced(v, old, new) for k, v in obj.items()}
    return obj


def _redirect_output(graph: Graph, old: TensorValue, new: TensorValue) -> None:
    graph.outputs[:] = [new if v is old else v for v in graph.outputs]
    graph.output_paths[:] = [(path, new if v is old else v) for path, v in graph.output_paths]
    old.is_output, new.is_output = False, True


# -- the sped-up model's hooks ------------------------------------------------------------------


@contextlib.contextmanager
def _unrecorded() -> Iterator[None]:
    """Outside speedup's recording, if one runs: verifying the sped-up model compares the operators it
    runs with those of the masked model, which ran no refill."""
    if recording():
        with _disable_current_modes():
            yield
    else:
        yield


class RefillInputs:
    """Forward pre-hook of a module kept whole: each tensor argument gets back the entries it lost."""

    def __init__(self, restores: dict[int, list[DimensionRestore]]):
        self.restores = restores
        """Position among the call's tensors (``pytree`` order of ``(args, kwargs)``) -> dimensions."""

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        leaves, spec = pytree.tree_flatten((args, kwargs))
        position = -1
        with _unrecorded():
            for i, leaf in enumerate(leaves):
                if isinstance(leaf, torch.Tensor):
                    position += 1
                    for restore in self.restores.get(position, ()):
                        leaf = restore.apply(leaf)
                    leaves[i] = leaf
        return pytree.tree_unflatten(leaves, spec)


class CutOutputs:
    """Forward hook of a module kept whole: the tensors it returns keep the entries the model keeps."""

    def __init__(self, cuts: list[tuple[tuple, list[tuple[int, int, torch.Tensor]]]]):
        self.cuts = cuts
        """(path in the return value, [(dimension, full size, kept indices)])."""

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> Any:
        with _unrecorded():
            for path, dims in self.cuts:
                tensor = value_at(output, path)
                if not isinstance(tensor, torch.Tensor):
                    continue
                for d, size, kept in dims:
                    if tensor.shape[d] == size:
                        tensor = tensor.index_select(d, kept.to(tensor.device))
                output = with_value_at(output, path, tensor)
        return output


def install(refills: list[Refill], tx: Transaction) -> list[str]:
    """Registers the hooks of every refilled module that lost something at its boundary (undone on
    rollback); returns their names."""
    hooked = []
    for found in refills:
        boundary = found.boundary
        restores = {}
        for position, value in enumerate(boundary.inputs):
            if value is not None and any(n.inputs[0] is value for n in found.nodes if n.rule is _REFILL):
                dims = [r for r in (dimension_restore(value, d) for d in range(value.ndim)) if r is not None]
                if dims:
                    restores[position] = dims
        cuts = []
        for path, value in boundary.output_paths:
            outer = found.outside(value) if value is not None else None
            dims = [(d, outer.shape[d], kept) for d, kept in enumerate(outer.kept or []) if kept is not None] \
                if outer is not None else []
            if dims:
                cuts.append((path, dims))
        if restores:
            tx.on_rollback(boundary.module.register_forward_pre_hook(RefillInputs(restores), with_kwargs=True).remove)
        if cuts:
            tx.on_rollback(boundary.module.register_forward_hook(CutOutputs(cuts), prepend=True).remove)
        if restores or cuts:
            hooked.append(boundary.name)
    return hooked
