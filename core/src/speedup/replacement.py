"""Building the smaller model from the kept entries of every dimension.

Three kinds of change, all through the :class:`~speedup.transaction.Transaction`:

* a module recorded as one node is rebuilt by its rule (or by the user's ``customized_replace_func``)
  from a :class:`ModulePlan`, and put in place of the old one under every name it has; a module
  holding the very same parameters under another name (a tied embedding) gets a twin of it;
* a parameter read directly by operators (``F.linear(x, self.weight)``) is sliced where it lost
  entries and set back on its owner;
* an attribute repeating a size (``self.hidden_dim``) of a module that is traced through is set to
  what the plugin's size function says, once the module's parts have shrunk (an object the module
  holds, as a config, is copied first: it may be shared beyond the model);
* constant channels of returned tensors that went inside the model are put back by a forward hook
  (:mod:`speedup.output_constants`);
* nothing else: operators run unchanged on smaller tensors.

Sliced parameters are memoised, so a parameter shared by two modules (tied embeddings) stays
shared after the speedup.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from .graph import Graph, Node, NodeKind, TensorValue
from .output_constants import PutBackConstants, put_back_constants
from .plugins.registry import Companions, SizeAttributes
from .rule import DimConst, ModuleRule
from .transaction import Transaction
from .masks import MaskPattern, times_mask
from .wrappers import compiled_inner
from .slicing import gather_kept, memory_format_of

Tensorish = Union[torch.Tensor, nn.Parameter]


class ParamSlicer:
    """Slices parameters and buffers to their kept entries, once per tensor."""

    def __init__(self) -> None:
        self._done: dict[int, tuple[torch.Tensor, Tensorish]] = {}

    def slice(self, value: TensorValue) -> Tensorish:
        """The kept entries of a parameter as the masked model has them, as a new parameter; the
        parameter itself when it keeps every entry (masked in the model by the engine where it is
        lazily masked, see :mod:`speedup.lazy_masks`)."""
        original = value.tensor
        key = id(original)
        if key in self._done:
            return self._done[key][1]
        if all(k is None for k in value.kept):
            result: Tensorish = original
        elif isinstance(original, nn.Parameter):
            result = nn.Parameter(masked_entries(value, value.kept), requires_grad=original.requires_grad)
        else:
            result = masked_entries(value, value.kept)
        self._done[key] = (original, result)
        return result


def masked_entries(value: TensorValue, kept: list) -> torch.Tensor:
    """The entries of a parameter that ``kept`` selects (per dimension: indices, or None for all),
    holding the masked model's values, contiguous in the parameter's memory format: a lazily masked
    parameter's mask is applied to the selection only, and not at all where it keeps everything selected."""
    selected = gather_kept(value.tensor.detach(), kept)
    if value.mask is not None and not _keeps_all(value.mask, kept):
        selected = times_mask(selected, gather_kept(value.mask.mask, kept))
    return selected.contiguous(memory_format=memory_format_of(value.tensor))


def _keeps_all(pattern: MaskPattern, kept: list) -> bool:
    """Whether a mask keeps every entry that ``kept`` selects (told from its rows and columns alone
    where it is rows times columns, the usual case)."""
    if not pattern.separable:
        return False
    for d in range(min(pattern.mask.dim(), 2)):  # a dimension ``kept`` does not name is selected whole
        line, selected = pattern.kept(d), kept[d] if d < len(kept) else None
        if not bool((line if selected is None else line[selected.to(line.device)]).all()):
            return False
    return True


@dataclass
class ModulePlan:
    """Everything a :class:`~speedup.rule.ModuleRule` needs to build the smaller module.

    Dimensions are those of the recorded values: ``plan.kept(plan.input(), 1)`` are the kept input
    channels of the first call. All calls of a shared module agree on parameter dimensions.
    """

    module: nn.Module
    name: str
    calls: list[Node]
    slicer: ParamSlicer
    warnings: list[str] = field(default_factory=list)

    # -- values -----------------------------------------------------------------------------

    def input(self, i: int = 0) -> TensorValue:
        tensors = [a for a in self.calls[0].args if isinstance(a, TensorValue)]
        tensors += [v for v in self.calls[0].kwargs.values() if isinstance(v, TensorValue)]
        return tensors[i]

    def output(self, i: int = 0) -> TensorValue:
        return self.calls[0].outputs[i]

    def param_value(self, name: str) -> Optional[TensorValue]:
        return self.calls[0].params.get(name)

    # -- kept entries ----------------------------------------------------------------------

    @staticmethod
    def kept(value: Optional[TensorValue], dim: int) -> Optional[torch.Tensor]:
        """Indices kept along a dimension, or ``None`` when all are kept."""
        if value is None or not value.kept:
            return None
        return value.kept[value.dim(dim)]

    def kept_param(self, name: str, dim: int) -> Optional[torch.Tensor]:
        return self.kept(self.param_value(name), dim)

    def count(self, value: Optional[TensorValue], dim: int) -> int:
        kept = self.kept(value, dim)
        return value.shape[value.dim(dim)] if kept is None else int(kept.numel())

    def param(self, name: str) -> Optional[Tensorish]:
        """The parameter or buffer ``name`` of the module, sliced to its kept entries."""
        value = self.param_value(name)
        if value is None:
            return _get(self.module, name)
        return self.slicer.slice(value)

    def masked(self, name: str, kept: Optional[list] = None) -> Optional[torch.Tensor]:
        """The parameter or buffer ``name`` holding the masked model's values, on its device (detached):
        whole, or the entries ``kept`` selects (per dimension: indices, or None for all). For a rule
        that selects entries itself or folds removed ones.

        Read parameters through this or :meth:`param`, not as the module's attributes: the module
        may still hold its own values of a masked weight (see :attr:`~speedup.rule.ModuleRule.lazy_masks`).
        """
        value = self.param_value(name)
        if value is None:
            tensor = _get(self.module, name)
            return None if tensor is None else gather_kept(tensor.detach(), kept or [])
        if kept is None:
            return value.data.detach()
        return masked_entries(value, kept)

    @property
    def changed(self) -> bool:
        """Whether any dimension of the module's parameters, inputs or outputs lost entries."""
        for node in self.calls:
            for value in node.inputs + node.outputs:
                if any(k is not None for k in value.kept):
                    return True
        return False

    # -- constants to fold -------------------------------------------------------------------

    def removed(self, value: TensorValue, dim: int) -> torch.Tensor:
        """Indices of entries removed along a dimension."""
        kept = self.kept(value, dim)
        n = value.shape[value.dim(dim)]
        if kept is None:
            return torch.empty(0, dtype=torch.long)
        mask = torch.ones(n, dtype=torch.bool)
        mask[kept] = False
        return mask.nonzero().reshape(-1)

    def may_fold(self, dim: int, input_index: int = 0, value: Optional[TensorValue] = None) -> bool:
        """Whether removed entries of an input along ``dim`` may hold non-zero constants to fold
        (False decided without listing them: the usual case). See :meth:`removed_input_constants`."""
        value = self.input(input_index) if value is None else value
        consts = _dim_consts(value, dim)
        return consts is not None and self.kept(value, dim) is not None and bool(consts.nonzero_const.any())

    def removed_input_constants(self, dim: int, input_index: int = 0,
                                value: Optional[TensorValue] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Removed entries of an input along ``dim`` and the constant each holds (0 where unused).

        The analysis only lets an input entry go when the module does not need it: either its
        weights are zero (its value does not matter) or it is a constant the module folds. Every
        call of a shared module must hold the same constants there; the analysis ensures it.
        ``value`` names the input where it is no tensor argument of its own (a packed sequence's rows).
        """
        value = self.input(input_index) if value is None else value
        removed = self.removed(value, dim)
        consts = _dim_consts(value, dim)
        if consts is None:
            return removed, torch.zeros(removed.numel(), dtype=torch.float64)
        return removed, consts.value[removed]

    # -- the seed API's view ---------------------------------------------------------------

    def seed_masks(self) -> tuple:
        node = self.calls[0]
        return seed_masks([v for v in node.args if isinstance(v, TensorValue)], node.outputs, node.params)


def _dim_consts(value: TensorValue, dim: int) -> Optional[DimConst]:
    """The constants the analysis found along one dimension of a value, if any."""
    consts = value.consts[value.dim(dim)] if value.consts else None
    return consts if isinstance(consts, DimConst) else None


def seed_masks(inputs: list[TensorValue], outputs: list[TensorValue], params: dict[str, TensorValue]) -> tuple:
    """``(input_masks, output_mask, weight_masks)`` as NNI's ``customized_replace_func`` takes them:
    tensors shaped like each input, the output and each parameter, 1 where an entry is kept."""
    output = _kept_mask(outputs[0]) if outputs else None
    return [_kept_mask(v) for v in inputs], output, {name: _kept_mask(v) for name, v in params.items()}


def _kept_mask(value: TensorValue) -> torch.Tensor:
    mask = torch.ones(value.shape)
    for d, kept in enumerate(value.kept or []):
        if kept is not None:
            keep = torch.zeros(value.shape[d])
            keep[kept] = 1.0
            shape = [1] * value.ndim
            shape[d] = -1
            mask = mask * keep.reshape(shape)
    return mask


def _get(module: nn.Module, name: str) -> Any:
    """What ``module`` holds under the dotted ``name`` (itself for ``""``)."""
    for part in name.split(".") if name else []:
        module = getattr(module, part)
    return module


@dataclass
class ReplacementReport:
    """Which modules were rebuilt and which parameters sliced, with shapes before and after."""

    modules: dict[str, tuple[str, dict[str, tuple[tuple, tuple]]]] = field(default_factory=dict)
    parameters: dict[str, tuple[tuple, tuple]] = field(default_factory=dict)
    attributes: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    """``"module.attribute"``: (value before, value after), for size attributes that changed."""
    pairs: list[tuple[nn.Module, nn.Module]] = field(default_factory=list)
    """(old module, the module that replaced it)."""
    put_back: Optional[PutBackConstants] = None
    """The hook putting removed constant channels back into the returned tensors, if any went."""
    warnings: list[str] = field(default_factory=list)


CustomReplace = Callable[[nn.Module, tuple], nn.Module]


def _given(module: nn.Module, tx: Transaction) -> nn.Module:
    """The module, given to a user's replacement function: one that changes it in place and returns it
    (slicing its weight, setting ``out_features``: a common way to write them) is undone on failure."""
    tx.keep_modules(module)
    return module


def replace(
    model: nn.Module,
    graph: Graph,
    tx: Transaction,
    rule_of: Callable[[nn.Module], Optional[ModuleRule]],
    custom_of: Callable[[nn.Module], Optional[CustomReplace]],
    sizes_of: Callable[[nn.Module], Optional[SizeAttributes]] = lambda module: None,
    companions_of: Callable[[nn.Module], Optional[Companions]] = lambda module: None,
) -> ReplacementReport:
    """Applies the kept entries recorded on ``graph``'s values to ``model``."""
    report = ReplacementReport()
    slicer = ParamSlicer()
    places = registered_places(model)
    shapes: dict[int, tuple] = {}  # id(rebuilt module) -> its entry in report.modules
    for name, calls in graph.module_calls.items():
        module = calls[0].module
        plan = ModulePlan(module, name, calls, slicer)
        if not plan.changed:
            continue
        custom = custom_of(module)
        if custom is not None:
            new = custom(_given(module, tx), plan.seed_masks())
        else:
            new = rule_of(module).replace(module, plan)
        report.warnings.extend(plan.warnings)
        _put(model, module, new, places, tx, report)
        report.modules[name] = shapes[id(module)] = (type(module).__name__, _param_shapes(calls[0], new))
    for name, boundary in graph.observed.items():
        custom = custom_of(boundary.module)
        if custom is None or not _boundary_changed(boundary):
            continue
        prefix = f"{name}." if name else ""
        params = {key[len(prefix):]: v for key, v in graph.parameters.items() if key.startswith(prefix)}
        new = custom(_given(boundary.module, tx), seed_masks(boundary.inputs, boundary.outputs, params))
        _put(model, boundary.module, new, places, tx, report)
        report.modules[name] = shapes[id(boundary.module)] = (type(boundary.module).__name__, {})
    _retie(model, places, shapes, tx, report)
    rebuilt = {id(m) for old, _ in report.pairs for m in old.modules()}
    holders: Optional[dict[int, list[tuple[nn.Module, str]]]] = None
    for value in graph.parameters.values():
        if all(k is None for k in value.kept) or value.owner is None:
            continue
        owner, attr = value.owner
        if all(_holds(node, value) for node in value.consumers):
            continue  # only the modules holding it read it: each rebuilt one took its sliced copy
        holders = _tensor_holders(model) if holders is None else holders
        sliced = slicer.slice(value)
        # Every module holding it gets the sliced one: a tied weight (BART's shared embedding, held by
        # the encoder's and the decoder's embedding too) stays one tensor. So does one a rebuilt module
        # holds and the code reads from elsewhere too (a ParameterList listing a layer's weight).
        for holder, name in holders.get(id(value.tensor), [(owner, attr)]):
            if id(holder) not in rebuilt:
                tx.set_attr(holder, name, sliced)
        if id(owner) not in rebuilt:
            report.parameters[value.name] = (value.shape, tuple(_kept_shape(value)))
            _slice_companions(owner, attr, value, companions_of, tx)
    if report.modules or report.parameters:
        _update_sizes(model, sizes_of, tx, report)
    report.put_back = put_back_constants(model, graph, tx)
    return report


def _slice_companions(owner: nn.Module, attr: str, value: TensorValue, companions_of, tx: Transaction) -> None:
    """Tensors a plugin says follow ``owner.attr`` (see ``RuleRegistry.add_companions``), of its shape,
    lose the entries it lost."""
    listed = companions_of(owner)
    for path, followed in (listed(owner).items() if listed is not None else ()):
        parents, _, name = path.rpartition(".")
        holder = _get(owner, parents)
        tensor = getattr(holder, name, None)
        if followed != attr or not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != tuple(value.shape):
            continue
        sliced = gather_kept(tensor.detach(), value.kept).contiguous()
        tx.set_attr(holder, name, nn.Parameter(sliced, tensor.requires_grad) if isinstance(tensor, nn.Parameter)
                    else sliced)


def _holds(node: Node, value: TensorValue) -> bool:
    """Whether ``value`` is one of a module node's own parameters (not an input it was passed)."""
    return node.kind is NodeKind.MODULE and any(p is value for p in node.params.values())


def _update_sizes(model: nn.Module, sizes_of, tx: Transaction, report: ReplacementReport) -> None:
    """Sets the size attributes that plugins derive from a module's (already rebuilt) parts."""
    copied: set[str] = set()
    for name, module in model.named_modules():
        sizes = sizes_of(module)
        if sizes is None:
            continue
        for path, value in sizes(module).items():
            parents, _, attr = path.rpartition(".")
            owner = _get(module, parents)  # "config.hidden_size": set on the object the module holds
            before = getattr(owner, attr, None)
            if before == value:
                continue
            held = parents.partition(".")[0]
            if held and held not in copied:
                copied.add(held)
                _own_copies(model, held, tx)
                owner = _get(module, parents)
            tx.set_attr(owner, attr, value)
            report.attributes[f"{name}.{path}" if name else path] = (before, value)


def _own_copies(model: nn.Module, attr: str, tx: Transaction) -> None:
    """Gives the model its own copies of the objects its modules hold as ``attr`` before sizes are
    written into them.

    Such an object (a Hugging Face config) is often shared beyond the model: the user's variable,
    another model built from the same config. Written in place, that other model's config would state
    the sizes of this one. The objects are copied together, so that references among them (a
    multimodal config holding its vision tower's) and between modules (every layer holding the
    model's config) stay shared within the model. An object that cannot be copied is written in place.
    """
    holders = [(module, getattr(module, attr)) for module in model.modules()
               if attr in vars(module) and not isinstance(vars(module)[attr], (nn.Module, torch.Tensor))]
    memo: dict[int, Any] = {id(part): part for part in _parts(model)}  # shared, never copied
    try:
        copies = [copy.deepcopy(held, memo) for _, held in holders]
    except Exception:  # noqa: BLE001 - any failure of a foreign __deepcopy__ leaves the objects as they are
        return
    for (module, _), held_copy in zip(holders, copies):
        tx.set_attr(module, attr, held_copy)


def _parts(model: nn.Module) -> list:
    return [*model.modules(), *model.parameters(), *model.buffers()]


def _put(model: nn.Module, old: nn.Module, new: nn.Module, places, tx: Transaction, report: ReplacementReport) -> None:
    report.pairs.append((old, new))
    if new is not old:
        for parent, attr in places.get(id(old), []):
            if compiled_inner(parent) is old and hasattr(parent, "dynamo_ctx"):  # it calls the module it was made for
                for owner, name in places.get(id(parent), []):
                    tx.set_attr(owner, name, type(parent)(new, parent.dynamo_ctx))
            else:
                tx.set_attr(parent, attr, new)


def _retie(model: nn.Module, places, shapes: dict[int, tuple], tx: Transaction, report: ReplacementReport) -> None:
    """Modules tied to a rebuilt one become its twins, so that they stay tied.

    Two modules holding the very same parameters (an encoder's input embedding and the model's
    ``shared`` one) are one module under two names, of which the model calls one. The other gets a
    copy of the rebuilt module holding the same new parameters (the tie holds; each name still
    has its own module object, as before).
    """
    rebuilt = {(type(old), _own_tensors(old)): (old, new) for old, new in report.pairs if new is not old}
    held = {tensor_id for _, tensors in rebuilt for _, tensor_id in tensors}
    parts = {id(part) for _, new in rebuilt.values() for part in new.modules()}  # a norm inside its GatheredNorm
    for name, module in list(model.named_modules()) if rebuilt else ():
        if not any(id(t) in held for t in module._parameters.values()) and \
                not any(id(t) in held for t in module._buffers.values()):
            continue  # holds none of the rebuilt modules' tensors: the usual case, decided without sorting
        if id(module) in parts:
            continue
        old, new = rebuilt.get((type(module), _own_tensors(module)), (None, None))
        if old is not None and module is not old and _own_tensors(module):
            _put(model, module, _twin(new), places, tx, report)
            report.modules[name] = shapes[id(old)]


def _own_tensors(module: nn.Module) -> tuple:
    """(name, id) of the parameters and buffers a module holds itself."""
    held = list(module._parameters.items()) + list(module._buffers.items())
    return tuple(sorted((name, id(t)) for name, t in held if t is not None))


def _twin(module: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` sharing its parameters, buffers and children."""
    twin = copy.copy(module)
    twin._parameters = dict(module._parameters)
    twin._buffers = dict(module._buffers)
    twin._modules = dict(module._modules)
    return twin


def _boundary_changed(boundary) -> bool:
    return any(any(k is not None for k in v.kept) for v in boundary.inputs + boundary.outputs)


def _kept_shape(value: TensorValue) -> list[int]:
    return [value.shape[d] if k is None else int(k.numel()) for d, k in enumerate(value.kept)]


def _param_shapes(node: Node, new: nn.Module) -> dict[str, tuple[tuple, tuple]]:
    shapes = {}
    for name, value in node.params.items():
        try:
            after = tuple(_get(new, name).shape)
        except AttributeError:
            after = ()
        if after != value.shape:
            shapes[name] = (value.shape, after)
    return shapes


def _tensor_holders(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """``id(tensor) -> [(module, attribute)]`` for every parameter and buffer of every module."""
    holders: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in {id(m): m for m in model.modules()}.values():
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                if tensor is not None:
                    holders.setdefault(id(tensor), []).append((module, name))
    return holders


def registered_places(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """Every (parent, attribute) under which each submodule is registered (walked without the names
    ``named_modules`` builds: twice as fast on densenet201's 700 modules)."""
    places: dict[int, list[tuple[nn.Module, str]]] = {}
    stack, seen = [model], {id(model)}
    while stack:
        parent = stack.pop()
        for attr, child in parent._modules.items():
            if child is not None:
                places.setdefault(id(child), []).append((parent, attr))
                if id(child) not in seen:
                    seen.add(id(child))
                    stack.append(child)
    return places
