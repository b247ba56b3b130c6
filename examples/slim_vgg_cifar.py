"""Slim pruner example: VGG-19 for CIFAR-10, 70% of the BatchNorm channels removed (one global ranking).

Reproduces NNI 1.9's "slim pruner example" table (input ``torch.randn(64, 3, 32, 32)``): network
slimming ranks channels by the absolute scaling factor of their BatchNorm, over all layers at once,
as NNI's example did with ``sparsity 0.7`` on VGG-19.

    python examples/slim_vgg_cifar.py [--device cpu|cuda] [--quick] [--out DIR]
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from seed_tables import SeedTable, parse_options, run_seed_table, vgg_cifar
from speedup.pruning import prune

CONFIG = [{"op_types": ["BatchNorm2d"], "sparse_ratio": 0.7, "global_group_id": "bn"}]


def main(argv: Optional[Sequence[str]] = None) -> SeedTable:
    options = parse_options(__doc__.splitlines()[0], argv)
    model = vgg_cifar(depth=19)
    dummy = torch.randn(options.batch, 3, 32, 32)
    masks = prune(model, CONFIG, dummy, metric="slim")
    return run_seed_table("slim_vgg19_cifar", "VGG-19 CIFAR-10, slim pruner, 70% of BatchNorm channels",
                          model, masks, dummy, options)


if __name__ == "__main__":
    main()
