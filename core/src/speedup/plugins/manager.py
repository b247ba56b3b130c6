"""Finding and loading plugins: entry points of the ``speedup`` group, one at a time.

Each entry point is imported and its ``speedup_register_rules`` called on its own, so a plugin
that fails to import or to register is reported with its name, version and error while every
other plugin still loads. ``strict=True`` (or ``SPEEDUP_STRICT_PLUGINS=1``, for CI) turns such a
failure into an error. Core's built-in rules load first, so that installed plugins override them.
"""

from __future__ import annotations

import os
import sys
import traceback
import warnings
from dataclasses import dataclass, field
from types import ModuleType
from typing import Iterable, Optional

import pluggy

from ..errors import PluginLoadError
from . import hookspec
from .pruning_registry import PruningRegistry
from .registry import CORE_DISTRIBUTION, Provider, RuleRegistry

if sys.version_info >= (3, 10):
    from importlib.metadata import entry_points
else:  # pragma: no cover - exercised only on Python 3.9
    from importlib_metadata import entry_points

GROUP = "speedup"


@dataclass
class PluginInfo:
    """One entry point of the ``speedup`` group, and what came of loading it."""

    name: str
    target: str
    distribution: str
    version: str
    error: Optional[str] = None
    modules: list[str] = field(default_factory=list)
    ops: list[str] = field(default_factory=list)
    sizes: list[str] = field(default_factory=list)
    states: list[str] = field(default_factory=list)
    recognisers: list[str] = field(default_factory=list)
    rewrites: list[str] = field(default_factory=list)
    pruning: list[str] = field(default_factory=list)
    """Pruning pieces: ``"metric l1"``, ``"channels torch.nn.modules.conv.Conv2d"``..."""

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class LoadedPlugins:
    registry: RuleRegistry
    plugins: list[PluginInfo]
    pruning: PruningRegistry


_loaded: Optional[LoadedPlugins] = None


def loaded_plugins(strict: Optional[bool] = None) -> LoadedPlugins:
    """The plugins of this process, loaded on first use."""
    global _loaded
    if _loaded is None:
        _loaded = load_plugins(strict=strict)
    return _loaded


def reset() -> None:
    """Forgets the loaded plugins, so the next use scans the entry points again."""
    global _loaded
    _loaded = None


def load_plugins(strict: Optional[bool] = None, extra: Iterable[ModuleType] = ()) -> LoadedPlugins:
    """Scans the ``speedup`` entry points and fills a fresh registry.

    ``extra`` modules are registered after the entry points, as plugins of their own.
    """
    if strict is None:
        strict = strict_from_environment()
    manager = pluggy.PluginManager(hookspec.PROJECT)
    manager.add_hookspecs(hookspec)
    registry = RuleRegistry()
    pruning = PruningRegistry()
    infos: list[PluginInfo] = []
    candidates = sorted(_entry_points(), key=lambda ep: (_distribution(ep)[0] != CORE_DISTRIBUTION, ep.name))
    if not any(_distribution(ep)[0] == CORE_DISTRIBUTION for ep in candidates):
        # Running from a source tree that was never installed: core's rules still come first.
        from .. import rules as core_rules

        infos.append(_register(manager, registry, pruning, core_rules, PluginInfo("torch", "speedup.rules", CORE_DISTRIBUTION, "source")))
    for ep in candidates:
        distribution, version = _distribution(ep)
        info = PluginInfo(ep.name, ep.value, distribution, version)
        try:
            module = ep.load()
        except Exception as exc:  # noqa: BLE001 - any import failure is the plugin's, reported below
            info.error = _describe(exc)
        else:
            _register(manager, registry, pruning, module, info)
        infos.append(info)
    for module in extra:
        infos.append(_register(manager, registry, pruning, module, PluginInfo(module.__name__, module.__name__, module.__name__, "")))
    failed = [info for info in infos if not info.ok]
    for info in failed:
        message = f"speedup plugin '{info.name}' ({info.distribution} {info.version}) failed to load: {info.error}"
        if strict:
            raise PluginLoadError(message)
        warnings.warn(message + " Its rules are not available; the other plugins are.", stacklevel=2)
    return LoadedPlugins(registry, infos, pruning)


def strict_from_environment() -> bool:
    """``SPEEDUP_STRICT_PLUGINS`` set to 1/true/yes/on makes a plugin that fails to load an error."""
    return os.environ.get("SPEEDUP_STRICT_PLUGINS", "").strip().lower() in ("1", "true", "yes", "on")


def _register(manager: pluggy.PluginManager, registry: RuleRegistry, pruning: PruningRegistry, module: ModuleType,
              info: PluginInfo) -> PluginInfo:
    tables = [(registry, name) for name in ("modules", "ops", "sizes", "states", "recognisers", "rewrites")]
    tables += [(pruning, name) for name in PruningRegistry.TABLES]
    before = {(id(owner), name): dict(getattr(owner, name)) for owner, name in tables}
    try:
        manager.register(module, name=f"{info.distribution}:{info.name}")
        registry.provider = pruning.provider = Provider(info.distribution, info.version)
        for hook, target in ((manager.hook.speedup_register_rules, registry),
                             (manager.hook.speedup_register_pruning, pruning)):
            for impl in hook.get_hookimpls():
                if impl.plugin is module:
                    impl.function(registry=target)
    except Exception as exc:  # noqa: BLE001 - a broken plugin must not stop the others
        info.error = _describe(exc)
        for owner, name in tables:
            setattr(owner, name, before[(id(owner), name)])
        if manager.is_registered(module):
            manager.unregister(module)
        return info
    finally:
        registry.provider = pruning.provider = Provider(CORE_DISTRIBUTION, "")
    for owner, name in tables:
        added = sorted(k for k, e in getattr(owner, name).items() if before[(id(owner), name)].get(k) is not e)
        if owner is registry:
            setattr(info, name, added)
        else:
            info.pruning += [f"{PruningRegistry.TABLES[name]} {k}" for k in added]
    return info


def _entry_points() -> list:
    return list(entry_points(group=GROUP))


def _distribution(ep) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return ("unknown", "")
    return (dist.metadata["Name"] or dist.name, dist.version)


def _describe(exc: BaseException) -> str:
    last = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    where = f" (at {last[0].filename}:{last[0].lineno})" if last else ""
    return f"{type(exc).__name__}: {exc}{where}"
