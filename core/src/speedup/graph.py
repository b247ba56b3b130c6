"""The dataflow graph recorded from one concrete forward pass.

A :class:`Graph` is a list of :class:`Node` objects in execution order (so already topologically
sorted) connected by :class:`TensorValue` objects. A node is either one ATen operator call or one
call of a module that a rule claims as a whole (a ``nn.Conv2d``, a ``nn.MultiheadAttention``...).
Values are immutable snapshots: an in-place operator produces a new value for the tensor it writes.

The analysis passes hang their per-dimension state on each value (``atoms``, ``consts``,
``demand``, ``kept``); the graph itself knows nothing about pruning.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn


class Origin(enum.Enum):
    """Where a value's data comes from, which decides what the analysis may assume about it."""

    INPUT = "input"
    """A tensor of the dummy input: every dimension keeps its size."""
    PARAMETER = "parameter"
    """A parameter or registered buffer of the model; it can be sliced."""
    CONSTANT = "constant"
    """Computed only from parameters, buffers and factories: the same for every input of this shape."""
    COMPUTED = "computed"
    """Depends on the input."""
    OPAQUE = "opaque"
    """Produced where the recorder could not see how; nothing is assumed about it."""

    @property
    def input_independent(self) -> bool:
        return self in (Origin.PARAMETER, Origin.CONSTANT)


ALIAS_WRITE = "write through an alias"
"""The target of the OPAQUE node giving a tensor its value after a write through another view of its
storage (its ``kwargs["aligned"]``: the dimensions every written view covers whole, entry for entry)."""


class NodeKind(enum.Enum):
    OP = "op"
    """An ATen operator call recorded at the dispatcher."""
    MODULE = "module"
    """A call of a module claimed as a whole by a rule (its inner operators are not recorded)."""
    OPAQUE = "opaque"
    """A synthetic node standing for something the recorder could not follow (writes through aliases)."""
    REFILL = "refill"
    """A synthetic node where a module kept whole meets the smaller model around it (see :mod:`speedup.refill`);
    the sped-up model runs no recorded operator for it."""


@dataclass(eq=False)
class TensorValue:
    """One tensor as it was at one point of the recorded forward pass."""

    index: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    origin: Origin
    producer: Optional["Node"] = None
    tensor: Optional[torch.Tensor] = None
    """The tensor itself as the model holds it, kept only for input-independent values (parameters
    and constants). Its values are :attr:`data`."""
    owner: Optional[tuple[nn.Module, str]] = None
    """For parameters and buffers: the module holding it and the attribute name."""
    name: Optional[str] = None
    """For parameters and buffers: the qualified name in the model."""
    strides: tuple[int, ...] = ()
    """The strides it had when it was created (empty for layouts without strides)."""
    device: Optional[torch.device] = None
    """Where it was (a module without tensors of its own is rebuilt there)."""
    mask: Any = None
    """For a parameter the masked model multiplies by a mask the model does not hold applied (a
    :class:`~speedup.masks.MaskPattern`, see :mod:`speedup.lazy_masks`): ``tensor`` holds the
    model's values, :attr:`data` and :meth:`host` the masked ones."""
    follows_sizes: bool = False
    """A constant computed from values counted out from numbers the code passed (positions
    ``torch.arange(x.shape[1])``, see :attr:`~speedup.rule.Rule.varies_with_input_sizes`): its values
    are those of the dummy input's sizes, and the analysis takes none of them for a constant."""
    consumers: list["Node"] = field(default_factory=list)
    is_output: bool = False

    # Analysis state, one entry per dimension. Set by the propagation passes.
    atoms: list = field(default_factory=list)
    consts: list = field(default_factory=list)
    demand: Optional[list] = None
    kept: list = field(default_factory=list)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def demanded_entries(self, d: int) -> Optional[torch.Tensor]:
        """The demand on dimension ``d``: ``None`` where nothing of the value is needed, else a boolean
        per entry."""
        if self.demand is None:
            return None
        mask = self.demand[d]
        return torch.ones(self.shape[d], dtype=torch.bool) if mask is None else mask

    def planned_shape(self) -> tuple[int, ...]:
        """The shape once the kept entries of every dimension are all that is left."""
        if not self.kept:
            return self.shape
        return tuple(n if k is None else int(k.numel()) for n, k in zip(self.shape, self.kept))

    @property
    def data(self) -> Optional[torch.Tensor]:
        """The masked model's values: ``tensor``, times its ``mask`` where it has one (a copy, made once)."""
        if self.mask is None:
            return self.tensor
        masked = self.__dict__.get("_masked")
        if masked is None:
            masked = self.__dict__["_masked"] = self.mask.apply(self.tensor.detach())
        return masked

    def host(self) -> Optional[torch.Tensor]:
        """:attr:`data` detached and on the CPU (copied once from another device).

        The analysis runs on the CPU whatever the model's device: its masks and constants are
        small, and mixing devices in one expression is an error.
        """
        data = self.data
        if data is None:
            return None
        if data.device.type == "cpu":
            return data.detach()
        cached = self.__dict__.get("_host")
        if cached is None:
            cached = self.__dict__["_host"] = data.detach().cpu()
        return cached

    def mask_in_place(self, apply: Callable[[torch.Tensor], None]) -> None:
        """Masks the model's own tensor with ``apply(tensor)``, after which it holds :attr:`data`."""
        if self.mask is not None:
            apply(self.tensor)
            self.mask = None
            self.__dict__.pop("_masked", None)
            self.__dict__.pop("_host", None)

    def dim(self, d: int) -> int:
        """Normalizes a possibly negative dimension index."""
        return d + self.ndim if d < 0 else d

    def __repr__(self) -> str:
        label = self.name or (self.producer.describe() if self.producer else self.origin.value)
        return f"%{self.index}[{tuple(self.shape)} from {label}]"


def within_scope(scope: str, module: str) -> bool:
    """Whether code running in ``scope`` runs inside the module named ``module`` (itself, one of its
    submodules, or anything for the model itself, ``""``)."""
    return not module or scope == module or scope.startswith(module + ".")


@dataclass(eq=False)
class Node:
    """One recorded call: an ATen operator, a claimed module, or a synthetic opaque step."""

    index: int
    kind: NodeKind
    target: Any
    """The ``OpOverload`` for operator nodes, the module object for module nodes."""
    args: tuple
    kwargs: dict
    """Arguments as called, with every tensor replaced by its :class:`TensorValue`."""
    inputs: list[TensorValue]
    outputs: list[TensorValue]
    scope: str
    """For module nodes the module's qualified name; for operators the innermost module running."""
    location: Optional[str] = None
    """``file:line`` of the user code that issued the operator, when known."""
    params: dict[str, TensorValue] = field(default_factory=dict)
    """Module nodes: the module's parameters and buffers by their name inside the module."""
    rule: Any = None
    paths: list[tuple] = field(default_factory=list)
    """Module nodes: where each of ``outputs`` is in the return value (see :func:`speedup.tracer.iter_tensor_paths`)."""
    note: Any = None
    """Operator nodes: what the rule noted of the call's values (see :meth:`~speedup.rule.Rule.note`)."""
    reads_input_numbers: bool = False
    """Operator nodes: the call passes a number the model read out of a tensor that depends on the
    input (``torch.full(shape, h.sum().item())``). Its results hold no constant: no rule may take
    the number for a literal."""

    @property
    def module(self) -> nn.Module:
        assert self.kind is NodeKind.MODULE
        return self.target

    @property
    def output(self) -> TensorValue:
        """The single (first) tensor output."""
        return self.outputs[0]

    @property
    def op_name(self) -> str:
        if self.kind is NodeKind.MODULE:
            return type(self.target).__qualname__
        if self.kind is NodeKind.OPAQUE:
            return str(self.target)
        return f"aten.{self.target._opname}.{self.target._overloadname}" if _is_aten(self.target) else str(self.target)

    def integer_operands(self) -> list[int]:
        """Positions in ``args`` of the Python integers an operator call takes for a tensor operand
        (``x / x.shape[-1]``), as a number it computes a tensor with (``i - j < self.window``) or as the
        value it fills a tensor with (``torch.full((), C)``): numbers the code computes with, which it
        may have read from a size; not the sizes, dimensions or indices it passes, which follow the plan."""
        schema = getattr(self.target, "_schema", None) if self.kind is NodeKind.OP else None
        if schema is None:
            return []
        on_tensor = bool(schema.arguments) and str(schema.arguments[0].type) == "Tensor"
        return [i for i, (argument, a) in enumerate(zip(schema.arguments, self.args))
                if type(a) is int and (str(argument.type) == "Tensor" or argument.name in _FILL_VALUES
                                       or on_tensor and str(argument.type) in _NUMBERS)]

    def same_code(self, other: "Node") -> bool:
        """Whether ``other`` is the same call made by the same line of code (in another block of a
        network, or in another run of the model): the same kind, operator (for operator calls) and line."""
        return (self.kind is other.kind and (self.kind is not NodeKind.OP or self.target is other.target)
                and self.location == other.location)

    def describe(self) -> str:
        where = f" at {self.location}" if self.location else ""
        scope = f" in '{self.scope}'" if self.scope else ""
        if self.kind is NodeKind.MODULE:
            return f"module '{self.scope}' ({self.op_name})"
        return f"{self.op_name}{scope}{where}"

    def __repr__(self) -> str:
        return f"Node#{self.index}<{self.describe()}>"


def _is_aten(target: Any) -> bool:
    return isinstance(target, torch._ops.OpOverload) and target.namespace == "aten"


@dataclass(eq=False)
class Boundary:
    """The values entering and leaving the first call of a module traced through (not claimed)."""

    module: nn.Module
    name: str
    inputs: list[Optional[TensorValue]]
    """One per tensor among the call's arguments (``pytree`` order of ``(args, kwargs)``); ``None`` for
    one the recording did not know as it was (only for modules not replaced by the user's function)."""
    outputs: list[Optional[TensorValue]]
    output_paths: list[tuple[tuple, Optional[TensorValue]]] = field(default_factory=list)
    """Where each of ``outputs`` is in the return value (see :func:`speedup.tracer.iter_tensor_paths`)."""
    calls: int = 1
    span: tuple[int, int] = (0, 0)
    """``(start, end)``: the recorded nodes of the first call are those of index ``start <= i < end``,
    whatever module they are in (a module shared with other blocks included)."""

    def ran(self, node: "Node") -> bool:
        """Whether ``node`` is part of the first call: recorded during it, or the boundary of a module
        called during it (see :mod:`speedup.refill`)."""
        start, end = self.span
        if node.kind is NodeKind.REFILL:
            inner = node.kwargs["span"]
            return start <= inner[0] and inner[1] <= end and inner != self.span
        return start <= node.index < end


_FILL_VALUES = frozenset({"value", "fill_value", "s"})
"""Names of the ``Scalar`` arguments an operator writes into a tensor (``full``'s ``fill_value``,
``scalar_tensor``'s ``s``, ``fill_``'s ``value``): values even where it takes no tensor (a factory),
whose other ``Scalar`` arguments may be sizes (``arange``'s end)."""

_NUMBERS = frozenset({"number", "Optional[number]"})
"""How a schema types a ``Scalar`` argument: one an operator on a tensor takes is a number it computes
with (``lt``, ``clamp``, ``pow``)."""


@dataclass(eq=False)
class Graph:
    """Nodes in execution order plus the values that enter and leave the model."""

    nodes: list[Node] = field(default_factory=list)
    values: list[TensorValue] = field(default_factory=list)
    inputs: list[TensorValue] = field(default_factory=list)
    outputs: list[TensorValue] = field(default_factory=list)
    output_paths: list[tuple[tuple, TensorValue]] = field(default_factory=list)
    """Where each returned tensor is in the return value (see :func:`speedup.tracer.iter_tensor_paths`)."""
    parameters: dict[str, TensorValue] = field(default_factory=dict)
    module_calls: dict[str, list[Node]] = field(default_factory=dict)
    """Module nodes grouped by module name, to treat every call of a shared module alike."""
    observed: dict[str, Boundary] = field(default_factory=dict)
    """Boundaries of the modules traced through, by name: first call only, with the number of calls."""
    state_written: list[str] = field(default_factory=list)
    """Names of the model's parameters and buffers it wrote in place while it ran (an observer's
    statistics, an embedding's rows renormalised by ``max_norm``)."""
    non_finite_outputs: Optional[list[int]] = None
    """Positions of the returned floating-point tensors holding an infinity or NaN on the dummy input,
    found once a verification fails (``None`` before)."""

    def new_value(self, of: torch.Tensor, origin: Origin, **fields: Any) -> TensorValue:
        """A new value recording the shape, dtype and strides of the tensor ``of``."""
        value = TensorValue(len(self.values), tuple(of.shape), of.dtype, origin,
                            strides=of.stride() if of.layout is torch.strided else (), device=of.device, **fields)
        self.values.append(value)
        return value

    def release(self) -> None:
        """Drops the links from values back to their nodes, so that the graph is freed by reference
        counting as soon as it is dropped, not by the cyclic garbage collector (which took 15 ms
        after each speedup call on densenet201, finding some 20 000 objects)."""
        for value in self.values:
            value.producer = None
            value.consumers = []

    def add_node(self, node: Node) -> Node:
        self.nodes.append(node)
        for value in node.inputs:
            value.consumers.append(node)
        if node.kind is NodeKind.MODULE:
            self.module_calls.setdefault(node.scope, []).append(node)
        return node
