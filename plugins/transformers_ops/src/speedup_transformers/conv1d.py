"""GPT-2's ``Conv1D``: a linear layer whose weight is stored transposed, ``(in_features, out_features)``.

Core's linear rule, with the weight's dimensions swapped; the replacement also updates ``nf`` and
``nx``, since ``Conv1D.forward`` reshapes its output with ``self.nf``.
"""

from __future__ import annotations

from torch import nn

from speedup.rules.linear import LinearRule


class Conv1DRule(LinearRule):
    subclasses = False
    weight_in = 0

    def set_sizes(self, new: nn.Module, in_features: int, out_features: int) -> None:
        new.nx, new.nf = in_features, out_features
