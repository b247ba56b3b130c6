"""Config lists in NNI 3.0's format: which modules are pruned, how much, and together with what.

A config list is a list of dicts; each selects modules and says how to prune them::

    [{"op_types": ["Conv2d"], "sparse_ratio": 0.5, "exclude_op_names": ["conv1"]},
     {"op_names_re": [r"layer4\\..*"], "op_types": ["Conv2d"], "sparse_ratio": 0.7, "global_group_id": "deep"}]

Selection: a module is selected when it matches ``op_types`` (class name or qualified name) and, if
given, one of ``op_names`` / ``op_names_re`` (full match); ``exclude_op_names`` /
``exclude_op_names_re`` / ``exclude_op_types`` take modules out again. A later entry overrides an
earlier one for the same module; an entry with ``"exclude": True`` (NNI 2.x) excludes what it selects.
NNI 2.x's ``sparsity`` / ``sparsity_per_layer`` mean ``sparse_ratio``; ``total_sparsity`` means
``sparse_ratio`` shared by all the entry's modules (a global group of its own).

Every problem is a :class:`~speedup.errors.ConfigError` naming the entry (by index) and the key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

from torch import nn

from ..errors import ConfigError

Granularity = Union[str, tuple[int, ...]]

_SELECTION = ("op_types", "op_names", "op_names_re", "exclude_op_names", "exclude_op_names_re", "exclude_op_types")
_SETTINGS = ("sparse_ratio", "min_sparse_ratio", "max_sparse_ratio", "target_names", "granularity",
             "global_group_id", "dependency_group_id", "align", "exclude")
_ALIASES = {"sparsity": "sparse_ratio", "sparsity_per_layer": "sparse_ratio"}
_UNSUPPORTED = {
    "sparse_threshold": "prune by ratio (sparse_ratio) instead",
    "apply_method": "masks here are always 0/1 multipliers ('mul')",
    "target_settings": "use target_names and granularity",
    "fuse_names": "module fusion is not part of pruning here",
    "quant_dtype": "this is a pruning config list, not a quantization one",
}


@dataclass(frozen=True)
class Align:
    """Take this module's mask from another module's: ``{"module_name", "target_name", "dims"}``."""

    module_name: str
    target_name: str
    dims: tuple[int, ...]


@dataclass
class ConfigEntry:
    """One dict of a config list, checked."""

    index: int
    sparse_ratio: Optional[float] = None
    min_sparse_ratio: float = 0.0
    max_sparse_ratio: float = 1.0
    target_names: Optional[tuple[str, ...]] = None
    granularity: Granularity = "out_channel"
    global_group_id: Any = None
    dependency_group_id: Any = None
    align: Optional[Align] = None
    exclude: bool = False
    selection: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def where(self, key: str = "") -> str:
        return f"config_list[{self.index}]" + (f"['{key}']" if key else "")


@dataclass
class Selected:
    """A module the config list prunes, with the entry that governs it."""

    name: str
    module: nn.Module
    entry: ConfigEntry


def parse_config_list(config_list: Sequence[dict]) -> list[ConfigEntry]:
    """Checks every entry's keys and values; raises :class:`ConfigError` on the first problem."""
    if isinstance(config_list, dict):
        config_list = [config_list]
    if not isinstance(config_list, (list, tuple)) or not config_list:
        raise ConfigError(f"a config list is a non-empty list of dicts, got {config_list!r}")
    return [_parse_entry(i, raw) for i, raw in enumerate(config_list)]


def select_modules(model: nn.Module, entries: list[ConfigEntry]) -> tuple[list[Selected], set[str]]:
    """The modules each entry prunes (a later entry wins) and the names excluded explicitly."""
    modules = dict(model.named_modules())
    chosen: dict[str, Selected] = {}
    excluded: set[str] = set()
    for entry in entries:
        names = _matching(entry, modules)
        if not names and not entry.exclude:
            raise ConfigError(f"{entry.where()} selects no module of the model ({_describe(entry)}). Check the "
                              "names against model.named_modules() and the types against their class names.")
        for name in names:
            if entry.exclude:
                chosen.pop(name, None)
                excluded.add(name)
            else:
                chosen[name] = Selected(name, modules[name], entry)
        excluded |= _excluded_by(entry, modules)
    for name in excluded:
        chosen.pop(name, None)
    return list(chosen.values()), excluded


def _parse_entry(index: int, raw: Any) -> ConfigEntry:
    entry = ConfigEntry(index)
    if not isinstance(raw, dict):
        raise ConfigError(f"{entry.where()} must be a dict, got {type(raw).__name__}")
    raw = dict(raw)
    for old, new in _ALIASES.items():
        if old in raw:
            raw.setdefault(new, raw.pop(old))
    if "total_sparsity" in raw:
        raw.setdefault("sparse_ratio", raw.pop("total_sparsity"))
        raw.setdefault("global_group_id", f"total_sparsity of config_list[{index}]")
    for key in raw:
        if key in _UNSUPPORTED:
            raise ConfigError(f"{entry.where(key)} is not supported: {_UNSUPPORTED[key]}")
        if key not in _SELECTION and key not in _SETTINGS:
            raise ConfigError(f"{entry.where(key)} is not a config key. Known keys: {', '.join(_SELECTION + _SETTINGS)}")
    for key in _SELECTION:
        if key in raw:
            entry.selection[key] = _names(entry, key, raw[key])
    if not any(k in entry.selection for k in ("op_types", "op_names", "op_names_re")):
        raise ConfigError(f"{entry.where()} selects nothing: give op_types, op_names or op_names_re")
    for key in ("op_names_re", "exclude_op_names_re"):
        for pattern in entry.selection.get(key, ()):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"{entry.where(key)}: {pattern!r} is not a regular expression ({exc})") from None
    entry.exclude = bool(raw.get("exclude", False))
    if "align" in raw:
        entry.align = _align(entry, raw["align"])
    for key in ("sparse_ratio", "min_sparse_ratio", "max_sparse_ratio"):
        if key in raw:
            setattr(entry, key, _ratio(entry, key, raw[key]))
    if entry.min_sparse_ratio > entry.max_sparse_ratio:
        raise ConfigError(f"{entry.where()}: min_sparse_ratio {entry.min_sparse_ratio} exceeds max_sparse_ratio "
                          f"{entry.max_sparse_ratio}")
    if "target_names" in raw:
        entry.target_names = _names(entry, "target_names", raw["target_names"])
    if "granularity" in raw:
        entry.granularity = _granularity(entry, raw["granularity"])
    entry.global_group_id = raw.get("global_group_id")
    entry.dependency_group_id = raw.get("dependency_group_id")
    return entry


def _names(entry: ConfigEntry, key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{entry.where(key)} must be a list of strings, got {value!r}")
    return tuple(value)


def _ratio(entry: ConfigEntry, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"{entry.where(key)} must be a number between 0 and 1, got {value!r}")
    if key == "sparse_ratio" and value >= 1.0:
        raise ConfigError(f"{entry.where(key)} = 1 would remove every unit; use a ratio below 1")
    return float(value)


def _granularity(entry: ConfigEntry, value: Any) -> Granularity:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, int) and (v > 0 or v == -1) for v in value):
        return tuple(value)
    raise ConfigError(f"{entry.where('granularity')} must be a name ('out_channel', 'in_channel', 'head', "
                      f"'element') or a list of block sizes (-1 for a whole dimension), got {value!r}")


def _align(entry: ConfigEntry, value: Any) -> Align:
    if not isinstance(value, dict) or not isinstance(value.get("module_name"), str):
        raise ConfigError(f"{entry.where('align')} must be a dict with module_name (str), target_name and dims, "
                          f"got {value!r}")
    dims = value.get("dims", [0])
    if not isinstance(dims, (list, tuple)) or not all(isinstance(d, int) for d in dims):
        raise ConfigError(f"{entry.where('align')}['dims'] must be a list of ints, got {dims!r}")
    return Align(value["module_name"], str(value.get("target_name", "weight")), tuple(dims))


def _matching(entry: ConfigEntry, modules: dict[str, nn.Module]) -> list[str]:
    selection = entry.selection
    names, patterns = _names_and_patterns(entry, modules, "op_names")
    by_name = "op_names" in selection or "op_names_re" in selection
    types = selection.get("op_types")
    found = []
    for name, module in modules.items():
        if by_name and name not in names and not any(p.fullmatch(name) for p in patterns):
            continue
        if types is not None and not _is_type(module, types):
            continue
        if name == "" and not by_name:
            continue  # op_types alone never selects the model itself
        found.append(name)
    return found


def _excluded_by(entry: ConfigEntry, modules: dict[str, nn.Module]) -> set[str]:
    names, patterns = _names_and_patterns(entry, modules, "exclude_op_names")
    types = entry.selection.get("exclude_op_types", ())
    return {n for n, m in modules.items()
            if n in names or any(p.fullmatch(n) for p in patterns) or (types and _is_type(m, types))}


def _names_and_patterns(entry: ConfigEntry, modules: dict[str, nn.Module], key: str) -> tuple[set[str], list]:
    """The names under ``key`` (each must be a module of the model) and the compiled ``key + '_re'``."""
    names = set(entry.selection.get(key, ()))
    missing = sorted(n for n in names if n not in modules)
    if missing:
        raise ConfigError(f"{entry.where(key)} names {', '.join(repr(m) for m in missing)}, which the model does not "
                          "have. Module names are those of model.named_modules().")
    return names, [re.compile(p) for p in entry.selection.get(key + "_re", ())]


def _is_type(module: nn.Module, types: tuple[str, ...]) -> bool:
    cls = type(module)
    return cls.__name__ in types or f"{cls.__module__}.{cls.__qualname__}" in types


def _describe(entry: ConfigEntry) -> str:
    return ", ".join(f"{k}={list(v)}" for k, v in entry.selection.items() if not k.startswith("exclude"))
