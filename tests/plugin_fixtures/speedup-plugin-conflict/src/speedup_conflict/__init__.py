"""Test fixture: claims ``speedup_example.ScaledLinear``, which speedup-plugin-example claims too.

With both installed, loading plugins must fail with ``PluginConflictError`` naming both distributions.
"""

import speedup
from speedup_example import ScaledLinear, ScaledLinearRule


class OtherScaledLinearRule(ScaledLinearRule):
    name = "OtherScaledLinear"


@speedup.hookimpl
def speedup_register_rules(registry):
    registry.add_module(ScaledLinear, OtherScaledLinearRule())
