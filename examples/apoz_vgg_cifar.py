"""APoZ pruner example: VGG-16 for CIFAR-10, half the filters of every conv removed by activations.

Reproduces NNI 1.9's "APoZ pruner example" table (input ``torch.randn(64, 3, 32, 32)``): APoZ
(average percentage of zeros) removes the channels whose activations are most often zero, measured
on calibration batches; random images stand in for CIFAR-10 here (4 batches, the size of the table's
input), ``sparsity 0.5`` on every ``Conv2d``.

    python examples/apoz_vgg_cifar.py [--device cpu|cuda] [--quick] [--out DIR]
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from seed_tables import SeedTable, parse_options, run_seed_table, vgg_cifar
from speedup.pruning import Calibration, prune

CONFIG = [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}]
CALIBRATION_BATCHES = 4


def main(argv: Optional[Sequence[str]] = None) -> SeedTable:
    options = parse_options(__doc__.splitlines()[0], argv)
    model = vgg_cifar(depth=16)
    dummy = torch.randn(options.batch, 3, 32, 32)
    calibration = Calibration([torch.randn(options.batch, 3, 32, 32) for _ in range(CALIBRATION_BATCHES)])
    masks = prune(model, CONFIG, dummy, metric="apoz", calibration=calibration)
    return run_seed_table("apoz_vgg16_cifar", "VGG-16 CIFAR-10, APoZ pruner, 50% of conv filters",
                          model, masks, dummy, options)


if __name__ == "__main__":
    main()
