"""Dev-only workaround: let ``import torchvision`` succeed against the CPU build of torch.

torchvision 0.28.0 from PyPI ships a compiled extension built for CUDA torch. Against the CPU
build of torch 2.13.0 the extension does not load, and ``import torchvision`` then fails while
registering a fake kernel for ``torchvision::nms``. Defining the two operator schemas first lets
torchvision and all its models import and run (only its detection operators stay unavailable).

The dev setup (``dev.sh``) installs this module into the virtual environment together with a
``.pth`` line that calls :func:`install`. It only acts when torchvision is imported and its own
extension cannot be loaded, so on a machine where torchvision works it does nothing. It never
ships with the speedup packages.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys


def _define_missing_schemas() -> None:
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            for name in ("_C.so", "_C.pyd"):
                try:
                    torch.ops.load_library(f"{folder}/{name}")
                    return
                except (OSError, RuntimeError):
                    continue
    library = torch.library.Library("torchvision", "DEF")  # noqa: F841 - kept alive below
    library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARIES.append(library)


_LIBRARIES: list = []


class _TorchvisionFinder(importlib.abc.MetaPathFinder):
    """Runs the schema definition once, just before torchvision itself is imported."""

    def find_spec(self, fullname, path, target=None):  # noqa: D102 - importlib protocol
        if fullname != "torchvision":
            return None
        sys.meta_path.remove(self)
        _define_missing_schemas()
        return None


def install() -> None:
    if "torchvision" not in sys.modules and not any(
        isinstance(finder, _TorchvisionFinder) for finder in sys.meta_path
    ):
        sys.meta_path.insert(0, _TorchvisionFinder())
