"""Record a :class:`~speedup.graph.Graph` by running the model once, concretely.

Symbolic tracers (``torch.fx``, ``torch.jit``, ``torch.export``) fail on models with Python control
flow on shapes or with caches in their outputs. Running the model for real under a
``TorchDispatchMode`` sees every ATen operator it really executes, whatever Python it is written
in; each module that a rule claims is collapsed into a single node (its ``forward``, wrapped).

Tensor identity is tracked in a weak dictionary (keeping activations alive would cost a forward
pass' worth of fresh allocations) together with each tensor's version counter, so that a tensor
mutated behind the recorder's back (a write through a view) is noticed and treated conservatively.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import os
import sys
import weakref
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes, _get_current_dispatch_mode

from . import flops as flop_count
from .graph import ALIAS_WRITE, Boundary, Graph, Node, NodeKind, Origin, TensorValue
from .masks import held_tensors
from .rule import Rule

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_OWN_DIR = os.path.dirname(__file__) + os.sep
_CODE_OWNER_ARGUMENT: dict[Any, Optional[str]] = {}
"""Code objects: None for torch's and speedup's (skipped when looking for the caller), else the name of
the first parameter, which holds the module running the code where a method has one (``self``, or
whatever a user named it), '' where there is none."""


def _owner_argument(code: Any) -> Optional[str]:
    """See :data:`_CODE_OWNER_ARGUMENT`."""
    found = _CODE_OWNER_ARGUMENT.get(code, False)
    if found is False:
        library = code.co_filename.startswith((_TORCH_DIR, _OWN_DIR))
        found = None if library else code.co_varnames[0] if code.co_argcount else ""
        _CODE_OWNER_ARGUMENT[code] = found
    return found


def code_location(frame: Any) -> Optional[str]:
    """``file:line`` of the innermost frame from ``frame`` out that runs the model's code (not torch's
    or speedup's): where the model issued a call, as the recording notes it (:attr:`Node.location`)."""
    while frame is not None:
        if _owner_argument(frame.f_code) is not None:
            return f"{frame.f_code.co_filename}:{frame.f_lineno}"
        frame = frame.f_back
    return None


@dataclasses.dataclass
class Trace:
    """A recorded graph, what the model returned while it was recorded, and the FLOPs it ran."""

    graph: Graph
    output: Any
    flops: int


class TracingFailed(Exception):
    """The model raised while being recorded; ``graph`` holds what was recorded up to then, and
    ``call`` the operator call that raised (without outputs), if an operator did."""

    def __init__(self, error: BaseException, graph: Graph, call: Optional[Node] = None):
        super().__init__(str(error))
        self.error = error
        self.graph = graph
        self.call = call


def trace(
    model: nn.Module,
    args: tuple,
    kwargs: dict,
    claims: Callable[[nn.Module], bool],
    observe: Callable[[nn.Module], bool] = lambda module: False,
    known: tuple = (),
    is_state: Optional[Callable[[Any], bool]] = None,
    masked: Optional[Mapping[int, tuple[torch.Tensor, Any]]] = None,
    apply_mask: Optional[Callable[[torch.Tensor], None]] = None,
    masked_forwards: Optional[Mapping[int, Callable[..., Any]]] = None,
    unrecorded: Callable[[nn.Module], bool] = lambda module: False,
    boundaries: bool = False,
    keep_values: Optional[Callable[[torch.Tensor], None]] = None,
    op_rule: Callable[[Any], Optional[Rule]] = lambda func: None,
) -> Trace:
    """Runs ``model(*args, **kwargs)`` once and records what it computes.

    ``claims(module)`` says whether a module is recorded as one node (its rule knows it as a whole)
    rather than as the operators it runs. The root module is never claimed: its forward is the
    graph. ``observe(module)`` marks unclaimed modules whose boundary values are noted (for
    ``customized_replace_func``); ``boundaries`` notes those of every unclaimed module holding
    parameters or modules, or written outside torch (for :mod:`speedup.refill`). ``known`` lists extra ``(name, owner,
    attribute)`` tensors that count as parameters. Objects in the output for which ``is_state`` holds
    (a key/value cache) are not outputs of the graph: their tensors need not keep their shapes. Runs
    under ``torch.no_grad``; the caller chooses train or eval mode.

    ``masked`` (``id(tensor) -> (tensor, MaskPattern)``) are parameters the model holds unmasked:
    every operator reading one gets a masked copy instead, made for that call and dropped after it,
    so the model computes what the masked model does without a masked copy of every weight held at
    once (nor the model's own values overwritten). Their values get the pattern as ``mask``. An
    operator that writes one in place calls ``apply_mask(tensor, through_view)`` first, which must mask the
    tensor itself (in its own memory where ``through_view``). ``keep_values(tensor)`` is called with
    each parameter or buffer the model writes in place, before its first write: the caller keeps its
    values to undo the write. ``masked_forwards`` (``id(module) -> fn``) are claimed modules that compute
    their masked output themselves from their unmasked weights (see
    :meth:`~speedup.rule.ModuleRule.masked_forward`): ``fn`` runs instead of their ``forward``, and
    their weights are not masked for them. Claimed modules for which ``unrecorded(module)`` holds
    run their ``forward`` unrecorded unless they hold a lazily masked weight (see
    :attr:`~speedup.rule.ModuleRule.unrecorded_forward`). ``op_rule(func)`` is an operator's rule, if
    any: what it notes of a recorded call's values is kept (see :meth:`~speedup.rule.Rule.note`), and
    the constants made by one whose :attr:`~speedup.rule.Rule.varies_with_input_sizes` follow sizes.
    """
    recorder = _Recorder(model, known, masked, apply_mask, keep_values, op_rule)
    modules = list({id(m): m for m in model.modules()}.values())
    handles = _masked_forwards(modules, recorder, masked_forwards or {})
    handles += _claim_modules(model, modules, recorder, claims, unrecorded)  # around the masked forwards
    handles += _observe_modules(model, modules, recorder, claims, observe, boundaries)
    try:
        recorder.bind_inputs(args, kwargs)
        with torch.no_grad(), fused_attention_off(), recorder, _attention_recorded_whole(recorder), \
                _lists_read(recorder):
            output = model(*args, **kwargs)
        recorder.bind_outputs(output, is_state)
    except Exception as exc:
        raise TracingFailed(exc, recorder.graph, recorder.failed_call) from exc
    finally:
        for handle in reversed(handles):
            handle.remove()
    return Trace(recorder.graph, output, recorder.flops)


@contextlib.contextmanager
def fused_attention_off() -> Iterator[None]:
    """Turns off the fused fast path of ``nn.TransformerEncoderLayer`` (which would hide its modules
    in one opaque operator) and of ``nn.MultiheadAttention``, while recording. The verification runs
    the sped-up model the same way: in half precision the fused path rounds differently (by 2% after
    a few layers), and equality with the fused path is what the tests check, on fresh inputs."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    previous = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(previous)


@contextlib.contextmanager
def ordinary_mode() -> Iterator[None]:
    """Autograd's ordinary mode and no autocast, whatever the caller's. Under ``torch.inference_mode``
    tensors track no versions (the recorder follows in-place writes by them) and the parameters made
    could never be trained; under autocast the recording, and the constants folded from it, would be
    rounded to half precision (the sped-up model still runs under the caller's autocast, as the
    model did). Submodules compiled with ``torch.compile`` run eagerly: the recording sees their
    operators, and nothing is compiled for shapes of the call's own (their wrappers compile the new
    sizes on the next call after it, as after any change of a module)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        for device in ("cpu", "cuda"):
            if _autocast_enabled(device):
                stack.enter_context(torch.autocast(device, enabled=False))
        dynamo = sys.modules.get("torch._dynamo")  # imported by whoever compiled a module; never here (a second)
        if dynamo is not None and hasattr(dynamo.config, "disable"):
            stack.enter_context(dynamo.config.patch(disable=True))
        yield


@contextlib.contextmanager
def onednn_off() -> Iterator[None]:
    """oneDNN off, for probes: it would first build kernels for each new shape, which takes longer
    than a small probe. (``torch.backends.mkldnn.flags`` does the same, but warns about TF32 on
    Intel GPUs on every use.)"""
    enabled = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(enabled)


def _autocast_enabled(device: str) -> bool:
    try:
        return torch.is_autocast_enabled(device)
    except TypeError:  # torch before 2.4 asks per device type
        return torch.is_autocast_cpu_enabled() if device == "cpu" else torch.is_autocast_enabled()


def ordinary_inputs(tree: Any) -> Any:
    """``tree`` with tensors made under ``torch.inference_mode`` (which track no versions) copied as
    ordinary tensors; call under :func:`ordinary_mode`."""
    return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) and t.is_inference() else t, tree)


def iter_tensors(obj: Any, skip: Optional[Callable[[Any], bool]] = None) -> Iterator[torch.Tensor]:
    """Yields every tensor reachable from a model's return value, except inside objects ``skip`` names.

    Covers tensors, sequences, mappings, dataclasses and plain objects (a key/value cache), which
    ``torch.utils._pytree`` treats as opaque leaves.
    """
    for _, tensor in iter_tensor_paths(obj, skip):
        yield tensor


Path = tuple
"""Steps from a return value to one of its tensors: ``("item", key)`` (mapping or sequence entry) or
``("attr", name)`` (attribute of a dataclass or plain object)."""


def iter_tensor_paths(obj: Any, skip: Optional[Callable[[Any], bool]] = None, _path: Path = (),
                      _seen: Optional[set] = None) -> Iterator[tuple[Path, torch.Tensor]]:
    """``(path, tensor)`` for every tensor :func:`iter_tensors` yields, in the same order."""
    if isinstance(obj, torch.Tensor):
        yield _path, obj
        return
    if len(_path) > 8 or obj is None or isinstance(obj, (str, bytes, int, float, bool, nn.Module)):
        return
    if skip is not None and skip(obj):
        return
    _seen = set() if _seen is None else _seen
    if id(obj) in _seen:
        return
    _seen.add(id(obj))
    if isinstance(obj, dict):
        children = [(("item", key), value) for key, value in obj.items()]
    elif isinstance(obj, (list, tuple)):
        children = [(("item", i), value) for i, value in enumerate(obj)]
    elif isinstance(obj, (set, frozenset)):
        children = [((), value) for value in obj]  # no path leads back into a set
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        children = [(("attr", f.name), getattr(obj, f.name)) for f in dataclasses.fields(obj)]
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        children = [(("attr", name), value) for name, value in vars(obj).items()]
    else:
        return
    for step, child in children:
        yield from iter_tensor_paths(child, skip, _path + ((step,) if step else ()), _seen)


@contextlib.contextmanager
def _attention_recorded_whole(recorder: "_Recorder") -> Iterator[None]:
    """Records ``F.scaled_dot_product_attention`` as one call where torch would run it as several
    operators: its math path (inputs that are not 4-D on CPU, some dtypes and masks) multiplies
    ``q`` and ``k`` by ``E ** -0.25`` for the default scale, a number that would not follow the
    size ``E`` if it shrank. The whole call's rule knows that (see ``speedup.rules.contraction``).
    The fused kernels are single operators already and pass through.

    The function is replaced in ``torch.nn.functional`` while recording, where models look it up
    (``F.scaled_dot_product_attention``); a ``TorchFunctionMode`` would see every call, but sends
    every functional call down torch's slower override path (5 to 10% of the speedup call on
    resnet50 and densenet121). Code holding its own reference runs the operators, and verification
    then finds a changed scale where it changes the outputs.
    """
    function = torch.nn.functional.scaled_dot_product_attention

    def attention(*args: Any, **kwargs: Any) -> Any:
        if recorder.sees_the_model() and recorder.runs_attention_math(args, kwargs):
            return recorder.record_whole(torch.ops.aten.scaled_dot_product_attention.default, function, args, kwargs)
        return function(*args, **kwargs)

    with attribute_replaced(torch.nn.functional, "scaled_dot_product_attention", attention):
        yield


_MATH = 0
"""``torch._fused_sdp_choice``'s answer for the math path (``SDPBackend.MATH``)."""


@contextlib.contextmanager
def _lists_read(recorder: "_Recorder") -> Iterator[None]:
    """Notes the numbers ``Tensor.tolist`` reads, while recording: it reads the tensor's memory
    without an operator, so the recorder would not see a model take numbers out of a tensor that
    depends on the input (``scale = x.abs().amax(0).tolist()``), as ``.item()`` does through one."""
    tolist = torch.Tensor.tolist

    def read(tensor: torch.Tensor) -> Any:
        numbers = tolist(tensor)
        if recorder.sees_the_model():
            recorder.note_numbers_read(tensor, numbers)
        return numbers

    with attribute_replaced(torch.Tensor, "tolist", read):
        yield


@contextlib.contextmanager
def attribute_replaced(owner: Any, name: str, replacement: Any) -> Iterator[None]:
    """``owner.name`` is ``replacement`` inside, as before after (an attribute ``owner`` inherited
    is inherited again)."""
    own = vars(owner).get(name)
    setattr(owner, name, replacement)
    try:
        yield
    finally:
        if own is None:
            delattr(owner, name)
        else:
            setattr(owner, name, own)


class _Recorder(TorchDispatchMode):
    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # torch would wrap __torch_dispatch__ to keep torch.compile out of it, importing
        # torch._dynamo (about a second) and adding a layer to every operator call. Recording is
        # never compiled, so neither is needed.
        return False

    def __init__(self, model: nn.Module, known: tuple = (), masked: Optional[Mapping[int, tuple]] = None,
                 apply_mask: Optional[Callable[[torch.Tensor, bool], None]] = None,
                 keep_values: Optional[Callable[[torch.Tensor], None]] = None,
                 op_rule: Callable[[Any], Optional[Rule]] = lambda func: None):
        super().__init__()
        self._op_rule = op_rule
        self._rule_facts: dict[Any, tuple[Optional[Callable[[tuple, dict, Any], Any]], bool]] = {}  # by operator
        self._masked: dict[int, tuple] = {key: (t, pattern, None, None) for key, (t, pattern) in (masked or {}).items()}
        """``id(tensor) -> (tensor, pattern, base, rebuild)``: the lazily masked weights, and views of them
        made in claimed modules (``base``: the weight they view; ``rebuild``: the same view of another
        tensor laid out like it)."""
        self._apply_mask = apply_mask
        self._keep_values = keep_values
        self._state: dict[Any, torch.Tensor] = {} if keep_values is None else {
            _state_key(t): t for t in itertools.chain(model.parameters(), model.buffers())}
        """The model's parameters and buffers (and masked copies of its weights that views are made of)
        by memory, until it first writes one in place."""
        self._buffers: dict[tuple, torch.Tensor] = {}
        self.graph = Graph()
        self.flops = 0
        self._values: dict[int, tuple] = {}  # id(tensor) -> (weak reference, TensorValue, version)
        self._hidden: dict[int, weakref.ref] = {}  # tensors made inside claimed modules
        named = list(model.named_modules(remove_duplicate=False))
        self._known: dict[int, tuple[torch.Tensor, str, nn.Module, str]] = held_tensors(named)
        for name, owner, attr in known:
            tensor = getattr(owner, attr)
            self._known[id(tensor)] = (tensor, name, owner, attr)
        # By id: the model holds every module alive for the whole trace.
        self._names: dict[int, str] = {}
        for name, module in named:
            self._names.setdefault(id(module), name)
        self._constant_storages: dict[int, list[TensorValue]] = {}
        self._writes: dict[int, list[TensorValue]] = {}
        self._read_numbers: set = set()
        """Python numbers the model read out of tensors that depend on the input (``.item()``, ``float(t)``,
        ``.tolist()``)."""
        self.suppress = 0
        self.failed_call: Optional[Node] = None
        self._pending: list[tuple[list[TensorValue], tuple, dict, Optional[set[int]]]] = []
        self.self_masking: dict[int, list[torch.Tensor]] = {}
        """Claimed modules computing their masked output themselves, with their own parameters."""
        self.own_flops: dict[int, Callable[[Any], int]] = {}
        """Of those, the ones whose function skips work: the FLOPs of their own forward, by output."""
        self._recounting = 0
        """How many modules counting their own FLOPs are running (they run unrecorded; one inside
        another adds nothing)."""
        self._set_aside: list[dict[int, tuple]] = []

    # -- values ---------------------------------------------------------------------------

    def bind_inputs(self, args: tuple, kwargs: dict) -> None:
        for tensor in pytree.tree_leaves((args, kwargs)):
            if isinstance(tensor, torch.Tensor) and self._lookup(tensor) is None:
                self.graph.inputs.append(self._remember(tensor, self.graph.new_value(tensor, Origin.INPUT)))

    def bind_outputs(self, output: Any, is_state: Optional[Callable[[Any], bool]] = None) -> None:
        for path, tensor in iter_tensor_paths(output, is_state):
            value = self.value_of(tensor)
            self.graph.output_paths.append((path, value))
            if not value.is_output:
                value.is_output = True
                self.graph.outputs.append(value)

    def _remember(self, tensor: torch.Tensor, value: TensorValue, written: bool = False) -> TensorValue:
        # An in-place operator's version bump happens after the dispatcher returns from this mode
        # (in the ADInplaceOrView kernel), so a tensor written here is one version ahead when next read.
        version = _version(tensor)
        if written and version is not None:
            version += 1
        self._values[id(tensor)] = (weakref.ref(tensor), value, version)
        return value

    def _lookup(self, tensor: torch.Tensor) -> Optional[tuple]:
        entry = self._values.get(id(tensor))
        return entry if entry is not None and entry[0]() is tensor else None

    def known_value(self, tensor: torch.Tensor) -> Optional[TensorValue]:
        """The tensor's value if the recording knows it as it is now, else ``None`` (adds nothing)."""
        entry = self._lookup(tensor)
        return entry[1] if entry is not None and _version(tensor) == entry[2] else None

    def value_of(self, tensor: torch.Tensor) -> TensorValue:
        entry = self._values.get(id(tensor))
        if entry is not None and entry[0]() is tensor:
            _, value, version = entry
            if _version(tensor) == version:
                return value
            return self._refresh_after_alias_write(tensor, value)
        known = self._known.get(id(tensor))
        if known is not None and known[0] is tensor:
            _, name, module, attr = known
            value = self.graph.new_value(tensor, Origin.PARAMETER, tensor=tensor, owner=(module, attr), name=name)
            if self.lazily_masked(tensor):
                value.mask = self._masked[id(tensor)][1]
            self.graph.parameters[name] = value
            return self._remember(tensor, value)
        hidden = self._hidden.get(id(tensor))
        if hidden is not None and hidden() is tensor:
            return self._remember(tensor, self.graph.new_value(tensor, Origin.OPAQUE))
        # A tensor that existed before this forward pass (a plain attribute, a closure): it does not
        # depend on the input.
        return self._remember(tensor, self._constant(tensor))

    def _constant(self, tensor: torch.Tensor) -> TensorValue:
        value = self.graph.new_value(tensor, Origin.CONSTANT, tensor=tensor)
        self._constant_storages.setdefault(_storage_key(tensor), []).append(value)
        return value

    def _refresh_after_alias_write(self, tensor: torch.Tensor, stale: TensorValue) -> TensorValue:
        """A tensor changed through an alias: its new value depends on every write to its storage.

        The node notes the dimensions that every written view covers whole, laid out as the tensor
        (same rank and strides: slices along the other dimensions, as ``x[:, 1:] += y`` makes):
        along those, entry ``i`` of each written view is entry ``i`` of the tensor.
        """
        writes = self._writes.get(_storage_key(tensor), [])
        inputs = [stale] + [w for w in writes if w is not stale]
        strides = tuple(tensor.stride()) if tensor.layout is torch.strided else None
        laid_out = strides is not None and all(v.ndim == tensor.dim() and all(
            v.strides[d] == strides[d] for d in range(tensor.dim()) if v.shape[d] > 1 and tensor.shape[d] > 1)
            for v in inputs)  # the stride of a dimension of one entry is arbitrary
        aligned = tuple(d for d in range(tensor.dim()) if laid_out and all(v.shape[d] == tensor.shape[d] for v in inputs))
        node = self.graph.add_node(
            Node(len(self.graph.nodes), NodeKind.OPAQUE, ALIAS_WRITE, tuple(inputs), {"aligned": aligned}, inputs, [],
                 *self._caller())
        )
        # Constants written into a constant (an index built in place) make a constant.
        constant = _derived_origin(inputs) is Origin.CONSTANT
        value = self._record_output(tensor, Origin.CONSTANT if constant else Origin.OPAQUE, node)
        node.outputs.append(value)
        return value

    # -- operators ------------------------------------------------------------------------

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        facts = _FACTS.get(func)
        if facts is None:
            facts = _FACTS[func] = _OperatorFacts.of(func)
        run_args, run_kwargs = args, kwargs
        written = _written_tensors(facts, args, kwargs) if facts.writes else []
        if self._masked and (self._reads_masked(args) or (kwargs and self._reads_masked(kwargs.values()))):
            if self.suppress and facts.view and not facts.writes and self.lazily_masked(args[0]):
                return self._masked_view(func, args, kwargs)
            run_args, run_kwargs = self._masked_operands(facts, args, kwargs, written)
        if written and self._state:
            self._keep_state(written)
        if self.suppress:
            out = func(*run_args, **run_kwargs)
            if facts.counted:
                self.flops += flop_count.count(func, args, kwargs, out)
            for tensor in _tensors(out):
                self._hidden[id(tensor)] = weakref.ref(tensor)
            return out
        inputs, call_args, call_kwargs = self._substituted(args, kwargs)
        for tensor in written:
            self._protect_before_write(tensor)
        node = Node(len(self.graph.nodes), NodeKind.OP, func, call_args, call_kwargs, inputs, [], *self._caller())
        try:
            out = func(*run_args, **run_kwargs)
        except Exception:
            self.failed_call = node
            raise
        if facts.counted:
            self.flops += flop_count.count(func, args, kwargs, out)
        noting, varies = self._rule_facts.get(func) or self._facts_of_rule(func)
        if noting is not None:
            node.note = noting(run_args, run_kwargs, out)
        origin = Origin.COMPUTED if facts.seeded else _derived_origin(inputs[1:] if facts.made_new else inputs)
        if self._read_numbers and facts.passes_number(args, kwargs, self._read_numbers):
            node.reads_input_numbers, origin = True, Origin.COMPUTED  # though every tensor it reads may be constant
        elif origin is not Origin.CONSTANT and type(out) in (int, float):
            self._read_numbers.add(out)
        self.graph.add_node(node)
        # Autograd makes the outputs of a view operator views of the argument it passed us (not of a
        # masked copy we ran the operator on): they share its version counter.
        base = args[0] if facts.view and args and isinstance(args[0], torch.Tensor) else None
        results = _tensors(out)
        if not written:
            if self._writes and base is None:
                self._forget_writes(results, _storages(args))
            node.outputs = [self._record_output(tensor, origin, node, False, base) for tensor in results]
            _note_sizes_followed(node, varies)
            return out
        for tensor in results + [t for t in written if not any(t is r for r in results)]:
            bumped = any(tensor is w for w in written)
            node.outputs.append(self._record_output(tensor, origin, node, bumped, base))
        _note_sizes_followed(node, varies)
        for tensor in written:
            self._writes.setdefault(_storage_key(tensor), []).append(self._lookup(tensor)[1])
        return out

    def _facts_of_rule(self, func: Any) -> tuple[Optional[Callable[[tuple, dict, Any], Any]], bool]:
        """What the operator's rule notes of its calls' values (None: nothing) and whether its results
        vary with the input's sizes, found once per operator."""
        rule = self._op_rule(func)
        noting = rule.note if rule is not None and type(rule).note is not Rule.note else None
        facts = self._rule_facts[func] = (noting, rule is not None and rule.varies_with_input_sizes)
        return facts

    def _keep_state(self, written: Iterable[torch.Tensor]) -> None:
        """The model writes in place into its own parameters or buffers (an embedding with ``max_norm``
        renormalises the rows it looks up): their values are kept first, once each, to be undone."""
        for tensor in written:
            held = self._state.pop(_state_key(tensor), None)
            if held is not None:
                self._keep_values(held)
                known = self._known.get(id(held))
                self.graph.state_written.append(known[1] if known is not None else "a tensor it holds")

    def _forget_writes(self, results: list[torch.Tensor], read: set[int]) -> None:
        """A new tensor (made by an operator or a claimed module, in no memory it ``read``) lives in
        memory of its own: writes noted at that address were made to a tensor freed since, and say
        nothing of this one."""
        for tensor in results:
            key = _storage_key(tensor)
            if key not in read:
                self._writes.pop(key, None)

    def _masked_operands(self, facts: "_OperatorFacts", args: tuple, kwargs: dict,
                         written: list[torch.Tensor]) -> tuple[tuple, dict]:
        """The arguments an operator runs on: every lazily masked parameter replaced by a masked copy.
        A parameter it writes in place is masked for good first (the write must land in it), and so
        is one it views outside a claimed module: the view may be written (a static key/value cache
        filled as ``self.cache[:B, :S] = v``, then read back), which must land in the parameter too."""
        viewed = [args[0]] if facts.view and not self.suppress and args and isinstance(args[0], torch.Tensor) else []
        for tensor in written + viewed:
            if self.lazily_masked(tensor):
                # A view shares the weight's memory (F.embedding renormalises rows through
                # ``weight.detach()``): the weight is masked there, which the view then reads.
                base = self._masked.pop(id(tensor))[2]
                if base is not None:
                    self._masked.pop(id(base), None)
                self._apply_mask(tensor if base is None else base, base is not None)
        # An operator that returns no view of its arguments is done with the copies when it returns:
        # they go in scratch memory the next operator reuses (fresh memory for each would be as much
        # as the weights, page faults included). A view operator's copies live on in its outputs.
        slots = None if facts.view else iter(range(len(args) + len(kwargs)))
        return (tuple(self._masked_operand(a, slots) for a in args),
                {k: self._masked_operand(v, slots) for k, v in kwargs.items()} if kwargs else kwargs)

    def _masked_view(self, func: Any, args: tuple, kwargs: dict) -> Any:
        """A view operator on a lazily masked weight inside a claimed module (``aten.t`` in every
        ``nn.Linear``): the view of the weight itself, noted as lazily masked.

        The operator reading it next gets the weight masked in scratch memory, viewed the same way: a
        masked copy of the view made here could not go in scratch memory (the view lives on), and a
        large layer's weight in fresh memory on every call costs page faults. What the module returns
        is masked on its way out (:meth:`exit_module`).
        """
        tensor = args[0]
        _, pattern, base, rebuild = self._masked[id(tensor)]
        out = func(*args, **kwargs)
        views = _tensors(out)
        for i, view in enumerate(views):
            self._masked[id(view)] = (view, pattern, base if base is not None else tensor,
                                      _ViewOf(func, args[1:], kwargs, i if len(views) > 1 else None, rebuild))
            self._hidden[id(view)] = weakref.ref(view)
        return out

    def _with_views_masked(self, output: Any) -> Any:
        """A claimed module's output with every lazily masked view in it replaced by its masked values."""
        if isinstance(output, torch.Tensor):
            if self.lazily_masked(output) and self._masked[id(output)][2] is not None:
                return self._masked_operand(output, None)
            return output
        if isinstance(output, (tuple, list)):
            items = [self._with_views_masked(o) for o in output]
            if all(new is old for new, old in zip(items, output)):
                return output  # also spares rebuilding a named tuple (PackedSequence), whose arguments differ
            return type(output)(*items) if hasattr(output, "_fields") else type(output)(items)
        if isinstance(output, dict):
            return {key: self._with_views_masked(value) for key, value in output.items()}
        return output

    def _masked_operand(self, arg: Any, slots: Optional[Iterator[int]]) -> Any:
        if isinstance(arg, torch.Tensor):
            if not self.lazily_masked(arg):
                return arg
            _, pattern, base, rebuild = self._masked[id(arg)]
            data = (base if base is not None else arg).detach()
            masked = pattern.apply(data, None if slots is None else self._scratch(next(slots), data))
            if slots is None and self._keep_values is not None:
                # Views of the copy live on: a write into them stands for one into the weight (which
                # the model, run again, makes there: F.embedding_bag renormalising max_norm rows).
                self._state.setdefault(_storage_key(masked), base if base is not None else arg)
            return masked if rebuild is None else rebuild(masked)
        if isinstance(arg, (tuple, list)) and any(isinstance(a, torch.Tensor) for a in arg):
            return type(arg)(self._masked_operand(a, slots) for a in arg)
        return arg

    def _reads_masked(self, args: Iterable) -> bool:
        """Whether a lazily masked parameter may be among the arguments (a quick look by identity)."""
        masked = self._masked
        for arg in args:
            if id(arg) in masked:
                return True
            if type(arg) in (list, tuple) and any(id(a) in masked for a in arg):
                return True
        return False

    def lazily_masked(self, tensor: torch.Tensor) -> bool:
        entry = self._masked.get(id(tensor))
        return entry is not None and entry[0] is tensor

    def _scratch(self, slot: int, like: torch.Tensor) -> Optional[torch.Tensor]:
        """Memory laid out like ``like`` (dense layouts only), reused by every operator for its
        ``slot``-th masked copy; the first slot is sized for the largest masked parameter at once."""
        if not _dense(like):
            return None
        key = (slot, like.dtype, like.device)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < like.numel():
            largest = max((t.numel() for t, _, _, _ in self._masked.values() if t.dtype == like.dtype), default=0)
            size = max(like.numel(), largest if slot == 0 else 0)
            buffer = self._buffers[key] = torch.empty(size, dtype=like.dtype, device=like.device)
        return buffer.as_strided(like.shape, like.stride())

    def sees_the_model(self) -> bool:
        """Whether the code running now is the model's, recorded by this recorder (not the recorder's
        own work, nor code the recorder runs unrecorded)."""
        return _get_current_dispatch_mode() is self and not self.suppress

    def note_numbers_read(self, tensor: torch.Tensor, numbers: Any) -> None:
        """Python numbers the model read out of ``tensor`` (``tensor.tolist()``): followed as the
        numbers ``.item()`` returns, where the tensor depends on the input."""
        if self.value_of(tensor).origin.input_independent:
            return
        stack = [numbers]
        while stack:
            number = stack.pop()
            if type(number) is list:
                stack.extend(number)
            elif type(number) in (int, float):
                self._read_numbers.add(number)

    def runs_attention_math(self, args: tuple, kwargs: dict) -> bool:
        """Whether ``F.scaled_dot_product_attention(*args, **kwargs)`` would take the math path."""
        self.suppress += 1  # the choice is an operator too; not a call of the model's
        try:
            return torch._fused_sdp_choice(*args, **kwargs) == _MATH
        except Exception:  # noqa: BLE001 - arguments it does not take: the call itself will say
            return False
        finally:
            self.suppress -= 1

    def record_whole(self, target: Any, func: Callable, args: tuple, kwargs: dict) -> Any:
        """Runs ``func`` as one recorded call of the operator ``target``, the operators it runs unrecorded."""
        inputs, call_args, call_kwargs = self._substituted(args, kwargs)
        node = Node(len(self.graph.nodes), NodeKind.OP, target, call_args, call_kwargs, inputs, [], *self._caller())
        self.suppress += 1
        try:
            out = func(*args, **kwargs)
        except Exception:
            self.failed_call = node
            raise
        finally:
            self.suppress -= 1
        self.graph.add_node(node)
        node.outputs = [self._record_output(tensor, _derived_origin(inputs), node) for tensor in _tensors(out)]
        return out

    def _substituted(self, args: tuple, kwargs: dict) -> tuple[list[TensorValue], tuple, dict]:
        """``(values of the tensors passed, args, kwargs)`` of a call, every tensor replaced by its value."""
        inputs: list[TensorValue] = []
        call_args = tuple(self._substitute(a, inputs) for a in args)
        call_kwargs = {k: self._substitute(v, inputs) for k, v in kwargs.items()} if kwargs else {}
        return inputs, call_args, call_kwargs

    def _substitute(self, arg: Any, found: list) -> Any:
        """An argument with every tensor replaced by its value (arguments nest one level: lists);
        the values are appended to ``found``."""
        if isinstance(arg, torch.Tensor):
            value = self.value_of(arg)
            found.append(value)
            return value
        if isinstance(arg, (tuple, list)) and any(isinstance(a, torch.Tensor) for a in arg):
            values = tuple(self.value_of(a) if isinstance(a, torch.Tensor) else a for a in arg)
            found.extend(v for v in values if isinstance(v, TensorValue))
            return values
        return arg

    def _caller(self) -> tuple[str, Optional[str]]:
        """The innermost module running the user code that issued an operator, and that code's line.

        The code may be a function a module's ``forward`` calls (timm's ``conv2d_same(x, self.weight,
        ...)``): the module is then the nearest caller that is one.
        """
        frame = sys._getframe(2)
        location = None
        while frame is not None:
            code = frame.f_code
            first = _owner_argument(code)
            if first is not None:
                if location is None:
                    location = f"{code.co_filename}:{frame.f_lineno}"
                owner = frame.f_locals.get(first) if first else None
                if isinstance(owner, nn.Module):
                    return self._names.get(id(owner), ""), location
            frame = frame.f_back
        return "", location

    def _record_output(self, tensor: torch.Tensor, origin: Origin, node: Node, written: bool = False,
                       base: Optional[torch.Tensor] = None) -> TensorValue:
        if origin is Origin.CONSTANT:
            value = self._constant(tensor)
            value.producer = node
        else:
            value = self.graph.new_value(tensor, origin, producer=node)
        self._remember(tensor, value, written)
        if base is not None and not written:
            # Once the dispatcher returns, a view shares its base's version counter.
            self._values[id(tensor)] = (weakref.ref(tensor), value, _version(base))
        return value

    def _protect_before_write(self, tensor: torch.Tensor) -> None:
        """Constants keep their data for the analysis; an in-place write must not change it."""
        for value in self._constant_storages.pop(_storage_key(tensor), []):
            value.tensor = value.tensor.clone()

    # -- claimed modules ------------------------------------------------------------------

    def enter_module(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if id(module) in self.own_flops:
            self._recounting += 1
        if self.suppress == 0:
            inputs, call_args, call_kwargs = self._substituted(args, kwargs)
            self._pending.append((inputs, call_args, call_kwargs, _storages((args, kwargs)) if self._writes else None))
            own = self.self_masking.get(id(module))
            if own is not None and not _holds(module, own):
                own = None  # its own forward runs, reading what it holds (see _judged_by_own_forward)
            # A module masking its own output reads its weights as they are (set aside until it returns).
            self._set_aside.append({id(t): self._masked.pop(id(t)) for t in own or () if self.lazily_masked(t)})
        self.suppress += 1

    def _tensors_of(self, module: nn.Module) -> list[tuple[str, torch.Tensor]]:
        if not module._modules:
            return [(a, t) for a, t in list(module._parameters.items()) + list(module._buffers.items()) if t is not None]
        return [(a, t) for a, t in list(module.named_parameters()) + list(module.named_buffers()) if t is not None]

    def exit_module(self, module: nn.Module, output: Any) -> Any:
        """Records the call of a claimed module; returns its output where that must change (a view of
        a masked weight it returns, masked), else None."""
        own_flops = self.own_flops.get(id(module))
        if own_flops is not None:
            self._recounting -= 1
            if not self._recounting and output is not None:  # None: it raised
                self.flops += own_flops(output)
        self.suppress -= 1
        if self.suppress:
            return None
        self._masked.update(self._set_aside.pop())
        replaced = self._with_views_masked(output) if self._masked else output
        output = replaced
        inputs, args, kwargs, read = self._pending.pop()
        own = self._tensors_of(module)
        if read is not None:  # the module may return its input (an in-place activation): not a new tensor
            self._forget_writes(list(iter_tensors(output)), read | {_storage_key(t) for _, t in own})
        name = self._names.get(id(module), "")
        params = {attr: self.value_of(tensor) for attr, tensor in own}
        node = Node(len(self.graph.nodes), NodeKind.MODULE, module, args, kwargs, inputs, [], name, None, params)
        node.inputs = inputs + [p for p in params.values() if p not in inputs]
        self.graph.add_node(node)
        origin = _derived_origin(inputs)
        for path, tensor in iter_tensor_paths(output):
            self._hidden.pop(id(tensor), None)
            node.outputs.append(self._record_output(tensor, origin, node))
            node.paths.append(path)
        _note_sizes_followed(node, False)
        return replaced


def _claim_modules(model: nn.Module, modules: list, recorder: _Recorder, claims: Callable[[nn.Module], bool],
                   unrecorded: Callable[[nn.Module], bool]) -> list:
    """Records every call of each claimed module as one node; returns handles that undo this."""
    handles = []
    for module in modules:
        if module is model or not claims(module):
            continue
        # A masked forward counting its own FLOPs needs nothing of the recorder, nor does a module
        # whose rule says so, unless an operator inside must read one of its weights masked.
        quiet = id(module) in recorder.own_flops or (
            unrecorded(module) and not any(recorder.lazily_masked(t) for t in [*module.parameters(), *module.buffers()]))
        handles.append(_record_calls(module, recorder, quiet))
    return handles


def _record_calls(module: nn.Module, recorder: _Recorder, quiet: bool) -> "_Undo":
    """Wraps the module's ``forward`` (in the instance, as a masked forward is) to enter and leave its
    node around it. Hooks already on the module (input/output masks) run outside the node, as they
    run outside ``forward``. A pair of hooks would do the same, but sends every call of the module
    down ``nn.Module``'s slower path and must be registered again on every recording: about a tenth
    of the recorder's own time (measured per layer). ``quiet``: its operators run outside the recorder."""
    own = module.__dict__.get("forward")
    forward = module.forward
    outside = _disable_current_modes if quiet else contextlib.nullcontext

    @functools.wraps(forward)  # its signature is forward's (input masks find arguments by name)
    def recorded(*args: Any, **kwargs: Any) -> Any:
        recorder.enter_module(module, args, kwargs)
        try:
            with outside():
                output = forward(*args, **kwargs)
        except BaseException:
            recorder.exit_module(module, None)
            raise
        replaced = recorder.exit_module(module, output)
        return output if replaced is None else replaced

    module.__dict__["forward"] = recorded
    if own is None:
        return _Undo(lambda: module.__dict__.pop("forward", None))
    return _Undo(lambda: module.__dict__.__setitem__("forward", own))


def _masked_forwards(modules: list, recorder: "_Recorder", forwards: Mapping[int, Callable[..., Any]]) -> list:
    """Runs each module's own masked forward instead of its ``forward``, with its weights left
    unmasked for it; returns handles that undo this."""
    handles = []
    for module in modules:
        fn = forwards.get(id(module))
        if fn is None or "forward" in module.__dict__:
            continue
        own = list(module.parameters())  # its submodules' too: its masked forward reads them
        module.__dict__["forward"] = _judged_by_own_forward(module, fn, own)
        recorder.self_masking[id(module)] = own
        if hasattr(fn, "flops"):
            recorder.own_flops[id(module)] = fn.flops
        handles.append(_Undo(lambda module=module: module.__dict__.pop("forward", None)))
    return handles


def _judged_by_own_forward(module: nn.Module, masked_forward: Callable[..., Any], own: list) -> Callable[..., Any]:
    """``masked_forward``, where a failure is the inputs' fault only if the module's own ``forward``
    rejects them too (its error is raised then, as when recording without masked forwards); if it
    takes them, the rule's masked forward is at fault, which :class:`RuleFailed` says.

    A call during which the module holds other tensors than its parameters ``own`` (put in their
    places by ``torch.func.functional_call``, a weight the code computes) runs the module's own
    ``forward``: the masked forward reads the parameters it was made for."""

    def masked(*args: Any, **kwargs: Any) -> Any:
        if not _holds(module, own):
            return type(module).forward(module, *args, **kwargs)
        try:
            return masked_forward(*args, **kwargs)
        except Exception as error:
            with _disable_current_modes(), torch.no_grad():
                type(module).forward(module, *args, **kwargs)
            raise RuleFailed(module, error) from error

    return masked


def _holds(module: nn.Module, own: list) -> bool:
    """Whether ``module`` holds the parameters ``own`` lists (its submodules' included), as they were."""
    if module._modules:
        held = list(module.parameters())
    else:  # a layer of its own (the usual case): read without walking submodules, each tensor once
        held = list({id(p): p for p in module._parameters.values() if p is not None}.values())
    return len(held) == len(own) and all(a is b for a, b in zip(held, own))


class RuleFailed(Exception):
    """A rule's masked forward raised on inputs the module's own ``forward`` takes."""

    def __init__(self, module: nn.Module, error: Exception):
        super().__init__(f"{type(error).__name__}: {error}")
        self.module, self.error = module, error


@dataclasses.dataclass
class _Undo:
    """A handle whose ``remove()`` undoes a change, like a hook's."""

    undo: Callable[[], Any]

    def remove(self) -> None:
        self.undo()


def _observe_modules(model: nn.Module, modules: list, recorder: _Recorder, claims, observe, every: bool) -> list:
    """Notes the values entering and leaving the first call of observed modules, and counts their
    calls, without collapsing them: the modules ``observe`` selects, or (``every``) every module
    traced through. Only for the former are tensors the recording does not know as they are given
    values (the user's function gets masks for them); the others note ``None`` there, so that
    observing adds no node (the sped-up model's recording must make the same nodes)."""
    handles = []
    for module in modules:
        if module is model or claims(module):
            continue
        noted = observe(module)
        if not (noted or (every and _worth_observing(module))):
            continue
        name = recorder._names.get(id(module), "")
        value = recorder.value_of if noted else recorder.known_value

        def enter(m, args, kwargs, name=name, value=value):
            if recorder.suppress:
                return
            boundary = recorder.graph.observed.get(name)
            if boundary is not None:
                boundary.calls += 1
                return
            values = [value(t) for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            start = len(recorder.graph.nodes)
            recorder.graph.observed[name] = Boundary(m, name, values, [], span=(start, start))

        def leave(m, args, output, name=name, value=value):
            boundary = recorder.graph.observed.get(name)
            if boundary is not None and boundary.calls == 1 and not boundary.output_paths and not recorder.suppress:
                boundary.output_paths = [(path, value(t)) for path, t in iter_tensor_paths(output)]
                boundary.outputs = [v for _, v in boundary.output_paths]
                boundary.span = (boundary.span[0], len(recorder.graph.nodes))

        # Last before forward and first after it: the module's own hooks are not part of its call.
        handles.append(module.register_forward_pre_hook(enter, with_kwargs=True))
        handles.append(module.register_forward_hook(leave, always_call=True, prepend=True))
    return handles


def _worth_observing(module: nn.Module) -> bool:
    """Whether a module traced through may be refilled: one holding parameters or other modules, or one
    written outside torch (a norm without parameters computing ``F.layer_norm``: refilled, it loses
    nothing of its own). Torch's own activation modules are not worth a pair of hooks on each of their
    calls; a scripted module takes none."""
    if isinstance(module, torch.jit.ScriptModule):
        return False
    return bool(module._modules or module._parameters) or not type(module).__module__.startswith("torch.")


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for t in out if isinstance(t, torch.Tensor)]
    return []


def _note_sizes_followed(node: Node, counted_out: bool) -> None:
    """Marks the constants a call makes that follow the sizes the code passed (see
    :attr:`TensorValue.follows_sizes`): those it counts out itself (``counted_out``), or computes
    from such values."""
    if counted_out or any(v.follows_sizes for v in node.inputs):
        for value in node.outputs:
            value.follows_sizes = value.origin is Origin.CONSTANT


def _derived_origin(inputs: list[TensorValue]) -> Origin:
    """Constant when all a call reads is."""
    if all(v.origin.input_independent for v in inputs):
        return Origin.CONSTANT
    return Origin.COMPUTED


@dataclasses.dataclass(frozen=True)
class _OperatorFacts:
    """What the recorder needs to know of an operator, read from its schema once."""

    counted: bool
    """FLOPs are counted for it."""
    seeded: bool
    """It draws random numbers: its result is not a constant even from constant inputs."""
    made_new: bool
    """It reads only the dtype and device of its first argument (``x.new_full(shape, 1.0)``)."""
    lifts: bool
    """It takes in a tensor Python made of numbers (``torch.tensor(s)``)."""
    view: bool
    """Its outputs are views of its first argument (``slice``, ``expand``, ``split``...)."""
    writes: tuple[tuple[int, str], ...]
    """(position, name) of the arguments it writes in place (``self`` of ``add_``, ``out=``)."""
    numbers: tuple[tuple[int, str], ...]
    """(position, name) of the arguments that may be a number standing for a value, not for a
    dimension or a shape: a fill value, an index, the end of a range, the other operand of ``mul``
    (Python passes ``x * 0.5`` as a float where the schema says Tensor). A dtype passed where the
    schema says ``int`` is a ``torch.dtype``, which no number equals."""

    @classmethod
    def of(cls, func: Any) -> "_OperatorFacts":
        schema = func._schema
        return cls(
            counted=flop_count.counted(func),
            seeded=torch.Tag.nondeterministic_seeded in getattr(func, "tags", ()),
            made_new=func._opname in ("new_zeros", "new_ones", "new_full"),
            lifts=func._opname in ("lift_fresh", "lift_fresh_copy"),
            view=any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns),
            writes=tuple((i, a.name) for i, a in enumerate(schema.arguments)
                         if a.alias_info is not None and a.alias_info.is_write),
            numbers=tuple((i, a.name) for i, a in enumerate(schema.arguments)
                          if "dim" not in a.name and "List" not in str(a.type)),
        )

    def passes_number(self, args: tuple, kwargs: dict, numbers: set) -> bool:
        """Whether the call passes one of ``numbers`` as a value argument.

        A model may read a number out of a tensor that depends on the input and make a tensor of it
        (``torch.full(shape, h.sum().item())``): the result is not a constant, though every tensor
        the call reads is. The number itself is all the recording can follow (one computed from it
        in Python is not seen); an equal number written in the code is taken for it, which only
        keeps more."""
        for i, name in self.numbers:
            value = args[i] if i < len(args) else kwargs.get(name)
            if type(value) in (int, float) and value in numbers:
                return True
        if self.lifts and args[0].numel() <= FEW_NUMBERS:  # torch.tensor([s, 1.0])
            return any(number in numbers for number in args[0].detach().cpu().reshape(-1).tolist())
        return False


FEW_NUMBERS = 64
"""Entries up to which a tensor made of Python numbers is read for its numbers (those the input
decided, here; scales, in :mod:`speedup.size_numbers`): more are not written out one by one in a
model's code."""


_FACTS: dict[Any, _OperatorFacts] = {}


def recording() -> bool:
    """Whether a recording is running (its operators are seen by it)."""
    return isinstance(_get_current_dispatch_mode(), _Recorder)


def _written_tensors(facts: _OperatorFacts, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensors an operator writes in place."""
    written = []
    for i, name in facts.writes:
        tensor = args[i] if i < len(args) else kwargs.get(name)
        if isinstance(tensor, torch.Tensor):
            written.append(tensor)
    return written


@dataclasses.dataclass(frozen=True)
class _ViewOf:
    """The view a view operator made of a weight (``output``-th result, or the only one), remade of
    another tensor laid out like the weight (its masked copy); ``inner`` is the view it was made of."""

    func: Any
    args: tuple
    kwargs: dict
    output: Optional[int]
    inner: Optional["_ViewOf"]

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        source = self.inner(tensor) if self.inner is not None else tensor
        out = self.func(source, *self.args, **self.kwargs)
        return out if self.output is None else out[self.output]


def _dense(tensor: torch.Tensor) -> bool:
    """Whether the tensor's strides lay its elements out without gaps or overlaps from offset 0 (as
    ``empty_like`` would), in any order of dimensions."""
    if tensor.layout is not torch.strided:
        return False
    expected = 1
    for size, stride in sorted(zip(tensor.shape, tensor.stride()), key=lambda pair: pair[1]):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _storages(tree: Any) -> set[int]:
    """The storage keys of the tensors in a nested structure (walked here for lists, tuples and dicts,
    what operators and module calls take: ``pytree`` costs tens of microseconds a call)."""
    keys: set[int] = set()
    stack = [tree]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            keys.add(_storage_key(item))
        elif type(item) in (tuple, list):
            stack.extend(item)
        elif type(item) is dict:
            stack.extend(item.values())
        elif not isinstance(item, (int, float, bool, str, type(None))):
            keys.update(_storage_key(t) for t in pytree.tree_leaves(item) if isinstance(t, torch.Tensor))
    return keys


def _version(tensor: torch.Tensor) -> Optional[int]:
    """The tensor's version counter, which in-place writes bump; None for an inference tensor
    (made under ``torch.inference_mode``, a model loaded so holds them), which has none: outside
    inference mode it cannot be written in place at all."""
    return None if tensor.is_inference() else tensor._version


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def _state_key(tensor: torch.Tensor) -> Any:
    """A parameter's or buffer's memory; the tensor itself where it has none yet (an empty buffer a
    quantization observer resizes on its first call: every empty storage is at address 0)."""
    return _storage_key(tensor) or ("empty", id(tensor))
