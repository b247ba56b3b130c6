"""The speedup pipeline: masks -> trace -> propagate -> decide -> replace -> verify.

Everything is done inside a :class:`~speedup.transaction.Transaction`, so any failure leaves the
user's model exactly as it was.

Verification runs the sped-up model once more, recorded, on the dummy input: every operator must
produce the shape the plan expects, and the outputs must equal the masked model's. Python code
sometimes hard-codes a size (``x.view(b, 512, 7, 7)``, a stale ``self.num_heads``); the operator
where the shapes first differ (or that raises) is then kept at its full size and the plan is
redone. That costs one more pass, is reported, and never yields a wrong model.
"""

from __future__ import annotations

import contextlib
import gc
import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional, Union

import torch
import torch.utils._pytree as pytree
from torch import nn

from . import tensor_masks
from .alias_writes import alias_write_rule
from .attention_shapes import attention_calls_noted, departs_from_plan
from .computed_weights import freeze_computed_weights
from .equivalent_forms import put_back_unchanged, put_equivalent_forms
from .errors import RuleError, SpeedupError, TraceError, VerificationError
from .flops import FlopCounter
from .graph import Graph, Node, NodeKind, within_scope
from .lazy_masks import LazyMasks
from .leftovers import masked_but_kept
from .masks import MaskSource, load_masks
from .parametrized import Frozen, freeze_parametrized, put_back_unfrozen
from .planning import decide
from .plugins.manager import loaded_plugins
from .propagation import Analysis
from .random_draws import RandomDraws
from .refill import Refill, refill, refill_pinning_modules
from .refill import install as install_refills
from .replacement import CustomReplace, replace
from .report import Barrier, ShrinkReport
from .rule import ModuleRule, OpRule
from .size_numbers import (changed_number, counterparts, may_pass_shrunk_sizes, numbers_passed, shrunk_sizes,
                           sizes_behind)
from .stale_sizes import StoredSizes
from .tracer import (RuleFailed, Trace, TracingFailed, fused_attention_off, iter_tensors, ordinary_inputs,
                     ordinary_mode, trace)
from .transaction import Transaction
from .wrappers import eager_model

_MAX_ATTEMPTS = 64


class SpeedupWarning(UserWarning):
    """Something the user should know: a barrier, a layer kept because all its channels were masked."""


CustomReplacements = Mapping[Union[type, str], CustomReplace]


@dataclass
class _Rules:
    """The rules that apply in one call: plugins, overridden per module type by the user's functions."""

    custom: dict

    def __post_init__(self) -> None:
        self.registry = loaded_plugins().registry
        self._recognised: dict[int, Optional[ModuleRule]] = {}

    def module_rule(self, module: nn.Module) -> Optional[ModuleRule]:
        if self.registry.has_conflict(module) and self.custom_for(module) is not None:
            return None  # the user's function settles the conflict: the module is traced through
        rule = self.registry.module_rule(module)
        if rule is not None or not self.registry.recognisers or self.custom_for(module) is not None:
            return rule
        key = id(module)  # the model holds its modules for the whole call
        if key not in self._recognised:
            self._recognised[key] = self.registry.recognised_rule(module)
        return self._recognised[key]

    def custom_for(self, module: nn.Module) -> Optional[CustomReplace]:
        kind = type(module)
        for key in (kind, kind.__name__, kind.__qualname__, f"{kind.__module__}.{kind.__qualname__}"):
            if key in self.custom:
                return self.custom[key]
        return None

    def claims(self, module: nn.Module) -> bool:
        return self.module_rule(module) is not None

    def claims_or_replaces(self, module: nn.Module) -> bool:
        """Whether a rule or the user's function knows the module as a whole."""
        return self.custom_for(module) is not None or self.claims(module)

    def for_node(self, node: Node):
        if node.kind is NodeKind.MODULE:
            return self.module_rule(node.module)
        if node.kind is NodeKind.OP:
            return self.registry.op_rule(node.target)
        return alias_write_rule(node)


def shrink(
    model: nn.Module,
    masks: MaskSource,
    example_inputs: Any,
    *,
    customized_replace_func: Optional[CustomReplacements] = None,
    map_location: Any = None,
    batch_dim: int = 0,
    verify: bool = True,
) -> ShrinkReport:
    """Removes, in place, every channel of ``model`` that ``masks`` make zero, constant or unused.

    :param model: the model to shrink; changed in place (it is left untouched if anything fails).
    :param masks: ``{module_name: {"weight": mask, ...}}`` or a path to such a dict saved with
        ``torch.save``; see :mod:`speedup.masks` for every accepted layout.
    :param example_inputs: a tensor, a tuple/list of positional inputs, or a dict of keyword
        inputs, with which ``model`` is run to record it. Put it on the model's device.
    :param customized_replace_func: ``{module class or class name: fn(module, masks) -> module}``,
        overriding every plugin for those modules (``masks`` is ``(input_masks, output_mask,
        weight_masks)``, 1 where an entry is kept, as NNI documents it).
    :param map_location: where to load mask tensors, as in ``torch.load``.
    :param batch_dim: the batch dimension of the inputs (input/output masks must not vary along it).
    :param verify: compare the result with the masked model on ``example_inputs`` (recommended). It is
        also what keeps code that reads sizes in step: sizes a module stored (``self.num_heads``), shapes
        written in the code, scales computed from a size (``C ** -0.5``) are found where the verification
        fails, and set or kept whole. Without it, such a model may raise or compute otherwise.
    :returns: a :class:`~speedup.report.ShrinkReport` of what changed.
    """
    started = time.perf_counter()
    timings: dict[str, float] = {}
    model = eager_model(model)
    rules = _Rules(dict(customized_replace_func or {}))
    tx = Transaction()
    tx.keep_attributes(model)
    draws = RandomDraws()
    try:
        with ordinary_mode(), _collector_paused():
            args, kwargs = split_inputs(example_inputs)
            params_before = _count_parameters(model)  # as the user holds them (a weight norm's two tensors)
            frozen = freeze_parametrized(model, tx)  # masks name the tensors the model computes
            checked_masks = load_masks(masks, model, map_location, batch_dim)
            for f in frozen:  # torch.nn.utils.prune's masks, carried by the model
                for name, mask in f.twin.masks.items():
                    checked_masks.join(f"{f.form.name}.{name}", mask, getattr(f.form.form, name))
            frozen += freeze_computed_weights(model, checked_masks, tx, rules.claims_or_replaces)
            report = _run(model, checked_masks, args, kwargs, rules, tx, timings, verify, frozen, draws, params_before)
    except BaseException:
        tx.rollback()
        raise
    finally:
        draws.replay()
    timings["total"] = time.perf_counter() - started
    report.timings = timings
    for message in report.warnings:
        warnings.warn(message, SpeedupWarning, stacklevel=2)
    if report.barriers:
        kinds = sorted({b.op for b in report.barriers})
        warnings.warn(
            f"no rule covers {', '.join(kinds)}; nothing was removed across {len(report.barriers)} such call(s) "
            "(see report.barriers). A plugin can add a rule for them.",
            SpeedupWarning,
            stacklevel=2,
        )
    return report


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Pauses Python's cyclic garbage collector for the call.

    The call makes tens of thousands of small objects (a value per tensor, a node per operator);
    each time enough of them pile up, the collector scans every object alive, the model's included.
    That took a quarter of the call on densenet201. Nothing made during the call needs collecting
    before it ends; the collector runs as usual afterwards.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def split_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """Positional and keyword inputs, those made under ``torch.inference_mode`` copied as ordinary
    tensors (see :func:`~speedup.tracer.ordinary_mode`, under which this is called)."""
    if isinstance(example_inputs, Mapping):
        return (), ordinary_inputs(dict(example_inputs))
    if isinstance(example_inputs, (tuple, list)):
        return ordinary_inputs(tuple(example_inputs)), {}
    return ordinary_inputs((example_inputs,)), {}


def _run(model, masks, args, kwargs, rules: _Rules, tx: Transaction, timings, verify: bool,
         frozen: list[Frozen], draws: RandomDraws, params_before: int) -> ShrinkReport:
    clock = _Clock(timings)
    flags = {id(m): m.training for m in model.modules()}
    forms = put_equivalent_forms(model, rules.registry, tx, lambda module: rules.custom_for(module) is not None)
    flags.update({id(part): f.module.training for f in forms for part in f.own_parts})
    mode_aware = _mode_aware(model)
    tx.on_rollback(lambda: _reset_mode_caches(mode_aware))  # first in, so undone last: on the restored model
    tx.set_training(model, False)
    lazy = LazyMasks(model, masks, tx, (lambda module: rules.custom_for(module) is not None) if rules.custom else None)
    for name in masks.parameters:
        if name not in lazy.names:
            tx.zero_masked(masks.masked[name], masks.pattern(name))
    holders = tensor_masks.install(model, masks.tensors, tx)
    clock.lap("zero masked")
    known = tuple((name, holder, "mask") for name, holder in holders)
    observe = lambda m: rules.custom_for(m) is not None  # noqa: E731 - a tiny predicate
    try:
        draws.replay()
        recorded = trace(model, args, kwargs, rules.claims, observe, known, rules.registry.is_state,
                         lazy.by_id, lazy.mask_for_good, lazy.masked_forwards(model, rules.module_rule),
                         lambda module: getattr(rules.module_rule(module), "unrecorded_forward", False),
                         boundaries=verify, keep_values=tx.keep_values, op_rule=rules.registry.op_rule)
    except TracingFailed as failure:
        if isinstance(failure.error, RuleFailed):
            raise _rule_error(failure.error, model, rules) from failure.error.error
        raise _trace_error(failure, args, kwargs) from failure.error
    clock.lap("trace")
    graph = recorded.graph
    lazy.mask_where_modules_are_read(graph, rules.module_rule)
    analysis = Analysis(graph, rules.for_node, OpRule())
    for name in masks.parameters:
        if name in graph.parameters:  # the analysis runs on the CPU (see TensorValue.host)
            analysis.add_mask(graph.parameters[name], masks.pattern(name).cpu())
    analysis.no_fold = {name for name, calls in graph.module_calls.items() if rules.custom_for(calls[0].module)}
    report = ShrinkReport(params_before=params_before, flops_before=recorded.flops)
    pinned: set[int] = set()
    pinned_dims: dict[int, set[int]] = {}
    sizes = StoredSizes(model, graph)
    refills: list[Refill] = []
    savepoint = tx.savepoint()
    layout_hidden = any(n.rule.hides_layout(n) for n in graph.nodes if n.kind is NodeKind.OP and n.rule is not None)
    for attempt in range(_MAX_ATTEMPTS):
        analysis.couple(frozenset(pinned), pinned_dims)
        if attempt == 0 and not rules.custom:
            # A claimed module the masks leave alone that keeps a dimension of its input whole (a
            # Conv1d along the channels) is refilled rather than keep it whole around it.
            # A mask keeping every entry (a per-layer pruner gives one to every layer) masks nothing.
            unmasked = lambda node: all(bool(masks.parameters[p.name].all())  # noqa: E731
                                        for p in node.params.values() if p.name in masks.parameters)
            found = refill_pinning_modules(graph, analysis, unmasked)
            if found:
                refills.extend(f for _, f in found)
                pinned.update(node.index for node, _ in found)
                analysis.couple(frozenset(pinned), pinned_dims)
        analysis.propagate(frozenset(pinned))
        report.barriers = _barriers(analysis.barriers)
        plan = decide(graph, analysis.solution)
        clock.lap("propagate")
        replaced = replace(model, graph, tx, rules.module_rule, rules.custom_for, rules.registry.size_attributes,
                           rules.registry.companions_of)
        sizes.apply(tx, replaced.attributes)
        report.refilled = install_refills(refills, tx)
        lazy.mask_what_remains(model)
        _reset_mode_caches(mode_aware)
        clock.lap("replace")
        if not verify:
            break
        at_risk = bool(sizes.fixes) or may_pass_shrunk_sizes(graph)
        check = _verify(model, args, kwargs, recorded, rules, replaced, draws, numbers_at_risk=at_risk,
                        layout_hidden=layout_hidden)
        clock.lap("verify")
        if check.ok:
            if sizes.fixes:
                checks = [check]
                sizes.put_back_needless(tx, replaced.attributes, lambda: _passes(checks, _verify(
                    model, args, kwargs, recorded, rules, replaced, draws, numbers_at_risk=True,
                    layout_hidden=layout_hidden)))
                check = checks[-1]
            report.max_abs_diff = check.max_abs_diff
            break
        tx.rollback(savepoint)
        if graph.non_finite_outputs is None:  # what an error would say; not worth a pass when all verifies
            graph.non_finite_outputs = [i for i, t in enumerate(iter_tensors(recorded.output, rules.registry.is_state))
                                        if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        tried, blamed = sizes.next_choice(check.node)
        if not tried:
            if blamed is not check.node:
                check = _Check(False, blamed, f"no stored size fits every call reading it ({check.reason})")
            reason = _keep_more(graph, check, pinned, pinned_dims, refills if not rules.custom else None)
            report.kept_for_verification.append(f"{check.node.describe()}: {reason}" if check.node else reason)
    else:
        raise VerificationError("too many operators needed their full size; the model was left unchanged.")
    tensor_masks.drop_all_ones(holders, tx)
    rebuilt = {id(old) for old, new in replaced.pairs if new is not old}
    forms = put_back_unchanged(forms, rebuilt, tx)
    plain, frozen_warnings = put_back_unfrozen(frozen, rebuilt, masks, tx)
    _restore_training(model, flags, replaced)
    report.modules, report.parameters, report.attributes = replaced.modules, replaced.parameters, replaced.attributes
    report.forms = {f.name: (type(f.module).__name__, type(f.form).__name__) for f in forms + plain}
    report.warnings = (masks.warnings + plan.warnings + replaced.warnings + _unused_warning(model, graph, replaced)
                       + frozen_warnings + _training_warning(model, flags, replaced))
    report.params_after = _count_parameters(model)
    report.count_flops_after = lambda: _count_flops(model, args, kwargs)
    report.find_masked_but_kept = lambda: masked_but_kept(model, masks.parameters)
    graph.release()
    return report


def _unused_warning(model: nn.Module, graph: Graph, replaced) -> list[str]:
    """Modules whose parameters the dummy input never reached keep their sizes: say so, when something
    around them shrank (an auxiliary head that only runs in training no longer fits its input)."""
    if not (replaced.modules or replaced.parameters):
        return []
    reached = set(graph.module_calls) | set(replaced.modules)
    holding, holding_reached = set(), set()  # modules holding parameters (in their subtree); those reached
    for name, _ in model.named_parameters():
        prefixes = _module_and_parents(name.rpartition(".")[0])
        holding.update(prefixes)
        if name in graph.parameters:
            holding_reached.update(prefixes)
    outermost: dict[str, None] = {}  # in model order
    for name, _ in model.named_modules():
        enclosing = _module_and_parents(name)
        if name in holding and name not in holding_reached and not any(p in reached or p in outermost for p in enclosing):
            outermost[name] = None
    if not outermost:
        return []
    listed = ", ".join(f"'{m or '<model>'}'" for m in list(outermost)[:6]) + (" ..." if len(outermost) > 6 else "")
    return [f"{listed} did not run on the dummy input and kept their sizes. If they run in another mode (an "
            "auxiliary head in training), they may no longer fit the smaller model: remove them, or speed up with a "
            "dummy input that runs them."]


def _training_warning(model: nn.Module, flags: dict[int, bool], replaced) -> list[str]:
    """A model handed in training mode is sped up as it computes in eval mode (where it is verified):
    say so when something changed, for what removed channels carry differs in training mode."""
    if not flags[id(model)] or not (replaced.modules or replaced.parameters):
        return []
    return ["the model was in training mode: it was sped up as it computes in eval mode (BatchNorm with its running "
            "statistics, no dropout), where it equals the masked model; constants of removed channels are folded as "
            "eval mode computes them, which batch statistics in training mode would change. Call model.eval() first "
            "to silence this."]


def _mode_aware(model: nn.Module) -> list[nn.Module]:
    """The modules whose class overrides ``train`` (see :func:`_reset_mode_caches`)."""
    return [m for m in model.modules() if type(m).train is not nn.Module.train]


def _reset_mode_caches(modules: list[nn.Module]) -> None:
    """Sets the mode again on modules whose class overrides ``train``, keeping every flag as it is.

    Such modules may cache tensors derived from their parameters while in eval mode (timm's TinyViT
    and LeViT keep their attention biases, gathered from a table) and drop them when the mode is
    set. The recording fills the cache from the full-size parameters: it must be dropped once they
    are sliced (or restored), or the model would go on reading it.
    """
    for module in modules:
        flags = [(m, m.training) for m in module.modules()]
        module.train(module.training)
        for m, flag in flags:
            m.training = flag


def _keep_more(graph: Graph, check: "_Check", pinned: set[int], pinned_dims: dict[int, set[int]],
               refills: Optional[list[Refill]] = None) -> str:
    """Keeps more of the model whole after a failed verification, blaming ``check.node``: some of its
    dimensions (its rule says which), else the whole call, else the module around it, refilled where
    that can be done (``refills``, see :mod:`speedup.refill`); returns the reason, saying what was
    kept. Raises when nothing more can be kept."""
    node, reason = check.node, check.reason
    if check.returned_sizes and _keep_dims_of_sizes(graph, None, set(check.returned_sizes), pinned, pinned_dims):
        return reason + f" (the dimensions of size {', '.join(map(str, sorted(check.returned_sizes)))} kept)"
    if check.number_changed and node is not None:
        shrunk = shrunk_sizes(graph)
        sizes = set().union(*(sizes_behind(number, shrunk) for number in numbers_passed(node)))
        # The size read is most likely one of what the call computes from (RAFT's correlation divided
        # by the square root of its features' width): those dimensions first, then the module's.
        scopes = (_keep_dims_of_sizes(graph, node, sizes, pinned, pinned_dims, _ancestors(node))
                  or _keep_dims_of_sizes(graph, node, sizes, pinned, pinned_dims))
        if scopes:
            return reason + f" (the dimensions of that size in {', '.join(scopes)} kept)"
    if node is None:
        if refills:  # the outputs differ where no call departed: keep the last refilled module's inputs whole
            undone = refills.pop()
            undone.undo(graph)
            return reason + f" ('{undone.boundary.name}' no longer refilled)"
        raise _unverifiable(reason, graph)
    if node.index in pinned:
        # Keeping the call whole was not enough: its sizes come from elsewhere (a literal computed
        # from another tensor's shape, as ``C // self.num_heads``). Keep the code around it whole,
        # refilled; where it cannot be refilled (the model's own forward), first the dimensions of the
        # sizes it passed otherwise (``qkv.split(D)``, ``D`` read from the stream).
        scope = _enclosing_unpinned_scope(graph, node, pinned)
        found = refill(graph, graph.observed.get(scope)) if refills is not None and scope is not None else None
        if found is None:
            sizes = _sizes_read_elsewhere(node, check.again) & shrunk_sizes(graph)
            scopes = _keep_dims_of_sizes(graph, node, sizes, pinned, pinned_dims)
            if scopes:
                listed = ", ".join(map(str, sorted(sizes)))
                return reason + f" (the dimensions of size {listed} in {', '.join(scopes)} kept)"
        if scope is None:
            raise _unverifiable(reason, graph)
        kept = [scope]
        if found is not None:
            refills.append(found)
            # Modules of the same class and sizes run the same code: what one needed, those that can
            # be refilled as well get at once.
            for name in _same_modules(graph, scope, pinned):
                other = refill(graph, graph.observed[name])
                if other is not None:
                    refills.append(other)
                    kept.append(name)
        for name in kept:
            boundary = graph.observed.get(name)
            pinned.update(n.index for n in graph.nodes if n.kind is not NodeKind.REFILL and (
                within_scope(n.scope, name) or (boundary is not None and boundary.ran(n))))
        listed = ", ".join(f"'{name or '<model>'}'" for name in kept)
        return reason + f" (everything in {listed} kept{'; inputs refilled' if found else ''})"
    dims = None if node.index in pinned_dims else node.rule.keep_after_departure(node, check.again)
    # The same line of code makes the same call in every block of a network (a literal ``split(26)``
    # in each of Res2Net's): what one call needed, every such call gets at once.
    for call in [node] + _same_calls(graph, node, pinned):
        if dims is None or max(dims) >= call.outputs[0].ndim:
            pinned.add(call.index)  # the whole call; also where keeping some dimensions was not enough
        else:
            pinned_dims[call.index] = dims
    if dims is None:
        return reason
    return reason + f" (dimension{'s' if len(dims) > 1 else ''} {', '.join(map(str, sorted(dims)))} kept)"


def _sizes_read_elsewhere(node: Node, again: Optional[Node]) -> set[int]:
    """The integers ``node`` passed (sizes, split sizes, shapes) that its call in the sped-up model,
    ``again``, passed otherwise though the call was to keep its sizes: sizes the code read elsewhere."""
    if again is None:
        return set()
    before, after = _integers(list(node.args) + list(node.kwargs.values())), _integers(
        list(again.args) + list(again.kwargs.values()))
    if len(before) != len(after):
        return set()
    return {b for b, a in zip(before, after) if a != b}


def _integers(args: list) -> list[int]:
    found: list[int] = []
    for arg in args:
        if type(arg) is int:
            found.append(arg)
        elif isinstance(arg, (list, tuple)):
            found += _integers(list(arg))
    return found


def _keep_dims_of_sizes(graph: Graph, node: Optional[Node], sizes: set[int], pinned: set[int],
                        pinned_dims: dict[int, set[int]], among: Optional[set[int]] = None) -> list[str]:
    """Keeps whole the dimensions of the given full ``sizes`` (those a number or size ``node`` passes
    was read or computed from, see :mod:`speedup.size_numbers`), wherever the plan shrank them in the
    module that ran ``node`` and in those running the same line of code (only the calls ``among``
    where given): the code reads the size of one of them; without ``node``, in the whole model. Returns
    those modules' names (none where nothing more was kept)."""
    if not sizes:
        return []
    scopes = [""] if node is None else sorted({call.scope for call in [node] + _same_calls(graph, node, pinned)})
    found = False
    for call in graph.nodes:
        if call.index in pinned or not call.outputs or not any(within_scope(call.scope, s) for s in scopes):
            continue
        if among is not None and call.index not in among:
            continue
        value = call.outputs[0]
        dims = {d for d, kept in enumerate(value.kept)
                if kept is not None and value.shape[d] in sizes and int(kept.numel()) < value.shape[d]}
        if dims - pinned_dims.get(call.index, set()):
            pinned_dims[call.index] = pinned_dims.get(call.index, set()) | dims
            found = True
    return [f"'{scope or '<model>'}'" for scope in scopes] if found else []


def _ancestors(node: Node) -> set[int]:
    """The calls whose results ``node`` is computed from, itself included."""
    seen, todo = {node.index}, [node]
    while todo:
        for value in todo.pop().inputs:
            producer = value.producer
            if producer is not None and producer.index not in seen:
                seen.add(producer.index)
                todo.append(producer)
    return seen


def _unverifiable(reason: str, graph: Graph) -> VerificationError:
    """The error where nothing more can be kept; it names the calls picking entries by rank, if any
    (round-off can pick others where values tie, as RT-DETR's top-k query selection does on random
    weights: then another dummy input, or trained weights, may verify)."""
    ranking = [n for n in graph.nodes if n.kind is NodeKind.OP and n.rule is not None and n.rule.picks_by_rank(n)]
    advice = "Please report this with the model's code."
    if graph.state_written:
        names = ", ".join(graph.state_written[:3]) + (f" and {len(graph.state_written) - 3} more"
                                                      if len(graph.state_written) > 3 else "")
        advice = (f"The model writes in place into {names} while it runs (an observer's statistics, a running "
                  "average): it computes otherwise each time it runs, which no smaller model can follow. Stop "
                  "those writes (for torch.ao fake quantization: model.apply(torch.ao.quantization.disable_observer)) "
                  "and call again; if that does not help, please report this with the model's code.")
    elif graph.non_finite_outputs:
        listed = ", ".join(map(str, graph.non_finite_outputs))
        advice = (f"The masked model itself returns infinities or NaN on the dummy input (output {listed}), from "
                  "values beyond float32 or a division by zero (random weights can make a norm underflow to 0): the "
                  "sped-up model's need not match them. Call again with a dummy input or weights (trained ones) for "
                  "which the masked model's outputs are finite.")
    elif ranking:
        more = f" and {len(ranking) - 1} more" if len(ranking) > 1 else ""
        advice = (f"The model picks entries by rank or compares values exactly ({ranking[0].describe()}{more}): "
                  "where the masked model's values tie, round-off alone makes the sped-up model pick others; try "
                  "another dummy input. If that does not help, please report this with the model's code.")
    return VerificationError(
        f"the sped-up model does not compute what the masked model computes: {reason}. The model was left "
        f"unchanged. {advice}"
    )


def _same_calls(graph: Graph, node: Node, pinned: set[int]) -> list[Node]:
    """Other calls of the same operator made by the same line of code, not pinned yet."""
    if node.kind is not NodeKind.OP or node.location is None:
        return []
    return [n for n in graph.nodes if n is not node and n.same_code(node) and n.index not in pinned and n.outputs]


def _same_modules(graph: Graph, scope: str, pinned: set[int]) -> list[str]:
    """Other modules traced through of the same class as ``scope``'s, holding parameters of the same
    shapes, not all pinned yet (see :attr:`~speedup.graph.Graph.observed`)."""
    boundary = graph.observed.get(scope)
    if boundary is None:
        return []
    module = boundary.module
    shapes = _parameter_shapes(module)
    same = [name for name, other in graph.observed.items() if name != scope and type(other.module) is type(module)
            and _parameter_shapes(other.module) == shapes]
    if not same:
        return []
    unpinned = {n.scope for n in graph.nodes if n.index not in pinned and n.kind is not NodeKind.REFILL}
    return [name for name in same if any(within_scope(s, name) for s in unpinned)]


def _parameter_shapes(module: nn.Module) -> list[tuple[str, tuple]]:
    return [(name, tuple(p.shape)) for name, p in module.named_parameters()]


def _enclosing_unpinned_scope(graph: Graph, node: Node, pinned: set[int]) -> Optional[str]:
    """The innermost module around ``node`` (itself included) whose calls are not all pinned yet."""
    for scope in reversed(_module_and_parents(node.scope)):
        if any(n.index not in pinned and n.kind is not NodeKind.REFILL for n in graph.nodes
               if within_scope(n.scope, scope)):
            return scope
    return None


def _module_and_parents(module: str) -> list[str]:
    """``"a.b"`` -> ``["", "a", "a.b"]``: the module's name and those of the modules holding it."""
    parts = module.split(".") if module else []
    return [""] + [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


class _Clock:
    def __init__(self, timings: dict[str, float]):
        self.timings = timings
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = self.timings.get(name, 0.0) + now - self.last
        self.last = now


def _count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _rule_error(failure: RuleFailed, model: nn.Module, rules: _Rules) -> RuleError:
    name = next((n for n, m in model.named_modules() if m is failure.module), "?")
    rule = type(rules.module_rule(failure.module))
    return RuleError(
        f"the rule {rule.__module__}.{rule.__qualname__} failed to compute the masked output of module '{name}' "
        f"({type(failure.module).__name__}) with {failure}, though the module itself accepts its inputs. This is a "
        "bug in that rule (speedup's own, or the plugin's that gives it): please report it with this message. The "
        "model was left unchanged."
    )


def _trace_error(failure: TracingFailed, args, kwargs) -> SpeedupError:
    if isinstance(failure.error, SpeedupError):
        return failure.error
    shapes = [tuple(t.shape) for t in iter_tensors((args, kwargs))]
    return TraceError(
        f"the model raised {type(failure.error).__name__}: {failure.error} when called with the dummy input "
        f"(tensor shapes {shapes}). Pass a dummy_input that model(*inputs) accepts: a tensor, a tuple of positional "
        "inputs, or a dict of keyword inputs. The model was left unchanged."
    )


def _barriers(nodes: list[Node]) -> list[Barrier]:
    return [Barrier(node.op_name, node.scope, node.location or "") for node in nodes]


@dataclass
class _Check:
    """The outcome of verifying one attempt."""

    ok: bool
    node: Optional[Node] = None
    reason: str = ""
    max_abs_diff: float = 0.0
    again: Optional[Node] = None
    """The blamed call as the sped-up model made it (None where that is not known)."""
    number_changed: bool = False
    """The blamed call passed another number than the one recorded (see :mod:`speedup.size_numbers`)."""
    returned_sizes: frozenset = frozenset()
    """Sizes that shrank which the model returned as numbers (``return y, h.shape[-1]``)."""


def _passes(passed: list[_Check], check: _Check) -> bool:
    """Whether ``check`` passed; if so it is added to ``passed``, whose last is then the model's state."""
    if check.ok:
        passed.append(check)
    return check.ok


def _verify(model, args, kwargs, recorded: Trace, rules: _Rules, replaced, draws: RandomDraws,
            numbers_at_risk: bool = False, layout_hidden: bool = False) -> _Check:
    """Runs the sped-up model on the dummy input, drawing the random numbers the trace drew; on any
    difference, finds the node responsible.

    Where ``numbers_at_risk`` (stored sizes were set, see :mod:`speedup.stale_sizes`, or the code
    passes a number a shrunk size may have given, see :mod:`speedup.size_numbers`), equal outputs
    are not enough: code may compute a scale from a size (``self.head_dim ** -0.5``), and with small
    random weights the changed scale can hide within the tolerance on the dummy input. The sped-up
    model is then recorded again: every call must pass the numbers recorded, and those whose rule
    asks (:attr:`~speedup.rule.Rule.rechecks_shapes`) must make their planned shapes. So must, where
    ``layout_hidden``, the calls whose result on the dummy does not show how their input is laid out
    (see :meth:`~speedup.rule.Rule.hides_layout`), and where an attention call departed from its
    planned shapes in the run (see :mod:`speedup.attention_shapes`)."""
    put_back = replaced.put_back
    if put_back is not None:
        put_back.unfit = False
    try:
        draws.replay()
        with torch.no_grad(), fused_attention_off(), attention_calls_noted() as attention_calls:
            output = model(*args, **kwargs)
    except Exception:  # noqa: BLE001 - located below, by recording the failing run
        return _locate(model, args, kwargs, recorded, rules, replaced, "", draws)
    is_state = rules.registry.is_state
    difference, worst = _compare(recorded.output, output, is_state, _reduced_precision(recorded.graph))
    if difference is None:
        changed = _changed_numbers(recorded.output, output)
        if changed:
            sizes = frozenset(int(a) for a, _ in changed if type(a) is int) & shrunk_sizes(recorded.graph)
            before, after = changed[0]
            return _Check(False, None, f"the model returned the number {after} where {before} was recorded",
                          returned_sizes=sizes)
    if difference is None and put_back is not None and put_back.unfit:
        difference = "a returned tensor lacks the entries planned, which its constants were to be put back around"
    if difference is not None:
        return _locate(model, args, kwargs, recorded, rules, replaced, difference, draws)
    if numbers_at_risk or layout_hidden or departs_from_plan(recorded.graph, attention_calls):
        # It ran above: recording it again raises nothing.
        again = _record_again(model, args, kwargs, rules, replaced, draws)
        for old, new in counterparts(_recorded_calls(recorded), again.graph.nodes):
            rule = old.rule
            rechecked = rule is not None and (rule.rechecks_shapes or layout_hidden and rule.hides_layout(old))
            reason = _unplanned_shape(old, new) if rechecked else None
            if reason is not None:
                return _Check(False, old, reason, again=new)
            reason = changed_number(old, new)
            if reason is not None:
                return _Check(False, old, reason, again=new, number_changed=True)
    return _Check(True, max_abs_diff=worst)


def _recorded_calls(recorded: Trace) -> list[Node]:
    return [n for n in recorded.graph.nodes if n.kind is not NodeKind.REFILL]  # the sped-up model records none


def _record_again(model, args, kwargs, rules: _Rules, replaced, draws: RandomDraws) -> Trace:
    """Records the sped-up model as the model was (its new modules claimed as the old ones were)."""
    new_modules = {id(new) for _, new in replaced.pairs}
    claims = lambda m: rules.claims(m) or id(m) in new_modules  # noqa: E731
    _reset_mode_caches(_mode_aware(model))  # filled by the run
    draws.replay()
    return trace(model, args, kwargs, claims, is_state=rules.registry.is_state, op_rule=rules.registry.op_rule)


def _locate(model, args, kwargs, recorded: Trace, rules: _Rules, replaced, difference: str,
            draws: RandomDraws) -> _Check:
    """Re-records the sped-up model to find the first node whose result is not the planned one."""
    original = _recorded_calls(recorded)
    try:
        again = _record_again(model, args, kwargs, rules, replaced, draws)
    except TracingFailed as failure:
        # The first call that went off-plan is to blame, even if the error comes later (a view
        # with -1 silently makes the wrong shape; an operator further on raises).
        check = _first_departure(original, failure.graph.nodes)
        if check is not None:
            return check
        index = _aligned_end(original, failure.graph.nodes)
        node = original[min(index, len(original) - 1)] if original else None
        call = failure.call if failure.call is not None and node is not None and failure.call.target is node.target else None
        return _Check(False, node, f"{type(failure.error).__name__}: {failure.error}", again=call)
    return _first_departure(original, again.graph.nodes) or _Check(False, None, difference or "the outputs differ")


def _first_departure(original: list[Node], again: list[Node]) -> Optional[_Check]:
    """The first recorded call whose re-recorded counterpart is another call, has unplanned shapes or
    departs otherwise (see :meth:`~speedup.rule.Rule.departs`).

    Recorded calls making constants the second run did not make are passed over: a helper cached with
    ``functools.lru_cache`` (BEiT's relative position index) computes them on the first call only, as
    does a module caching what it derives from its buffers and the input's shape (YOLO's detection
    head keeps its anchors, made from ``self.stride[i]``, until the input's size changes)."""
    for position, new in _aligned(original, again):
        old = original[position]
        if not _same_call(old, new):
            return _Check(False, old, f"the model ran {new.op_name} where {old.op_name} was recorded")
        reason = _unplanned_shape(old, new)
        if reason is not None:
            return _Check(False, old, reason, again=new)
        reason = old.rule.departs(old, new) if old.rule is not None else None
        if reason is not None:
            return _Check(False, old, reason, again=new)
        reason = changed_number(old, new)
        if reason is not None:
            return _Check(False, old, reason, again=new, number_changed=True)
    return None


def _unplanned_shape(old: Node, new: Node) -> Optional[str]:
    """Why the re-recorded ``new`` departs from the plan for ``old`` in its output shapes (None if it does not)."""
    for value, produced in zip(old.outputs, new.outputs):
        if value.planned_shape() != produced.shape:
            return f"produced shape {produced.shape} where {value.planned_shape()} was planned"
    return None


def _aligned(original: list[Node], again: list[Node]) -> Iterator[tuple[int, Node]]:
    """Each re-recorded call with the position of its recorded counterpart, in order, passing over
    cached constants (see :func:`_first_departure`) and the copies of reshapes (see :func:`_reshape_copy`)."""
    positions = [i for i in range(len(original)) if not _reshape_copy(original, i)]
    olds = [original[i] for i in positions]
    position = 0
    for i, new in enumerate(again):
        if _reshape_copy(again, i):
            continue
        position = _skip_cached_constants(olds, position, new)
        if position == len(olds):
            return
        yield positions[position], new
        position += 1


_VIEWS = (torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default)


def _reshape_copy(nodes: list[Node], i: int) -> bool:
    """Whether ``nodes[i]`` is the copy a ``reshape`` makes before viewing it (``clone`` then
    ``_unsafe_view`` at one line): the same reshape views without a copy where the strides allow it,
    as once a dimension it transposes shrank to one entry (Twins' windows with one head left)."""
    node = nodes[i]
    if node.target is not torch.ops.aten.clone.default or i + 1 == len(nodes) or not node.outputs:
        return False
    after = nodes[i + 1]
    return (after.target is torch.ops.aten._unsafe_view.default and after.location == node.location
            and bool(after.inputs) and after.inputs[0] is node.outputs[0])


def _aligned_end(original: list[Node], again: list[Node]) -> int:
    """The position of the recorded call after the last one the re-recorded calls reached."""
    end = 0
    for position, _ in _aligned(original, again):
        end = position + 1
    return end


def _same_call(old: Node, new: Node) -> bool:
    return old.kind is new.kind and (old.kind is not NodeKind.OP or old.target is new.target
                                     or old.target in _VIEWS and new.target in _VIEWS)


def _skip_cached_constants(original: list[Node], position: int, new: Node) -> int:
    """Where the recorded calls resume matching ``new``: after the constants recorded at ``position``
    that the second run did not make, if any, else ``position``."""
    ahead = position
    while ahead < len(original) and not original[ahead].same_code(new) and _makes_constants(original[ahead]):
        ahead += 1
    return ahead if ahead < len(original) and original[ahead].same_code(new) else position


def _makes_constants(node: Node) -> bool:
    """Whether every output of ``node`` is the same for every input (read from parameters, buffers
    and factories only), or it returns no tensor and reads only such (``float(self.stride[i])``)."""
    values = node.outputs or node.inputs
    return bool(values) and all(v.origin.input_independent for v in values)


def _count_flops(model, args, kwargs) -> int:
    """The sped-up model's FLOPs, counted as the recording counted the model's: fused attention off (a
    fused kernel's work is not counted)."""
    counter = FlopCounter()
    with torch.no_grad(), fused_attention_off(), counter:
        model(*args, **kwargs)
    return counter.total


def _reduced_precision(graph: Graph) -> bool:
    """Whether the model computes in half precision somewhere (``torch.autocast`` in its forward, a
    half-precision part): its float32 outputs then carry that round-off."""
    return any(value.dtype in _REDUCED_PRECISION for value in graph.values)


_REDUCED_PRECISION = (torch.float16, torch.bfloat16)

_VERIFIED_FLOOR = 1e-3
"""Outputs the verification compares relative to their own size down to this size (the tests, to 1):
a freshly initialised head gives outputs near 1e-5, within 1e-5 of 1 whatever they are (a branch
scaled by a number computed from a width that shrank was 45% off). No sweep model's round-off came
near it (Hugging Face, timm, torchvision)."""


def _compare(expected: Any, actual: Any, is_state: Optional[Callable[[Any], bool]] = None,
             reduced: bool = False) -> tuple[Optional[str], float]:
    """What differs between two returns of a model (None if nothing), and the largest difference of
    their floating-point tensors, within the round-off of half precision where it is ``reduced``.
    State the model reads back is not compared."""
    ref, got = list(iter_tensors(expected, is_state)), list(iter_tensors(actual, is_state))
    if len(ref) != len(got):
        return f"the model returned {len(got)} tensors instead of {len(ref)}", math.inf
    worst = 0.0
    for i, (a, b) in enumerate(zip(ref, got)):
        if a.shape != b.shape:
            return f"output {i} has shape {tuple(b.shape)} instead of {tuple(a.shape)}", math.inf
        if not a.is_floating_point():
            if not torch.equal(a, b):
                return f"output {i} differs", math.inf
            continue
        close, difference = closeness(a, b, reduced, floor=_VERIFIED_FLOOR)
        if not close:
            return f"output {i} differs by up to {difference:.3g}", difference
        worst = max(worst, difference)
    return None, worst


def _changed_numbers(expected: Any, actual: Any) -> list[tuple[Any, Any]]:
    """The Python numbers a model returned (a count, a width read from a shape) that differ, as
    ``(recorded, now)`` pairs."""
    def numbers(output: Any) -> list:
        return [leaf for leaf in pytree.tree_leaves(output) if type(leaf) in (int, float, bool)]

    before, after = numbers(expected), numbers(actual)
    return [(a, b) for a, b in zip(before, after) if a != b and not (a != a and b != b)]


def outputs_close(expected: torch.Tensor, actual: torch.Tensor) -> bool:
    """Equal within the round-off of the dtype, relative to the output's magnitude."""
    if not expected.is_floating_point():
        return bool(torch.equal(expected, actual))
    return closeness(expected, actual)[0]


def closeness(expected: torch.Tensor, actual: torch.Tensor, reduced: bool = False,
              floor: float = 1.0) -> tuple[bool, float]:
    """(close, largest difference over the finite entries) of two floating-point tensors of one shape,
    ``reduced``: computed in half precision on the way (the tolerance of half precision).

    Compared in float32 at least (float64 stays float64; large outputs such as a language model's
    logits in a few passes). The tolerance, 1e-5 of the output's size for float32, is five times the
    largest round-off measured over the torchvision zoo, 100 timm and 60 Hugging Face models (2e-6),
    and below what a change the trace cannot see costs on freshly initialised weights: DeBERTa's
    attention scale computed from a size differed by 5e-5 once features within heads went. An output
    smaller than ``floor`` is held to 1e-5 of ``floor`` (round-off there may be that of the larger
    values it was computed from); the verification's floor is :data:`_VERIFIED_FLOOR`. Entries that
    are not finite must be the same in both: the same infinity, or NaN.
    """
    compute = torch.float64 if expected.dtype == torch.float64 else torch.float32
    a, b = expected.detach().to(compute), actual.detach().to(compute)
    tolerance = 1e-5 if expected.dtype in (torch.float32, torch.float64) and not reduced else 2e-2
    if not a.numel():
        return True, 0.0
    difference = float((a - b).abs().max())
    if math.isfinite(difference):  # then every entry of both is finite
        return difference <= tolerance * max(float(a.abs().max()), floor), difference
    finite = torch.isfinite(a)
    if not bool((finite == torch.isfinite(b)).all()) or not bool(_same_non_finite(a[~finite], b[~finite]).all()):
        return False, math.inf
    if not bool(finite.any()):
        return True, 0.0
    difference = float((a[finite] - b[finite]).abs().max())
    return difference <= tolerance * max(float(a[finite].abs().max()), floor), difference


def _same_non_finite(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Entry by entry, whether two non-finite values are the same: equal infinities, or both NaN (a
    Hugging Face model in float64 gives NaN for a padded sample: the masked model's as much as the
    sped-up model's)."""
    return (a == b) | (a.isnan() & b.isnan())


def _restore_training(model: nn.Module, flags: dict[int, bool], replaced) -> None:
    """Puts train/eval flags back; a rebuilt module takes the flag of the module it replaced."""
    origin = {id(new): old for old, new in replaced.pairs}
    default = flags[id(model)]
    for module in model.modules():
        source = origin.get(id(module), module)
        module.training = flags.get(id(source), default)
