"""Mask half the channels of a ResNet-50, speed it up, and compare it with the masked model.

Run with ``bash dev.sh demo`` (sets up the environment on first use). Prints parameters, FLOPs,
CPU latency of the masked and the sped-up model, the time the speedup took, and the largest
difference between their outputs on a fresh input.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision
from torch import nn

import speedup
from speedup.testing import masked_copy


def half_channel_masks(model: nn.Module) -> dict:
    """Masks the second half of the output channels of every conv (and its BatchNorm).

    Using the same indices in every layer keeps residual additions consistent (both branches lose
    the same channels), so everything masked can really go.
    """
    masks = {}
    modules = dict(model.named_modules())
    for name, module in modules.items():
        if isinstance(module, nn.Conv2d):
            keep = torch.arange(module.out_channels) < (module.out_channels + 1) // 2
            masks[name] = {"weight": keep[:, None, None, None].expand_as(module.weight)}
        elif isinstance(module, nn.BatchNorm2d):
            keep = torch.arange(module.num_features) < (module.num_features + 1) // 2
            masks[name] = {"weight": keep, "bias": keep}
    return masks


def latency(model: nn.Module, x: torch.Tensor, repeats: int) -> float:
    with torch.no_grad():
        model(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)
    options = parser.parse_args()
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    masks = half_channel_masks(model)
    masked = masked_copy(model, masks).eval()
    dummy = torch.randn(options.batch, 3, 224, 224)

    report = speedup.shrink(model, masks, dummy)

    fresh = torch.randn(options.batch, 3, 224, 224)
    with torch.no_grad():
        difference = (masked(fresh) - model(fresh)).abs().max().item()
    masked_time, fast_time = latency(masked, fresh, options.repeats), latency(model, fresh, options.repeats)
    rows = [
        ("parameters", f"{report.params_before:,}", f"{report.params_after:,}", f"{report.param_ratio:.2f}x"),
        ("FLOPs", f"{report.flops_before / 1e9:.2f} G", f"{report.flops_after / 1e9:.2f} G", f"{report.flops_ratio:.2f}x"),
        ("latency (CPU, batch %d)" % options.batch, f"{masked_time * 1000:.1f} ms", f"{fast_time * 1000:.1f} ms",
         f"{masked_time / fast_time:.2f}x faster"),
    ]
    print("ResNet-50, second half of every conv's channels masked\n")
    print(f"{'':24s} {'masked':>14s} {'sped up':>14s} {'ratio':>14s}")
    for row in rows:
        print(f"{row[0]:24s} {row[1]:>14s} {row[2]:>14s} {row[3]:>14s}")
    print(f"\nspeedup call: {report.timings['total']:.2f} s "
          f"({report.timings['total'] / masked_time:.1f} forward passes of the masked model)")
    print(f"max |masked - sped up| on a fresh input: {difference:.2e}")


if __name__ == "__main__":
    main()
