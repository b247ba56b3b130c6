"""FPGM pruner example: NNI's LeNet-style MNIST net, half the filters of each conv removed.

Reproduces NNI 1.9's "fpgm pruner example" table (input ``torch.randn(64, 1, 28, 28)``): FPGM
removes the filters closest to the geometric median of their layer (the most replaceable ones), as
NNI's example did with ``sparsity 0.5`` on every ``Conv2d``.

    python examples/fpgm_lenet_mnist.py [--device cpu|cuda] [--quick] [--out DIR]
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from seed_tables import SeedTable, lenet_mnist, parse_options, run_seed_table
from speedup.pruning import prune

CONFIG = [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}]


def main(argv: Optional[Sequence[str]] = None) -> SeedTable:
    options = parse_options(__doc__.splitlines()[0], argv)
    model = lenet_mnist()
    dummy = torch.randn(options.batch, 1, 28, 28)
    masks = prune(model, CONFIG, dummy, metric="fpgm")
    return run_seed_table("fpgm_lenet_mnist", "LeNet MNIST, fpgm pruner, 50% of conv filters",
                          model, masks, dummy, options)


if __name__ == "__main__":
    main()
