"""The RMS norms that Hugging Face models define in Python (``LlamaRMSNorm``, ``T5LayerNorm``, ...).

Traced as operators, their ``mean`` over the hidden dimension would keep that dimension whole (a
mean over fewer entries divides by another count), so no hidden channel could go. Recorded as one
module instead, they follow core's LayerNorm analysis: a hidden channel may go where it holds a
constant (zero, for a masked residual stream), which must still count in the mean square.

The replacement stays an instance of the model's own class, so a saved model needs no new code:
with ``N`` channels before, ``n`` kept and ``s`` the sum of squares of the removed constants,

    w * x * rsqrt((sum x^2 + s) / N + eps) == (w * sqrt(N / n)) * x * rsqrt(sum x^2 / n + (eps * N + s) / n)

so the weight is scaled by ``sqrt(N / n)`` and ``variance_epsilon`` becomes ``(eps * N + s) / n``.
"""

from __future__ import annotations

import math
from typing import Optional

from torch import nn

from speedup.graph import Node
from speedup.plugins.registry import RuleRegistry
from speedup.replacement import ModulePlan
from speedup.rules.norm import LayerNormRule
from speedup.rules.toolkit import clone_module

RMS_NORMS = (
    "transformers.models.llama.modeling_llama.LlamaRMSNorm",
    "transformers.models.mistral.modeling_mistral.MistralRMSNorm",
    "transformers.models.qwen2.modeling_qwen2.Qwen2RMSNorm",
    "transformers.models.t5.modeling_t5.T5LayerNorm",
)
"""Classes computing ``weight * x * rsqrt(mean(x^2, -1) + variance_epsilon)``."""

LAST = -1


class RMSNormRule(LayerNormRule):
    subclasses = False

    def normalized_dim(self, node: Node) -> Optional[int]:
        return LAST

    def replace(self, module: nn.Module, plan: ModulePlan) -> nn.Module:
        new = clone_module(module)
        weight = plan.param("weight")
        full, kept = plan.input().shape[LAST], plan.count(plan.input(), LAST)
        _, removed_values = plan.removed_input_constants(LAST)
        if kept == full or kept == 0:
            new.weight = weight
            return new
        new.weight = nn.Parameter(weight.detach() * math.sqrt(full / kept), requires_grad=weight.requires_grad)
        new.variance_epsilon = (module.variance_epsilon * full + float(removed_values.pow(2).sum())) / kept
        return new


def register(registry: RuleRegistry) -> None:
    rule = RMSNormRule()
    for name in RMS_NORMS:
        registry.add_module(name, rule)
