"""L1 filter pruner example: VGG-16 for CIFAR-10, half the filters of every conv removed.

Reproduces NNI 1.9's "l1filter pruner example" table (input ``torch.randn(64, 3, 32, 32)``): the
filters with the smallest L1 norm go, ``sparsity 0.5`` on every ``Conv2d``.

    python examples/l1filter_vgg_cifar.py [--device cpu|cuda] [--quick] [--out DIR]
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from seed_tables import SeedTable, parse_options, run_seed_table, vgg_cifar
from speedup.pruning import prune

CONFIG = [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}]


def main(argv: Optional[Sequence[str]] = None) -> SeedTable:
    options = parse_options(__doc__.splitlines()[0], argv)
    model = vgg_cifar(depth=16)
    dummy = torch.randn(options.batch, 3, 32, 32)
    masks = prune(model, CONFIG, dummy, metric="l1")
    return run_seed_table("l1filter_vgg16_cifar", "VGG-16 CIFAR-10, l1filter pruner, 50% of conv filters",
                          model, masks, dummy, options)


if __name__ == "__main__":
    main()
