"""Measuring and presenting a seed speedup table (NNI 1.9's "Speedup Results of Examples").

NNI's table times ``Times`` consecutive forward passes (total seconds) of the masked model and of the
sped-up model, for Times in 1, 2, 4, ..., 32. Here both are measured in the same run, interleaved
(masked, then sped up, alternately, for a few rounds; the median per row), so that drifts of the
machine hit both alike. Before timing, the two models are checked to give the same outputs on a
fresh input: a faster model that computes something else would be no result.

The example scripts build a model and its masks (with :func:`speedup.pruning.prune`) and call
:func:`run_seed_table`; nothing here is part of speedup. They import this file as a sibling module,
which ``python examples/<script>.py`` allows (the script's folder is on ``sys.path``).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter
from torch import nn

import speedup
from speedup.testing import assert_same_outputs, masked_copy, parameter_count

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TIMES = (1, 2, 4, 8, 16, 32)
QUICK_TIMES = (1, 2)

# NNI's VGG for CIFAR-10 (examples/model_compress/models/cifar10/vgg.py): 3x3 convs, "M" = 2x2 maxpool.
VGG_LAYOUTS = {
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512),
    19: (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512),
}


# --------------------------------------------------------------------------------------------
# Models


class VGGCifar(nn.Module):
    """NNI's VGG for 32x32 CIFAR images: the VGG convs (2x2 left after four pools), a 2x2 average
    pool, and a two-layer classifier with a BatchNorm between its linears, for 10 classes."""

    def __init__(self, depth: int = 16, batchnorm: bool = True, num_classes: int = 10):
        super().__init__()
        self.features = _vgg_features(VGG_LAYOUTS[depth], batchnorm)
        width = VGG_LAYOUTS[depth][-1]
        self.avgpool = nn.AvgPool2d(2)
        self.classifier = nn.Sequential(
            nn.Linear(width, 512),
            nn.BatchNorm1d(512) if batchnorm else nn.Identity(),
            nn.ReLU(inplace=True),
            nn.Linear(512, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def _vgg_features(layout: Sequence, batchnorm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = 3
    for entry in layout:
        if entry == "M":
            layers.append(nn.MaxPool2d(2, 2))
            continue
        # A bias before a BatchNorm is redundant (NNI leaves it out); without BatchNorm the conv keeps it.
        layers.append(nn.Conv2d(channels, entry, 3, padding=1, bias=not batchnorm))
        if batchnorm:
            layers.append(nn.BatchNorm2d(entry))
        layers.append(nn.ReLU(inplace=True))
        channels = entry
    return nn.Sequential(*layers)


class LeNetMnist(nn.Module):
    """NNI's naive MNIST net: conv 1->20 and 20->50 (5x5), each followed by ReLU and a 2x2 maxpool,
    then linears 800->500->10 and log-softmax.

    NNI flattened with ``x.view(-1, 4 * 4 * 50)``; the batch size is kept explicit here
    (``flatten(x, 1)``), so that the shape still means the same thing once conv2 has fewer channels.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5, 1)
        self.conv2 = nn.Conv2d(20, 50, 5, 1)
        self.fc1 = nn.Linear(4 * 4 * 50, 500)
        self.fc2 = nn.Linear(500, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2, 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2, 2)
        x = torch.relu(self.fc1(torch.flatten(x, 1)))
        return nn.functional.log_softmax(self.fc2(x), dim=1)


def vgg_cifar(depth: int = 16, batchnorm: bool = True, seed: int = 0) -> nn.Module:
    """A VGG-``depth`` CIFAR-10 net in eval mode, with trained-like BatchNorms (see :func:`trained_like`)."""
    torch.manual_seed(seed)
    return trained_like(VGGCifar(depth, batchnorm), seed).eval()


def lenet_mnist(seed: int = 0) -> nn.Module:
    """NNI's naive LeNet-style MNIST net in eval mode."""
    torch.manual_seed(seed)
    return LeNetMnist().eval()


def trained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """Gives every BatchNorm random affine parameters and running statistics; returns ``model``.

    Fresh BatchNorms (mean 0, var 1, weight 1, bias 0) map a removed channel to exactly 0, which would
    make the equality check too easy; after training, a removed channel leaves a constant the speedup
    must carry into the next layer. Slim pruning also ranks channels by these weights, which would
    all tie at 1.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                module.weight.copy_(torch.rand(n, generator=generator) * 0.9 + 0.1)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=generator) * 0.5 + 0.75)
    return model


# --------------------------------------------------------------------------------------------
# Command line


@dataclass(frozen=True)
class Options:
    """What an example script was asked for on its command line."""

    device: torch.device
    out: Path
    times: tuple[int, ...]
    rounds: int
    batch: int
    warmup: int
    """Forwards of each model before timing."""


def parse_options(description: str, argv: Optional[Sequence[str]] = None, batch: int = 64) -> Options:
    """Parses the flags every example shares: ``--device``, ``--quick``, ``--out``, ``--rounds``.

    ``--quick`` (times 1 and 2, one round, batch 8, one warm-up forward) is for the tests: it runs
    the whole path (pruning, speedup, check, table, plot) in seconds, and measures nothing meaningful.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="times 1 and 2, one round, batch 8 (for tests)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder of the PNG and JSON files")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per row (the median is kept)")
    args = parser.parse_args(argv)
    if args.quick:
        return Options(torch.device(args.device), args.out, QUICK_TIMES, rounds=1, batch=8, warmup=1)
    return Options(torch.device(args.device), args.out, TIMES, args.rounds, batch, warmup=3)


# --------------------------------------------------------------------------------------------
# Measuring


@dataclass
class Row:
    """One line of a seed table: total seconds of ``times`` consecutive forwards of each model."""

    times: int
    mask_latency: float
    speedup_latency: float

    @property
    def speedup(self) -> float:
        return self.mask_latency / self.speedup_latency


@dataclass
class SeedTable:
    """A measured seed table and what it was measured on."""

    name: str
    title: str
    device: str
    input_shape: tuple[int, ...]
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    max_abs_diff: float
    """Largest output difference between the masked and the sped-up model on a fresh input."""
    speedup_seconds: float
    """Wall time of the ``speedup_model()`` call."""
    rounds: int
    rows: list[Row] = field(default_factory=list)
    png: Optional[Path] = None
    json: Optional[Path] = None


def run_seed_table(name: str, title: str, model: nn.Module, masks: dict, dummy: torch.Tensor,
                   options: Options) -> SeedTable:
    """Speeds up ``model`` with ``masks``, checks it against the masked model, measures, prints,
    draws and saves the table; returns it.

    ``model`` is moved to the device and otherwise left as it is (the speedup works on a copy).
    ``name`` names the files, ``<out>/<name>_<device>.png`` and ``.json``; ``title`` heads the
    printout and the plot.
    """
    device = options.device
    model, dummy, masks = model.to(device).eval(), dummy.to(device), masks_on(masks, device)
    masked = masked_copy(model, masks)
    speeder = speedup.ModelSpeedup(copy.deepcopy(model), dummy, masks)
    started = time.perf_counter()
    sped = speeder.speedup_model()
    speedup_seconds = time.perf_counter() - started
    difference = assert_same_outputs(masked, sped, torch.randn_like(dummy))
    table = SeedTable(
        name=name, title=title, device=device.type, input_shape=tuple(dummy.shape),
        params_before=parameter_count(model), params_after=parameter_count(sped),
        flops_before=speeder.report.flops_before, flops_after=speeder.report.flops_after,
        max_abs_diff=difference, speedup_seconds=speedup_seconds, rounds=options.rounds,
        rows=measure_rows(masked, sped, dummy, options.times, options.rounds, options.warmup),
    )
    print(present(table), flush=True)
    stem = options.out / f"{name}_{device.type}"
    table.png = plot(table, stem.with_suffix(".png"))
    table.json = save_json(table, stem.with_suffix(".json"))
    print(f"saved {table.png} and {table.json}")
    return table


def masks_on(masks: dict, device: torch.device) -> dict:
    """The masks moved to ``device``: speedup multiplies them with the parameters, which live there."""
    return {module: {target: mask.to(device) for target, mask in entry.items()} for module, entry in masks.items()}


def measure_rows(masked: nn.Module, sped: nn.Module, x: torch.Tensor, times: Sequence[int],
                 rounds: int, warmup: int) -> list[Row]:
    """The table's rows: for each count, ``rounds`` interleaved timings of each model; the medians.

    Each model runs ``warmup`` forwards first, so that one-time costs (kernel selection, allocator
    growth) do not land in the first rows; the order within a round alternates so that neither
    model always runs right after the other.
    """
    models = (masked, sped)
    with torch.no_grad(), flushed_denormals(x.device):
        for model in models:
            timed_forwards(model, x, warmup)
        rows = []
        for count in times:
            samples: tuple[list[float], list[float]] = ([], [])
            for round_ in range(rounds):
                order = (0, 1) if round_ % 2 == 0 else (1, 0)
                for i in order:
                    samples[i].append(timed_forwards(models[i], x, count))
            rows.append(Row(count, statistics.median(samples[0]), statistics.median(samples[1])))
    return rows


def timed_forwards(model: nn.Module, x: torch.Tensor, count: int) -> float:
    """Seconds taken by ``count`` consecutive forwards; on CUDA, until the GPU has finished them."""
    synchronize(x.device)
    started = time.perf_counter()
    for _ in range(count):
        model(x)
    synchronize(x.device)
    return time.perf_counter() - started


def synchronize(device: torch.device) -> None:
    """Waits for queued GPU work: CUDA calls return before the kernels ran."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def flushed_denormals(device: torch.device) -> Iterator[None]:
    """Treats denormal floats as zero on the CPU while timing.

    On small x86 machines the same forward was seen to vary several-fold from one run to the next
    on the slow denormal path inside the kernels; flushing makes CPU timings repeatable and changes
    no result that matters here (the equality check runs before, without it).
    """
    if device.type != "cpu":
        yield
        return
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)  # torch's default; torch offers no way to read the setting


# --------------------------------------------------------------------------------------------
# Presenting


def present(table: SeedTable) -> str:
    """The table in the seed's markdown layout (plus a speedup column), and a line of facts under it."""
    lines = [
        f"### {table.title}",
        "",
        f"on {table.device}, input tensor: `torch.randn{table.input_shape}`, median of {table.rounds} round(s)",
        "",
        "|Times| Mask Latency| Speedup Latency | Speedup |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r.times} | {r.mask_latency:.5f} | {r.speedup_latency:.5f} | {r.speedup:.2f}x |" for r in table.rows]
    lines += [
        "",
        f"params {table.params_before:,} -> {table.params_after:,} "
        f"({table.params_after / table.params_before:.1%}), "
        f"FLOPs {table.flops_before / 1e6:,.1f} M -> {table.flops_after / 1e6:,.1f} M "
        f"({table.flops_after / table.flops_before:.1%}), "
        f"max |masked - sped up| on a fresh input {table.max_abs_diff:.2e}, "
        f"speedup call {table.speedup_seconds:.2f} s",
    ]
    return "\n".join(lines)


def plot(table: SeedTable, path: Path) -> Path:
    """Draws latency against Times for both models (log-log: the counts double) into a PNG."""
    figure = Figure(figsize=(6, 4.2), layout="constrained")
    axes = figure.subplots()
    times = [r.times for r in table.rows]
    axes.plot(times, [r.mask_latency for r in table.rows], "o-", label="masked")
    axes.plot(times, [r.speedup_latency for r in table.rows], "s-", label="sped up")
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    # Labels at 1, 2, 5 times powers of ten, in plain numbers; the other ticks unlabelled.
    axes.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axes.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    axes.yaxis.set_minor_formatter(NullFormatter())
    axes.set_xticks(times, [str(t) for t in times])
    axes.set_xlabel("Times (consecutive forward passes)")
    axes.set_ylabel("latency, total seconds")
    axes.set_title(f"{table.title}\n{table.device}, input {tuple(table.input_shape)}", fontsize=10)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path


def save_json(table: SeedTable, path: Path) -> Path:
    """Writes the table (rows with their speedup) as JSON, for comparing runs."""
    payload = asdict(table)
    del payload["png"], payload["json"]
    payload["rows"] = [{**asdict(r), "speedup": r.speedup} for r in table.rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
