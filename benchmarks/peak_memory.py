"""Benchmark: the memory a speedup call takes on top of the model, and its time.

For each torchvision model named, with random weights prepared as in ``torchvision_zoo.py`` and masks
(b) (``consistent_masks(sparsity=0.5)``): the process's resident memory is sampled every 2 ms during
one ``speedup.shrink`` call; the peak above the resident memory just before the call is printed with
the call's wall time. Large models are where it matters: a call that held a second copy of the weights
would need twice the model's memory.

Usage::

    bash dev.sh bench peak_memory --models vit_l_16,vit_h_14

One model per process is the fairer measure (the allocator keeps freed memory): run it once per model.
"""

from __future__ import annotations

import argparse
import gc
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torchvision  # noqa: E402

from _common import flush_denormals, use_default_threads  # noqa: E402
from torchvision_zoo import classifier_layers, image, input_size, prepare  # noqa: E402

import speedup  # noqa: E402
from speedup.groups import consistent_masks  # noqa: E402


def resident_mib() -> int:
    """The process's resident memory (``VmRSS``), in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
    return 0


def measure(name: str) -> str:
    size, _ = input_size(name, None)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torchvision.models.get_model(name, weights=None).eval()
    prepare(model, classifier_layers(model, False))
    dummy = image(1, size, 0)
    masks = consistent_masks(model, dummy, sparsity=0.5, seed=0)
    with torch.no_grad():
        model(dummy)
    gc.collect()
    before = peak = resident_mib()
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, resident_mib())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        speedup.shrink(model, masks, dummy)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    return (f"{name:20s} resident before the call {before:6d} MiB, peak during it {peak:6d} MiB "
            f"(+{peak - before} MiB), call {seconds:.2f} s")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vit_l_16", help="comma list of torchvision model names")
    args = parser.parse_args(argv)
    if not Path("/proc/self/status").exists():
        raise SystemExit("peak_memory reads /proc/self/status (Linux only)")
    use_default_threads()
    flush_denormals()
    for name in args.models.split(","):
        print(measure(name.strip()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
