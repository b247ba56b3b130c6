"""The RMS norms that Hugging Face models define in Python (``LlamaRMSNorm``, ``T5LayerNorm``, ...).

Traced as operators, their ``mean`` over the hidden dimension would keep that dimension whole (a
mean over fewer entries divides by another count), so no hidden channel could go. Recorded as one
module instead, they follow core's :class:`~speedup.rules.written_norms.ScaledRMSNormRule`: a hidden channel
may go where it holds a constant (zero, for a masked residual stream), which still counts in the
mean square, and the replacement stays an instance of the model's own class.

The classes listed here are claimed by name; core's RMS-norm recogniser finds the many copies other
model families define under their own names (``MixtralRMSNorm``, Gemma's ``1 + weight``...).
"""

from __future__ import annotations

from speedup.plugins.registry import RuleRegistry
from speedup.rules.written_norms import ScaledRMSNormRule

RMS_NORMS = (
    "transformers.models.llama.modeling_llama.LlamaRMSNorm",
    "transformers.models.mistral.modeling_mistral.MistralRMSNorm",
    "transformers.models.qwen2.modeling_qwen2.Qwen2RMSNorm",
    "transformers.models.t5.modeling_t5.T5LayerNorm",
)
"""Classes computing ``weight * x * rsqrt(mean(x^2, -1) + variance_epsilon)``."""


def register(registry: RuleRegistry) -> None:
    rule = ScaledRMSNormRule(offset=0.0, eps_attribute="variance_epsilon")
    for name in RMS_NORMS:
        registry.add_module(name, rule)
