"""Sizes a module stored when it was built, kept in step with the dimensions that shrank.

Code often keeps a size it was built with and reads it in ``forward``: timm's selective-kernel
convolution splits its input with ``torch.split(x, self.in_channels // self.num_paths, 1)``, an
attention layer reshapes with ``self.num_heads``. Plugins keep the sizes of the modules they know in
step (``RuleRegistry.add_sizes``); a module no plugin knows keeps its stale size, and its call
departs from the plan when the sped-up model is verified.

When that happens, the module running the departing call (for the call of a module a rule knows, the
module calling it) is looked at: its integer attributes (and short lists of them, as split sizes) that
equal the full size of a dimension that shrank inside it are set to that dimension's new size (that of
the departing call's own dimensions first, where they shrank and a dimension of the same full size
shrank to another elsewhere in the module), in every module of the same class (the same code reads
them), and the attempt is verified again. A call departing inside a submodule of a module whose sizes
are set tries the submodule's sizes first, with its module's still set (it may store the same size:
timm's relative position MLP keeps its own head count); once none is left, the module's choice takes the
blame. The parts of torch's own classes a module holds (``nn.Unflatten``, in an ``nn.Sequential`` too)
are looked at with it: their calls are recorded as its calls. Where such a size also belongs to a
dimension that kept its size (``in_channels`` and ``out_channels`` both 64, only the input losing
channels), each attribute is tried on its own, then all together; where several attributes equal the
size, after all of them together each is tried on its own too (one may equal it by chance: Mistral's
``sliding_window`` of 4 with 4 heads). Only a verified result is kept (equal outputs, and every number
passed to an operator to compute with as recorded: a size may be read outside shapes too, as an
attention's scale ``self.head_dim ** -0.5`` or a window compared with positions): when no choice makes
the call meet its plan, the sizes go back and the engine keeps the call whole instead. Once the model
verifies, each attribute set is put back in turn where the model still verifies without it: a number
read only where the dummy input does not go (a window compared with the number of tokens) may equal the
size by chance, and nothing says it is that size.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Optional

from torch import nn

from .graph import Graph, Node, NodeKind, within_scope
from .transaction import Transaction

SizeFix = tuple[nn.Module, str, str, object, object]
"""``(module, its name, attribute, value before, value after)``; a value is an integer, or a list or
tuple of integers."""


_MOST_CHOICES = 6


class StoredSizes:
    """The stored sizes each attempt sets: for each call that departed from the plan, one choice
    after another, until the call meets its plan or no choice is left."""

    def __init__(self, model: nn.Module, graph: Graph):
        self.model, self.graph = model, graph
        self.choices: dict[int, list[list[SizeFix]]] = {}
        self.fixes: dict[int, list[SizeFix]] = {}
        self.nodes: dict[int, Node] = {}
        self._replaced: dict[str, tuple[object, Optional[tuple]]] = {}
        """``module.attr`` -> (the value :meth:`apply` replaced, what ``attributes`` noted for it)"""

    def next_choice(self, departed: Optional[Node]) -> tuple[bool, Optional[Node]]:
        """``(tried, blamed)``: whether the next attempt tries another choice of sizes, and the call
        blamed for the departure. A departure inside a module whose sizes a choice changed blames
        that choice (a size read in two places may fit only one; a call inside it may be another call
        because a branch read a size), and so do outputs that differ with
        no call departing (``departed`` None: the latest choice still set; once its call is kept whole,
        the one before: a size may be read outside shapes, as YOLO-World's attention divides by
        ``self.hc ** 0.5``, and only the values tell). When no choice is left, the blamed call is
        the one to keep whole."""
        node = self._blamed(departed)
        if node is None:
            return False, departed
        self.fixes.pop(node.index, None)
        if not self._choices_left(node):
            return False, node
        left = self.choices[node.index]
        self.fixes[node.index] = left.pop(0)  # last in order: the latest choice
        self.nodes[node.index] = node
        return True, node

    def _blamed(self, departed: Optional[Node]) -> Optional[Node]:
        if departed is None:
            return self.nodes[next(reversed(self.fixes))] if self.fixes else None
        for index, fixes in self.fixes.items():
            names = {name for _, name, _, _, _ in fixes}
            if index != departed.index and any(within_scope(departed.scope, name) for name in names):
                if departed.scope not in names and self._choices_left(departed):
                    # A submodule storing the same size (timm's relative position MLP keeps its
                    # own ``num_heads``): its sizes are tried with the enclosing module's still set.
                    return departed
                self.fixes.pop(departed.index, None)
                return self.nodes[index]
        return departed

    def _choices_left(self, node: Node) -> bool:
        if node.index not in self.choices:
            self.choices[node.index] = stale_size_choices(self.model, self.graph, node)
        return bool(self.choices[node.index])

    def apply(self, tx: Transaction, attributes: dict) -> None:
        """Sets the sizes of every current choice (undone with the attempt), noting them in ``attributes``."""
        self._replaced = {}
        for fixes in self.fixes.values():
            for module, name, attr, before, after in fixes:
                key = f"{name}.{attr}" if name else attr
                self._replaced[key] = (getattr(module, attr), attributes.get(key))
                tx.set_attr(module, attr, after)
                attributes[key] = (before, after)

    def put_back_needless(self, tx: Transaction, attributes: dict, verifies: Callable[[], bool]) -> None:
        """Once the sped-up model verifies, puts back each attribute (in every module of its class) whose
        set size it does not need: ``verifies()`` still holds with the value it had before.

        A stored number may equal a dimension's full size by chance and be read only where the dummy
        input does not go (Reformer's ``chunk_length`` equal to the width, compared with the number of
        tokens): changing it would make another branch run on longer inputs, with no error. What the
        dummy input's run does not need changed, no evidence says is that dimension's size."""
        for index, fixes in self.fixes.items():
            for attr in dict.fromkeys(fix[2] for fix in fixes):
                chosen = [fix for fix in fixes if fix[2] == attr]
                keys = [f"{name}.{attr}" if name else attr for _, name, _, _, _ in chosen]
                for (module, *_), key in zip(chosen, keys):
                    tx.set_attr(module, attr, self._replaced[key][0])
                if not verifies():
                    for module, _, _, _, after in chosen:
                        tx.set_attr(module, attr, after)
                    continue
                self.fixes[index] = [fix for fix in self.fixes[index] if fix[2] != attr]
                for key in keys:
                    noted = self._replaced[key][1]
                    if noted is None:
                        del attributes[key]
                    else:
                        attributes[key] = noted


def stale_size_choices(model: nn.Module, graph: Graph, node: Node) -> list[list[SizeFix]]:
    """Ways to change stored sizes so that the module running ``node`` (and every module of its class)
    may meet the planned shapes, most likely first; empty when the recording tells of none.

    Where ``node`` is the call of a module a rule knows (whose sizes its rule keeps in step), the
    module calling it is looked at: its code may check a size before the call (PVT's patch embedding
    compares its input's channels with ``self.num_channels`` and raises)."""
    scopes = _nodes_by_scope(graph)
    if node.kind is NodeKind.MODULE:  # the sizes the caller's code reads: its own calls', and those it passes
        caller = node.scope.rpartition(".")[0]
        return _choices_in(model, scopes, caller, {caller: [node]}, lambda other: other is node)
    return _choices_in(model, scopes, node.scope, {}, node.same_code)


def _choices_in(model: nn.Module, scopes: dict[str, list[Node]], scope: str, passed: dict[str, list[Node]],
                departing: Callable[[Node], bool]) -> list[list[SizeFix]]:
    """:func:`stale_size_choices` for the module named ``scope`` and every module of its class, the
    sizes they read being those of their own calls and of the module calls in ``passed``.

    A size that the departing call's own dimensions shrank to one other size (``departing`` says which
    calls are that call, in each module) takes that size: a part of a split may shrink to one size
    while another dimension of the same full size in the module (a convolution's output) shrank to
    another. Elsewhere a size takes the one size its dimensions in the module shrank to: where the
    departing call kept a dimension of that size, another call may read it (an attention's width,
    equal to its token count)."""
    try:
        owner = model.get_submodule(scope)  # the model itself for its own forward (scope "")
    except AttributeError:
        return []
    # attribute (dotted from the module for a torch part's) -> its fixes, and the attributes whose value is ambiguous
    candidates: dict[str, list[SizeFix]] = defaultdict(list)
    ambiguous: set[str] = set()
    for name, module in model.named_modules():
        if type(module) is not type(owner):
            continue
        calls = scopes.get(name, []) + passed.get(name, [])
        fates = _fates(calls)
        own = _fates([call for call in calls if departing(call)])
        for part, holder in [("", module)] + _torch_parts(module):
            for attr, before in vars(holder).items():
                sizes = _sizes(before)
                if sizes is None or attr.startswith("_"):
                    continue
                after = [_size_after(own, fates, size) for size in sizes]
                if any(new is None for new in after) or after == sizes:
                    continue
                key = f"{part}.{attr}" if part else attr
                holder_name = f"{name}.{part}" if name and part else name or part
                candidates[key].append((holder, holder_name, attr, before,
                                        after[0] if type(before) is int else type(before)(after)))
                if any(fates[size] != {new} for size, new in zip(sizes, after) if new != size):
                    ambiguous.add(key)  # another dimension of that size kept it, or shrank to another
    sure = [attr for attr in candidates if attr not in ambiguous]
    unsure = [attr for attr in candidates if attr in ambiguous]
    chosen = [sure] if sure else []
    chosen += [sure + [attr] for attr in unsure]
    if len(unsure) > 1:
        chosen.append(sure + unsure)
    if len(sure) > 1:  # an attribute equal to the size by chance (a sliding window of 4 tokens, with 4 heads)
        chosen += [[attr] for attr in sure]
    return [_fixes(candidates, attrs) for attrs in chosen[:_MOST_CHOICES]]


_MOST_SIZES = 16
"""Entries of a list of integers beyond which it is a table (LeViT's attention offsets), not sizes."""


def _sizes(attribute: object) -> Optional[list[int]]:
    """The sizes an attribute may hold: an integer, or a short list or tuple of them (split sizes)."""
    if type(attribute) is int:
        return [attribute]
    if (type(attribute) in (list, tuple) and 0 < len(attribute) <= _MOST_SIZES
            and all(type(a) is int for a in attribute)):
        return list(attribute)
    return None


def _new_size(fates: dict[int, set[int]], size: int) -> Optional[int]:
    """The one size a full size shrank to, the size itself where it never shrank; None where it
    shrank to several sizes."""
    shrunk = fates.get(size, set()) - {size}
    if len(shrunk) > 1:
        return None
    return next(iter(shrunk)) if shrunk else size


def _size_after(own: dict[int, set[int]], fates: dict[int, set[int]], size: int) -> Optional[int]:
    """The size a stored ``size`` is set to: the one its dimensions in the departing call (``own``)
    shrank to, where they shrank, else the one its dimensions in the module (``fates``) shrank to."""
    new = _new_size(own, size)
    return new if new not in (None, size) else _new_size(fates, size)


def _fixes(candidates: dict[str, list[SizeFix]], attrs: list[str]) -> list[SizeFix]:
    return [fix for attr in attrs for fix in candidates[attr]]


def _torch_parts(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """The module's parts of torch's own classes holding no parameters (``nn.Unflatten``,
    ``nn.Upsample``), by name, those inside torch's containers (``nn.Sequential``) included: calls in
    their ``forward`` are recorded as the module's (the recording looks for the model's code), so the
    sizes they store are read in its scope."""
    parts = []
    for name, child in module.named_children():
        if type(child).__module__.startswith("torch.nn."):
            if child._modules:
                parts += _torch_parts(child, f"{prefix}{name}.")
            elif not child._parameters:
                parts.append((f"{prefix}{name}", child))
    return parts


def _nodes_by_scope(graph: Graph) -> dict[str, list[Node]]:
    scopes: dict[str, list[Node]] = defaultdict(list)
    for node in graph.nodes:
        scopes[node.scope].append(node)
    return scopes


def _fates(nodes: list[Node]) -> dict[int, set[int]]:
    """``full size -> planned sizes`` over the dimensions of the values these calls read and make."""
    fates: dict[int, set[int]] = defaultdict(set)
    for node in nodes:
        for value in list(node.inputs) + list(node.outputs):
            for full, now in zip(value.shape, value.planned_shape()):
                fates[full].add(now)
    return fates
