"""The table of rules that plugins fill, and how a node finds its rule in it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Union

import torch
from torch import nn

from ..errors import PluginConflictError
from ..rule import ModuleRule, OpRule

CORE_DISTRIBUTION = "speedup-core"

OpKey = Union[str, torch._ops.OpOverload, torch._ops.OpOverloadPacket]
SizeAttributes = Callable[[nn.Module], Mapping[str, Any]]
"""``fn(module) -> {attribute: value}``: attributes of a module that repeat sizes of its parts."""
Companions = Callable[[nn.Module], Mapping[str, str]]
"""``fn(module) -> {tensor path: attribute it follows}``: tensors a module holds that follow the
entries of one of its tensors without being read while it runs (see :meth:`RuleRegistry.add_companions`)."""


@dataclass(frozen=True)
class Provider:
    """The distribution that registered a rule."""

    distribution: str
    version: str

    def __str__(self) -> str:
        return f"{self.distribution} {self.version}"


@dataclass
class _Entry:
    rule: Any
    provider: Provider


@dataclass
class RuleRegistry:
    """Rules by module type and by operator name, each with the distribution that provided it."""

    modules: dict[Union[type, str], _Entry] = field(default_factory=dict)
    """Rules by module type, or by the type's qualified name (``"transformers.pytorch_utils.Conv1D"``)."""
    ops: dict[str, _Entry] = field(default_factory=dict)
    sizes: dict[str, _Entry] = field(default_factory=dict)
    """Size-attribute functions by the module type's qualified name (see :meth:`add_sizes`)."""
    companions: dict[str, _Entry] = field(default_factory=dict)
    """Companion-tensor functions by the module type's qualified name (see :meth:`add_companions`)."""
    states: dict[str, _Entry] = field(default_factory=dict)
    """Types of model state found in outputs, by qualified name (see :meth:`add_state`)."""
    recognisers: dict[str, _Entry] = field(default_factory=dict)
    """Functions that claim a module by what it computes, by qualified name (see :meth:`add_recogniser`)."""
    rewrites: dict[str, _Entry] = field(default_factory=dict)
    """Equivalent forms of module types, by the type's qualified name (see :meth:`add_rewrite`)."""
    conflicts: dict[Any, tuple[Provider, Provider]] = field(default_factory=dict)
    """Targets claimed by two installed plugins; using one is an error unless the call overrides it."""
    provider: Provider = Provider(CORE_DISTRIBUTION, "")
    """Set by the plugin manager before it calls each plugin's hook."""
    _by_type: dict = field(default_factory=dict, repr=False)
    _state_types: dict = field(default_factory=dict, repr=False)

    def add_module(self, module_type: Union[type, str], rule: ModuleRule) -> None:
        """Claims ``module_type`` (exactly; subclasses only if ``rule.subclasses``).

        ``module_type`` may be the class or its qualified name, ``"package.module.ClassName"``: a
        name lets a plugin register without importing a heavy library until a model uses it.
        """
        key = module_key(module_type, "add_module")
        if not isinstance(rule, ModuleRule):
            raise TypeError(f"the rule for {key} must be a ModuleRule, got {type(rule).__name__}")
        self._put(self.modules, key, rule, key)

    def add_sizes(self, module_type: Union[type, str], sizes: SizeAttributes) -> None:
        """Keeps attributes of ``module_type`` that repeat a size in step with the sizes of its parts.

        For a module that is traced through (not claimed by a rule) but whose ``forward`` reads a
        stored size: torchvision's ``VisionTransformer`` reshapes with ``self.hidden_dim``, which must
        follow ``conv_proj.out_channels`` once that shrinks. After the speedup rebuilt the module's
        parts, ``sizes(module)`` returns ``{attribute: new value}`` and the engine sets each one that
        changed (undone like every other change if the speedup fails). A dotted attribute
        (``"config.hidden_size"``) is set on the object the module holds, which the model first gets a
        copy of (every module holding it then holds the copy): another model may share it. Applies to
        subclasses too.
        """
        key = module_key(module_type, "add_sizes")
        if not callable(sizes):
            raise TypeError(f"the sizes of {key} must be a function of the module, got {sizes!r}")
        self._put(self.sizes, key, sizes, key)

    def add_companions(self, module_type: Union[type, str], companions: Companions) -> None:
        """Declares tensors of ``module_type`` that follow the entries of another of its tensors
        without being read while the model runs, so the trace never sees them.

        A fake-quantize module reads its per-channel ``scale``; its observer's statistics, from which
        that scale is computed and which ``torch.ao.quantization.convert`` reads, are read only while
        the observer is on. ``companions(module)`` returns ``{tensor path: attribute it follows}``
        (``{"activation_post_process.min_val": "scale"}``, dotted for a tensor a part holds); when
        the followed tensor loses entries, each companion of its shape loses the same ones (undone
        like every other change if the speedup fails). Applies to subclasses too.
        """
        key = module_key(module_type, "add_companions")
        if not callable(companions):
            raise TypeError(f"the companions of {key} must be a function of the module, got {companions!r}")
        self._put(self.companions, key, companions, key)

    def add_state(self, state_type: Union[type, str]) -> None:
        """Declares a type of object that a model returns as state to be given back to it later.

        A key/value cache is the example: its tensors are not results the caller reads but what
        the model itself reads at its next call, so they follow the model's new sizes (fewer heads)
        instead of keeping their shapes, and verification does not compare them. Applies to
        subclasses too; given as the class or its qualified name.
        """
        if isinstance(state_type, str):
            if "." not in state_type:
                raise TypeError(f"a state type given by name needs its module path, got {state_type!r}")
            key = state_type
        elif isinstance(state_type, type):
            key = qualified_name(state_type)
        else:
            raise TypeError(f"add_state needs a type or its qualified name, got {state_type!r}")
        if key not in self.states:  # two plugins saying the same thing do not conflict
            self._put(self.states, key, True, key)

    def is_state(self, obj: Any) -> bool:
        """Whether ``obj`` (found in a model's output) is state declared with :meth:`add_state`."""
        cls = type(obj)
        known = self._state_types.get(cls)
        if known is None:
            known = self._state_types[cls] = any(qualified_name(base) in self.states for base in cls.__mro__)
        return known

    def add_recogniser(self, recognise: Callable[[nn.Module], Optional[ModuleRule]]) -> None:
        """Claims modules by what they compute rather than by their type.

        For a module that no registered type claims (a subclass overriding ``forward`` included),
        ``recognise(module)`` returns the rule for that very module, or ``None`` to leave it traced
        through. It may run the module on small probe inputs: core recognises layer norms written
        by hand (timm's ``LayerNorm2d``, Hugging Face's ``ConvNextLayerNorm``) that way. It is asked
        once per module and call, latest registered first (plugins before core); it must only
        recognise what it has checked, as a wrong rule gives a model the verification rejects.
        """
        if not callable(recognise):
            raise TypeError(f"a recogniser must be a function of the module, got {recognise!r}")
        key = f"{getattr(recognise, '__module__', '')}.{getattr(recognise, '__qualname__', repr(recognise))}"
        self._put(self.recognisers, key, recognise, key)

    def recognised_rule(self, module: nn.Module) -> Optional[ModuleRule]:
        """The rule a recogniser finds for ``module`` (checked by the caller only when no type claims it)."""
        for entry in reversed(list(self.recognisers.values())):
            rule = entry.rule(module)
            if rule is not None:
                return rule
        return None

    def add_rewrite(self, module_type: Union[type, str], rewrite: Callable[[nn.Module], Optional[nn.Module]]) -> None:
        """Gives ``module_type`` (exactly, not its subclasses) an equivalent form that loses more.

        Some code cannot lose entries and still run as written: ShuffleNet's ``x.chunk(2)`` and its
        channel shuffle cut and interleave at fixed places, so a block would have to keep as many
        channels in each half, and the shuffle ties the halves of every block after it.
        ``rewrite(module)`` returns a module computing the very same function for every input (the
        same submodules, with those fixed places as index tensors a rule can renumber, such as
        :class:`~speedup.modules.ChannelGather`), or ``None`` to keep the module as it is. Before a
        model is recorded, each module of the type is put in the model in that form; the form stays
        where the speedup changed something inside it, and the module is put back wherever it did
        not. Since the recording runs the form, the verification cannot tell a wrong form from the
        module: check the form against the module (on probe inputs) before returning it.
        """
        key = module_key(module_type, "add_rewrite")
        if not callable(rewrite):
            raise TypeError(f"the rewrite of {key} must be a function of the module, got {rewrite!r}")
        self._put(self.rewrites, key, rewrite, key)

    def rewritten(self, module: nn.Module) -> Optional[nn.Module]:
        """The equivalent form registered for ``module``'s exact type, or ``None``."""
        if not self.rewrites:
            return None
        key = qualified_name(type(module))
        if key in self.conflicts and key in self.rewrites:
            raise PluginConflictError(self.conflict_message(key))
        entry = self.rewrites.get(key)
        return entry.rule(module) if entry is not None else None

    def add_op(self, op: OpKey, rule: OpRule) -> None:
        """Claims an ATen operator: ``"aten.add.Tensor"``, ``"aten.add"`` or the torch object."""
        if not isinstance(rule, OpRule):
            raise TypeError(f"the rule for {op} must be an OpRule, got {type(rule).__name__}")
        key = op_key(op)
        self._put(self.ops, key, rule, key)

    def add_ops(self, ops: list, rule: OpRule) -> None:
        for op in ops:
            self.add_op(op, rule)

    def _put(self, table: dict, key: Any, rule: Any, label: str) -> None:
        claim(table, key, rule, self.provider, self.conflicts)
        self._by_type.clear()
        self._state_types.clear()

    def conflict_message(self, key: Any) -> str:
        first, second = self.conflicts[key]
        label = key.rpartition(".")[2] if isinstance(key, str) and not key.startswith("aten.") else key
        return (f"both {first} and {second} register a rule for {label}. Uninstall one of them, or choose per "
                "call with customized_replace_func.")

    # -- lookup -----------------------------------------------------------------------------

    def module_rule(self, module: nn.Module) -> Optional[ModuleRule]:
        """The rule claiming this module; raises :class:`PluginConflictError` if two plugins do."""
        cls = type(module)
        if cls not in self._by_type:
            self._by_type[cls] = self._find_module_rule(cls)
        return self._by_type[cls]

    def _find_module_rule(self, cls: type) -> Optional[ModuleRule]:
        key = qualified_name(cls)
        if key in self.conflicts:
            raise PluginConflictError(self.conflict_message(key))
        entry = self.modules.get(key)
        if entry is not None:
            return entry.rule
        for base in cls.__mro__[1:]:
            entry = self.modules.get(qualified_name(base))
            if entry is not None and entry.rule.subclasses and not _overrides_forward(cls, base):
                return entry.rule
        return None

    def size_attributes(self, module: nn.Module) -> Optional[SizeAttributes]:
        """The size-attribute function for this module's type or its nearest registered base."""
        return nearest(self.sizes, type(module), self.conflicts, self.conflict_message)

    def companions_of(self, module: nn.Module) -> Optional[Companions]:
        """The companion-tensor function for this module's type or its nearest registered base."""
        return nearest(self.companions, type(module), self.conflicts, self.conflict_message)

    def provider_of(self, target: Union[type, str]) -> Optional[Provider]:
        """Which distribution's rule applies to a module type (or name) or an operator key."""
        key = qualified_name(target) if isinstance(target, type) else target
        entry = self.modules.get(key) or self.ops.get(key)
        return entry.provider if entry is not None else None

    def has_conflict(self, module: nn.Module) -> bool:
        return qualified_name(type(module)) in self.conflicts

    def op_rule(self, func: Any) -> Optional[OpRule]:
        if not isinstance(func, torch._ops.OpOverload):
            return None
        for key in _lookup_keys(func):
            if key in self.conflicts:
                raise PluginConflictError(self.conflict_message(key))
            entry = self.ops.get(key)
            if entry is not None:
                return entry.rule
        return None


def nearest(table: dict, cls: type, conflicts: dict, conflict_message: Callable[[str], str]) -> Any:
    """What ``table`` holds for ``cls`` or its nearest base (by qualified name); ``None`` if nothing.
    A key two plugins claimed is a :class:`PluginConflictError` with ``conflict_message(key)``."""
    for base in cls.__mro__:
        key = qualified_name(base)
        if key in conflicts and key in table:
            raise PluginConflictError(conflict_message(key))
        entry = table.get(key)
        if entry is not None:
            return entry.rule
    return None


def claim(table: dict, key: Any, value: Any, provider: Provider, conflicts: dict) -> None:
    """Puts ``value`` under ``key``; a second non-core distribution claiming the key is a conflict.

    Core's built-ins load first and any plugin may replace them; two plugins disagreeing is
    recorded in ``conflicts`` (key -> both providers) and reported when the key is used.
    """
    previous = table.get(key)
    if previous is not None and previous.provider.distribution not in (CORE_DISTRIBUTION, provider.distribution):
        conflicts[key] = (previous.provider, provider)
    table[key] = _Entry(value, provider)


def module_key(module_type: Union[type, str], method: str) -> str:
    """A module type's key: its qualified name, given as the class or as the name itself."""
    if isinstance(module_type, str):
        if "." not in module_type:
            raise TypeError(f"a module type given by name needs its module path, got {module_type!r}")
        return module_type
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"{method} needs an nn.Module subclass, got {module_type!r}")
    return qualified_name(module_type)


def qualified_name(cls: type) -> str:
    """Types are keyed by qualified name, so a rule registered by name matches the class itself."""
    return f"{cls.__module__}.{cls.__qualname__}"


def op_key(op: OpKey) -> str:
    if isinstance(op, torch._ops.OpOverload):
        return f"{op.namespace}.{op._opname}.{op._overloadname}"
    if isinstance(op, torch._ops.OpOverloadPacket):
        return op._qualified_op_name.replace("::", ".")
    if isinstance(op, str):
        return op.replace("::", ".")
    raise TypeError(f"an operator is named by a string or a torch op, got {op!r}")


def _lookup_keys(func: torch._ops.OpOverload) -> list[str]:
    name, overload = f"{func.namespace}.{func._opname}", func._overloadname
    keys = [f"{name}.{overload}", name]
    if func._opname.endswith("_") and not func._opname.startswith("_"):
        # In-place variants (add_) behave like the functional operator on their first argument.
        plain = f"{func.namespace}.{func._opname[:-1]}"
        keys += [f"{plain}.{overload}", plain]
    return keys


def _overrides_forward(cls: type, base: type) -> bool:
    return cls.__dict__.get("forward") is not None or any(
        "forward" in klass.__dict__ for klass in cls.__mro__[1 : cls.__mro__.index(base)]
    )
