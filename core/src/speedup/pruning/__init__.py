"""Pruning: masks from the four orthogonal pieces of a pruning algorithm, driven by NNI 3.0 config lists.

>>> from speedup.pruning import prune
>>> masks = prune(model, [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}], dummy_input, metric="l1")
>>> speedup.shrink(model, masks, dummy_input)

* **target** (:mod:`.targets`): what is pruned: output or input channels, heads, blocks of a tensor;
* **metric** (:mod:`.metrics`): L1, L2, FPGM, slim, APoZ, mean activation, Taylor, random;
* **allocation** (:mod:`.allocation`): per layer, global groups, min/max ratios, dependency groups
  read off the traced graph (coupled layers prune the same channels), ``align``;
* **scheduling** (:mod:`.scheduling`): one-shot, linear, AGP, with a fine-tune callback;
* **objective** (:mod:`.objective`): a FLOPs, parameter or latency ratio met by searching the sparsity.

Every piece is looked up by name in the registry that plugins fill through the
``speedup_register_pruning`` hook; core's built-ins are registered the same way.
"""

from .metrics import Calibration, Metric
from .objective import Objective
from .pruner import Pruner, prune
from ..plugins.pruning_registry import ChannelLayout, PruningRegistry
from .scheduling import AGP, Linear, OneShot, Schedule, masks_applied
from .targets import Blocks, Target

__all__ = ["prune", "Pruner", "Calibration", "Metric", "Objective", "Schedule", "OneShot", "Linear", "AGP",
           "masks_applied", "ChannelLayout", "PruningRegistry", "Blocks", "Target"]
