"""What a rule is: the knowledge about one operator or module type.

The engine knows no operator. For every node of the recorded graph it asks the node's rule three
questions, each in its own pass over the graph, and for module nodes a fourth:

1. :meth:`Rule.couple` (any order): which dimensions of the node's inputs, outputs and parameters
   correspond, so that removing an entry in one removes it in the others. Expressed with the
   context's ``link``/``assign``/``accept`` and, for reshapes, atom conjunctions. An input
   dimension the rule does not mention keeps its size; an output dimension it does not assign
   cannot shrink.
2. :meth:`Rule.forward` (inputs before outputs): which output entries are constant for every input
   ("direct sparsity"), from the constants of the inputs: ``relu(0) = 0``, ``sigmoid(0) = 0.5``,
   a conv output channel whose weights are all masked is its bias.
3. :meth:`Rule.backward` (outputs before inputs): which input entries the node needs, given which
   output entries are needed downstream ("indirect sparsity"): a linear layer does not need input
   features whose weight columns are masked; a module that can fold a constant input channel into
   its bias does not need that channel at all.
4. :meth:`ModuleRule.replace`: build the smaller module, given which entries of each dimension
   are kept and the constants of the removed ones to fold.

Defaults are conservative: a rule that says nothing makes its node a barrier (every dimension kept,
every input needed), which is never wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
from torch import nn

if TYPE_CHECKING:
    from .graph import Node
    from .propagation import Analysis
    from .replacement import ModulePlan


class Rule:
    """Base class of all rules. Subclass :class:`OpRule` or :class:`ModuleRule`."""

    name: str = ""
    """Shown in reports and in ``speedup plugins``; defaults to the class name."""

    rechecks_shapes: bool = False
    """Whether the call must make its planned shapes whenever the sped-up model is recorded again
    (where a size it stored or a number from a size may have changed), though the outputs verified:
    an attention whose code splits a width by a count it stored may split it otherwise and compute
    something else by little, where a small layer scale follows (timm's CaiT starts at 1e-5)."""

    varies_with_input_sizes: bool = False
    """Whether the call's results may differ on another input though it reads no tensor depending on
    the input: values counted out from numbers the code may read from the input's shape
    (``torch.arange(x.shape[1])``). No rule may take them, or what is computed from them, for
    constants (see :attr:`~speedup.graph.TensorValue.follows_sizes`)."""

    def couple(self, node: "Node", ctx: "Analysis") -> None:
        """Declares corresponding dimensions. Default: none (a barrier)."""

    def forward(self, node: "Node", ctx: "Analysis") -> None:
        """Sets constant entries of the outputs. Default: nothing known (every entry varies)."""

    def backward(self, node: "Node", ctx: "Analysis") -> None:
        """Demands input entries. Default: every input entry, as soon as any output is needed."""
        if any(ctx.is_demanded(v) for v in node.outputs) or not node.outputs:
            for value in node.inputs:
                ctx.demand_all(value)

    def keep_after_departure(self, node: "Node", again: Optional["Node"]) -> Optional[set[int]]:
        """Which dimensions of the first output to keep whole after verification found that this call
        made other shapes than planned in the sped-up model; ``None`` keeps the whole call (the default).

        ``again`` is the same call in the sped-up model, or ``None`` where it raised before
        returning (then ``node`` stands in for it). A rule that sees why can keep less: a reshape
        given a literal size keeps just that dimension, so the others may still shrink.
        """
        return None

    def departs(self, node: "Node", again: "Node") -> Optional[str]:
        """Why ``again``, the same call in the sped-up model, is not the planned call though it made
        the planned shapes, or ``None``. Asked only when the sped-up model's outputs differ: an
        argument that had to follow a size the plan changed did not (a group count written in the
        code). The call is then kept as :meth:`keep_after_departure` says."""
        return None

    def note(self, args: tuple, kwargs: dict, out: Any) -> Any:
        """What the rule needs to know of the recorded call's values, found while it runs on the dummy
        input (with its real arguments and result), kept as ``node.note``: the recording keeps shapes
        only. Called only where a rule overrides it; the default notes nothing."""
        return None

    def hides_layout(self, node: "Node") -> bool:
        """Whether the call, as recorded on the dummy input, gives the same result however its input is
        laid out: a softmax over a single entry gives 1 whatever the heads (a dummy of one token).
        Equal outputs then cannot show that the sped-up model splits its heads otherwise than planned
        (a head count the code stored went stale), so verification records the sped-up model again
        and such a call must make its planned shapes."""
        return False

    def picks_by_rank(self, node: "Node") -> bool:
        """Whether the call picks entries by the order of their values and the model reads what it
        picked (``topk`` and its indices), or compares computed values exactly (CenterNet's peaks,
        ``max_pool(h) == h``): where values tie, round-off alone picks others, and a model that equals
        the masked one may still not verify. Only said when verification fails."""
        return False

    @property
    def label(self) -> str:
        return self.name or type(self).__name__


class OpRule(Rule):
    """A rule for ATen operators called by the model's Python code.

    The code that calls the operator runs unchanged in the sped-up model, on smaller tensors. So an
    operator rule may only let a dimension shrink where the same call computes the same values
    for the remaining entries (an elementwise op, a permute, a sum over features whose removed
    entries are zero); it cannot fold constants, since nothing of the call can be changed.
    """


class ModuleRule(Rule):
    """A rule for a module type, recorded as one node and replaced as a whole."""

    subclasses: bool = False
    """Also claim subclasses of the registered type. Off by default: a subclass that overrides
    ``forward`` computes something else, and must not silently inherit this replacement."""

    lazy_masks: bool = False
    """The rule reads parameter values only through the engine: ``value.data`` or ``value.host()`` of
    the node's values, the analysis (``ctx.const``, ``NonzeroPattern``), ``plan.param()`` and
    ``plan.masked()``; never the module's attributes. The module's masked weights may then keep their
    own values in the model while it is sped up (operators read masked copies while it is traced),
    which spares a masked copy of each in fresh memory: half the call on a BERT-base encoder. Left
    off, the module holds its masked values throughout, as a rule written against the module expects."""

    unrecorded_forward: bool = False
    """The module's ``forward`` runs no operator whose FLOPs are counted, reads only its inputs and its
    own tensors, and keeps nothing it makes (a norm layer): it may run unrecorded while the model is
    traced, none of its operators dispatched through the recorder, unless one of its own weights is
    masked lazily. Some operators take slower paths under a dispatch mode: a BatchNorm over
    densenet201's concatenated features costs about 125 us more a call recorded."""

    def masked_forward(self, module: nn.Module, masks: dict) -> Optional[Callable[..., Any]]:
        """Optional, with :attr:`lazy_masks`: a function computing the masked module's output from the
        module's own (unmasked) weights, for ``masks`` (parameter name as ``module.named_parameters()``
        gives it, its submodules' included -> :class:`~speedup.masks.MaskPattern` of each lazily masked
        parameter), or ``None`` to let the recording mask the weights.

        The recording then calls ``fn(*args, **kwargs)`` instead of the module's ``forward``. Masking
        activations costs a pass over them instead of one over the weights: ``linear(x * kept_columns,
        W) * kept_rows`` for a weight losing rows and columns. The result must equal the masked
        module's within round-off (the verification compares with it).

        ``fn`` may skip the multiplications by masked entries (a convolution computing only its kept
        channels). It then has a method ``flops(output) -> int``: the FLOPs of the module's own
        forward, given what it returned, which the recording counts instead of what ``fn`` ran; and
        ``fn`` runs unrecorded (no operator of it is seen), so it reads only its module's tensors and
        returns new ones.
        """
        return None

    def replace(self, module: nn.Module, plan: "ModulePlan") -> nn.Module:
        """Returns the smaller module (``module`` itself when nothing of it changed).

        Must not modify ``module``: build a new one or a shallow copy. ``plan`` gives the kept
        entries of every dimension of the module's inputs, outputs and parameters, sliced
        parameters, and the constants of removed input entries to fold.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot replace {type(module).__name__}")


@dataclass
class DimConst:
    """Which entries along one dimension are constant for every input, and their values.

    An entry is constant when the whole slice of the tensor at that index holds one value that does
    not depend on the model's input (a channel whose conv weights are all masked is its bias
    everywhere). Zero is the common case; a non-zero constant must be folded into a consumer.
    """

    mask: torch.Tensor
    """Boolean, one per entry: the slice at this index is constant."""
    value: torch.Tensor
    """float64, one per entry: the constant (0 where ``mask`` is False)."""

    @classmethod
    def none(cls, n: int) -> "DimConst":
        return cls(torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.float64))

    @classmethod
    def where(cls, mask: torch.Tensor, value: torch.Tensor) -> "DimConst":
        value = torch.where(mask, value.to(torch.float64), 0.0)
        return cls(mask, value)

    @classmethod
    def agreeing(cls, consts: list[Optional["DimConst"]]) -> Optional["DimConst"]:
        """The entries constant in every one of ``consts`` with one value (slices made of all of them);
        None where one of them knows nothing."""
        if not consts or any(c is None for c in consts):
            return None
        first = consts[0]
        mask = first.mask.clone()
        for other in consts[1:]:
            mask &= other.mask & (other.value == first.value)
        return cls.where(mask, first.value)

    @property
    def zero(self) -> torch.Tensor:
        return self.mask & (self.value == 0)

    def only_zeros(self) -> "DimConst":
        """The zero entries alone: what an operator keeps that maps zeros to zeros but not other
        constants to constants (a sum along another dimension, zero padding)."""
        return DimConst.where(self.zero, self.value)

    @property
    def nonzero_const(self) -> torch.Tensor:
        return self.mask & (self.value != 0)

    def any(self) -> bool:
        return bool(self.mask.any())

    def index(self, idx: torch.Tensor) -> "DimConst":
        return DimConst(self.mask[idx], self.value[idx])

    def __len__(self) -> int:
        return self.mask.numel()


_SCHEMAS: dict[Any, tuple[tuple[str, Any], ...]] = {}
_REQUIRED = object()


def bind(node: "Node") -> dict[str, Any]:
    """An ATen node's arguments by their schema names, defaults filled in."""
    func = node.target
    spec = _SCHEMAS.get(func)
    if spec is None:
        spec = tuple(
            (a.name, a.default_value if a.has_default_value() else _REQUIRED) for a in func._schema.arguments
        )
        _SCHEMAS[func] = spec
    bound = {}
    args = node.args
    for i, (name, default) in enumerate(spec):
        if i < len(args):
            bound[name] = args[i]
        elif name in node.kwargs:
            bound[name] = node.kwargs[name]
        elif default is not _REQUIRED:
            bound[name] = default
    return bound
