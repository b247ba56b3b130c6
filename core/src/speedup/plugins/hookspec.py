"""The plugin surface of speedup: one hook, documented here.

A plugin is a module with functions marked ``@speedup.hookimpl``, published through the
``speedup`` entry-point group::

    [project.entry-points.speedup]
    my_ops = "my_package.speedup_rules"

Core's own rules for ``torch`` operators and modules are a plugin declared the same way (the
``torch`` entry point of ``speedup-core``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from .pruning_registry import PruningRegistry
    from .registry import RuleRegistry

PROJECT = "speedup"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def speedup_register_rules(registry: "RuleRegistry") -> None:
    """Register the rules this plugin contributes.

    Called exactly once per plugin, when the plugin manager is built (the first time speedup
    needs rules in a process), never per model or per node: the engine looks rules up in the
    table that these calls fill.

    :param registry: the :class:`~speedup.plugins.registry.RuleRegistry` to fill. Call
        ``registry.add_module(module_type, rule)`` with a :class:`~speedup.rule.ModuleRule` for a
        module type the plugin knows as a whole (it is then recorded as one node and replaced by the
        rule), and ``registry.add_op(op, rule)`` with an :class:`~speedup.rule.OpRule` for an ATen
        operator (``"aten.add.Tensor"`` for one overload, ``"aten.add"`` for all of them). Call
        ``registry.add_sizes(module_type, fn)`` for a module type that is traced through but whose
        ``forward`` reads a stored size (``self.hidden_dim``): ``fn(module)`` returns the attributes
        to set once its parts have shrunk (``{"hidden_dim": module.conv_proj.out_channels}``). Call
        ``registry.add_companions(module_type, fn)`` for tensors a module holds that follow another
        of its tensors without being read while it runs (an observer's statistics beside the scale a
        fake-quantize module reads): ``fn(module)`` returns ``{tensor path: attribute it follows}``. Call
        ``registry.add_state(type)`` for a type of object a model returns only to be given back to
        it (a key/value cache): its tensors then follow the model's new sizes. Call
        ``registry.add_recogniser(fn)`` to claim modules by what they compute rather than by type:
        for a module no type claims, ``fn(module)`` returns the rule for it or ``None``. Call
        ``registry.add_rewrite(module_type, fn)`` where a type's code cuts channels at fixed places
        (ShuffleNet's ``chunk`` and channel shuffle): ``fn(module)`` returns an equivalent module
        whose fixed places are index tensors a rule renumbers, used in the model's place while it
        is sped up and kept where something inside it shrank.
    :return: nothing; the registrations are the result.

    A plugin's registration replaces core's built-in rule for the same target. Two installed plugins
    registering the same target is an error naming both distributions; a user resolves it per call
    with ``customized_replace_func`` or by uninstalling one.
    """


@hookspec
def speedup_register_pruning(registry: "PruningRegistry") -> None:
    """Register the pruning pieces this plugin contributes (optional; most plugins only have rules).

    Called once per plugin, right after :func:`speedup_register_rules`.

    :param registry: the :class:`~speedup.plugins.pruning_registry.PruningRegistry` to fill. Call
        ``registry.add_metric(name, factory)`` with ``factory(**options) -> Metric`` for a metric
        (what decides which units matter least; see :class:`speedup.pruning.metrics.Metric`),
        ``registry.add_granularity(name, fn)`` for a way of cutting a parameter into units
        (``fn(selected, parameter_name, tensor, layout) -> Blocks``), ``registry.add_schedule(name, factory)``
        for an iterative schedule (see :class:`speedup.pruning.scheduling.Schedule`), and
        ``registry.add_channels(module_type, ChannelLayout(...))`` to say where a module type keeps
        its input and output channels (what ``out_channel`` / ``in_channel`` and activation metrics
        mean for it).
    :return: nothing; the registrations are the result.

    As with rules, a plugin's piece replaces core's built-in of the same name, and two installed
    plugins registering the same name is an error naming both distributions when the name is used.
    """
