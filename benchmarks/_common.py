"""Helpers shared by the benchmark scripts: threads, timing, masks, FLOPs, tables and JSON results.

Nothing here is part of speedup; the scripts import it as a sibling module (``from _common import ...``,
with ``benchmarks/`` on ``sys.path``, which ``python benchmarks/<script>.py`` gives).
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import platform
import statistics
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch
from torch import nn

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# torch picks its intra-op thread count at start-up (the number of physical cores); remember it
# before anything could change it, so every script can set it back explicitly.
DEFAULT_THREADS = torch.get_num_threads()


def use_default_threads() -> int:
    """Sets torch's intra-op threads to torch's own default; returns the count."""
    torch.set_num_threads(DEFAULT_THREADS)
    return DEFAULT_THREADS


def flush_denormals(enabled: bool = True) -> bool:
    """Treats denormal floats as zero on the CPU (``torch.set_flush_denormal``); returns whether it took.

    On the small x86 VMs these benchmarks run on, forwards of the very same model on the very same
    input were seen to vary between 0.1 s and 2 s (ViT-B/16, 2 threads) or to be 10x slow for the
    first runs at batch 8, with no denormal value in any weight or activation: the slow
    microcode path is hit on scratch memory inside the kernels, at random. Flushing makes the
    timings repeatable; it changes no result of these models (none of their values is denormal).
    """
    return bool(torch.set_flush_denormal(enabled))


def environment() -> dict:
    """What the numbers were measured on, for the JSON file."""
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    for name in ("torchvision", "transformers", "torch_pruning", "speedup"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "?")
        except Exception as exc:  # noqa: BLE001 - only informative
            info[name] = f"not importable ({type(exc).__name__})"
    try:
        from importlib.metadata import version

        info["torch_pruning_dist"] = version("torch-pruning")
    except Exception:  # noqa: BLE001
        pass
    return info


# --------------------------------------------------------------------------------------------
# Timing


def wall(fn: Callable[[], Any]) -> tuple[Any, float]:
    """Runs ``fn`` once; returns its result and the wall time in seconds."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def interleaved_latency(models: Mapping[str, nn.Module], inputs: Any, *, warmup: int = 2, repeats: int = 10,
                        budget_s: Optional[float] = None, warmup_s: float = 30.0,
                        warm_round: bool = True) -> dict[str, dict]:
    """Median forward latency (seconds) of each model on ``inputs``, under ``torch.no_grad()``.

    Runs are interleaved (one run of each model per round, the order rotating every round) so that
    slow drifts of the machine (frequency, other load) hit every model alike. ``budget_s`` stops
    after the round in which the time spent on measured rounds passes it (at least 3 rounds).
    Each model is warmed up with :func:`settle` (at least ``warmup`` runs, for at most about
    ``warmup_s``), then ``warm_round`` runs one unmeasured interleaved round, so that switching
    between models is warm too (leave it out for models whose forward takes minutes: the median
    absorbs a slow first round). Returns ``{name: {"median": s, "min": s, "runs": n}}``.
    """
    names = list(models)
    with torch.no_grad():
        warm = {name: settle(models[name], inputs, min_runs=warmup, max_s=warmup_s) for name in names}
        for name in names if warm_round else ():
            call(models[name], inputs)
        samples: dict[str, list[float]] = {name: [] for name in names}
        started = time.perf_counter()
        for round_ in range(repeats):
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                t0 = time.perf_counter()
                call(models[name], inputs)
                samples[name].append(time.perf_counter() - t0)
            if budget_s is not None and round_ >= 2 and time.perf_counter() - started > budget_s:
                break
    return {name: {"median": statistics.median(s), "min": min(s), "runs": len(s), "warmup_runs": warm[name]}
            for name, s in samples.items()}


def settle(model: nn.Module, inputs: Any, *, min_runs: int = 2, max_runs: int = 12, tolerance: float = 0.15,
           max_s: float = 30.0) -> int:
    """Warms ``model`` up until two consecutive runs agree within ``tolerance``; returns the runs made.

    The first forwards on large inputs are often several times slower than the steady state (the
    allocator returning and re-faulting big activation buffers, oneDNN picking kernels), by
    seconds at batch 8 on a small CPU; a fixed count of one or two warm-up runs is not enough.
    """
    previous = None
    started = time.perf_counter()
    runs = 0
    with torch.no_grad():
        while runs < max_runs:
            t0 = time.perf_counter()
            call(model, inputs)
            elapsed = time.perf_counter() - t0
            runs += 1
            settled = previous is not None and abs(elapsed - previous) <= tolerance * min(elapsed, previous)
            if runs >= min_runs and (settled or time.perf_counter() - started > max_s):
                break
            previous = elapsed
    return runs


def _proc_kib(path: str, field: str) -> Optional[int]:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


@contextlib.contextmanager
def memory_limit(fraction: float = 0.85):
    """Makes allocations fail (``MemoryError`` / torch's "can't allocate memory") instead of the OOM killer.

    Sets the soft address-space limit (``RLIMIT_AS``) to this process's current virtual size plus
    ``fraction`` of the memory available now (``MemAvailable``), and puts it back on exit. Without
    ``/proc`` or ``resource`` (not Linux) it does nothing. Yields the limit in bytes (or None).
    """
    try:
        import resource
    except ImportError:
        resource = None
    size, available = _proc_kib("/proc/self/status", "VmSize"), _proc_kib("/proc/meminfo", "MemAvailable")
    if resource is None or size is None or available is None:
        yield None
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = (size + int(available * fraction)) * 1024
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield limit
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


# --------------------------------------------------------------------------------------------
# Masks


def keep_first(count: int) -> int:
    """How many entries "keep the first half" keeps: ``ceil(count / 2)``."""
    return math.ceil(count / 2)


def first_half_mask(tensor: torch.Tensor, dim: int, keep: Optional[int] = None) -> torch.Tensor:
    """A bool mask of ``tensor``'s shape: True at indices ``< keep`` along ``dim`` (default ``ceil(n/2)``)."""
    size = tensor.shape[dim]
    keep = keep_first(size) if keep is None else keep
    line = torch.arange(size) < keep
    shape = [1] * tensor.dim()
    shape[dim] = size
    return line.reshape(shape).expand(tensor.shape).clone()


def rows_mask(module: nn.Module, keep: Optional[int] = None) -> dict[str, torch.Tensor]:
    """``{"weight": ..., "bias": ...}`` keeping the first output channels (rows) of a conv or linear."""
    masks = {"weight": first_half_mask(module.weight, 0, keep)}
    if getattr(module, "bias", None) is not None:
        masks["bias"] = first_half_mask(module.bias, 0, keep)
    return masks


def random_channel_masks(model: nn.Module, classifiers: Iterable[nn.Module] = (), seed: int = 0) -> dict:
    """Masks "a" of the zoo benchmarks: every Conv2d / Linear but ``classifiers`` loses a random half
    (floor) of its output channels, with their biases."""
    generator = torch.Generator().manual_seed(seed)
    skipped = {id(m) for m in classifiers}
    masks: dict = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and id(module) not in skipped:
            rows = module.weight.shape[0]
            keep = torch.ones(rows, dtype=torch.bool)
            keep[torch.randperm(rows, generator=generator)[: rows // 2]] = False
            entry = {"weight": keep.reshape([rows] + [1] * (module.weight.dim() - 1)).expand(module.weight.shape)}
            if module.bias is not None:
                entry["bias"] = keep
            masks[name] = entry
    return masks


def add_mask(masks: dict, module_name: str, target: str, mask: torch.Tensor) -> None:
    """Adds ``mask`` for ``module_name.target``, combining (AND) with a mask already there."""
    entry = masks.setdefault(module_name, {})
    entry[target] = entry[target] & mask if target in entry else mask


def mask_density(masks: Mapping[str, Mapping[str, torch.Tensor]]) -> float:
    """Fraction of masked parameter entries that are kept (over the masked parameters only)."""
    kept = total = 0
    for entry in masks.values():
        for mask in entry.values():
            kept += int(mask.sum())
            total += mask.numel()
    return kept / total if total else 1.0


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> int:
    """Gives every BatchNorm random running statistics and affine parameters; returns how many.

    Freshly built models have mean 0, var 1, weight 1, bias 0, under which masked channels hold
    exactly 0; random values make them hold non-zero constants, which speedup must fold.
    """
    generator = torch.Generator().manual_seed(seed)
    count = 0
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                if module.running_mean is not None:
                    module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                    module.running_var.copy_(torch.rand(n, generator=generator) * 0.5 + 0.75)
                if module.weight is not None:
                    module.weight.copy_(torch.rand(n, generator=generator) * 0.5 + 0.75)
                    module.bias.copy_(torch.randn(n, generator=generator) * 0.1)
                count += 1
    return count


def randomize_zero_parameters(model: nn.Module, generator: torch.Generator, scale: float) -> None:
    """Gives every parameter that is all zeros (a zero-initialised output layer, gate or layer scale)
    random values of standard deviation ``scale``, so that the model's outputs depend on every layer."""
    with torch.no_grad():
        for param in model.parameters():
            if param.numel() and float(param.abs().max()) == 0:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


# --------------------------------------------------------------------------------------------
# Model facts


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@contextlib.contextmanager
def no_fused_attention():
    """Turns off torch's fused MultiheadAttention / TransformerEncoderLayer fast path (for counting FLOPs)."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    previous = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(previous)


def count_flops(model: nn.Module, inputs: Any) -> int:
    """FLOPs of one forward, counted the way speedup's report counts them (fused attention off)."""
    from speedup.flops import FlopCounter

    counter = FlopCounter()
    with torch.no_grad(), no_fused_attention(), counter:
        call(model, inputs)
    return counter.total


def outputs(value: Any) -> list[torch.Tensor]:
    """The tensors of a model's output, in order."""
    from speedup.tracer import iter_tensors

    return [t for t in iter_tensors(value) if isinstance(t, torch.Tensor)]


def max_difference(reference: Any, candidate: Any) -> tuple[float, float]:
    """Largest absolute difference between two outputs, and the reference's largest magnitude."""
    worst = scale = 0.0
    for a, b in zip(outputs(reference), outputs(candidate)):
        if a.shape != b.shape:
            return math.inf, float(a.abs().max())
        if a.is_floating_point() and a.numel():
            worst = max(worst, float((a.double() - b.double()).abs().max()))
            scale = max(scale, float(a.double().abs().max()))
    return worst, scale


# --------------------------------------------------------------------------------------------
# Output


def fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return str(value)
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)


def print_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str, str]], title: str = "") -> str:
    """Prints ``rows`` as an aligned text table; ``columns`` are ``(key, header, format spec)``."""
    cells = [[header for _, header, _ in columns]]
    for row in rows:
        cells.append([fmt(row.get(key), spec) for key, _, spec in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = []
    if title:
        lines.append(title)
    for i, line in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if i and j else c.ljust(w) for j, (c, w) in enumerate(zip(line, widths))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def save_json(name: str, payload: Any) -> Path:
    """Writes ``payload`` to ``benchmarks/results/<name>.json`` (the folder is git-ignored)."""
    return write_json(RESULTS_DIR / f"{name}.json", payload)


def write_json(path: "str | Path", payload: Any) -> Path:
    """Writes ``payload`` as JSON to ``path`` (any location; parent folders created), as :func:`save_json` does."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    return str(value)


class StreamTable:
    """A text table printed one row at a time (each line flushed), for runs that take hours.

    ``columns`` are ``(key, header, format spec, width)``; a cell wider than its width pushes the
    rest of its line right (nothing is cut). The last column is left-aligned and never padded, so
    it can hold free text (a status, an error message).
    """

    def __init__(self, columns: Sequence[tuple[str, str, str, int]]):
        self.columns = [(key, header, spec, max(width, len(header))) for key, header, spec, width in columns]

    def _line(self, cells: Sequence[str]) -> str:
        parts = []
        for i, (cell, (_, _, _, width)) in enumerate(zip(cells, self.columns)):
            if i == len(self.columns) - 1:
                parts.append(cell)
            elif i == 0:
                parts.append(cell.ljust(width))
            else:
                parts.append(cell.rjust(width))
        return "  ".join(parts).rstrip()

    def header(self) -> str:
        """Prints (and returns) the header line and the rule under it."""
        text = self._line([header for _, header, _, _ in self.columns]) + "\n" + "  ".join(
            "-" * width for _, _, _, width in self.columns)
        print(text, flush=True)
        return text

    def row(self, row: Mapping[str, Any]) -> str:
        """Prints (and returns) one row; missing keys print as ``-``."""
        text = self._line([fmt(row.get(key), spec) for key, _, spec, _ in self.columns])
        print(text, flush=True)
        return text


def bench_each(names: Sequence[str], bench: Callable[[str], tuple[list[dict], dict]]) -> tuple[list[dict], list[dict], float]:
    """Runs ``bench(name) -> (table rows, details)`` for each model; returns all rows, all details and
    the wall time. A model that raises gets an error row and its traceback, and the run goes on."""
    started = time.perf_counter()
    rows: list[dict] = []
    details: list[dict] = []
    for name in names:
        print(f"\n== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            model_rows, model_details = bench(name)
        except Exception as exc:  # noqa: BLE001 - one model's failure must not stop the run
            message = f"{type(exc).__name__}: {exc}"
            print(f"  FAILED: {message}", flush=True)
            traceback.print_exc(limit=6)
            model_rows = [{"model": name, "error": message}]
            model_details = {"model": name, "error": message, "traceback": traceback.format_exc()}
        model_details["bench_wall_s"] = time.perf_counter() - t0
        rows += model_rows
        details.append(model_details)
        gc.collect()
    return rows, details, time.perf_counter() - started


def report_lines(info: Mapping[str, Any]) -> list[str]:
    """What a model's details say about its speedup call: barriers, calls kept for verification,
    the first warnings."""
    lines = []
    if info.get("barriers"):
        lines.append(f"barriers ({len(info['barriers'])}): {'; '.join(info['barriers'][:3])}")
    if info.get("kept_for_verification"):
        lines.append(f"kept for verification: {'; '.join(info['kept_for_verification'][:3])}")
    warned = info.get("report_warnings", [])
    lines += [f"warning: {w}" for w in warned[:2]]
    if len(warned) > 2:
        lines.append(f"... {len(warned) - 2} more speedup warnings")
    return lines


def split_list(text: Optional[str], known: Iterable[str]) -> list[str]:
    """Parses ``"a,b"`` against the known names (order of ``known``); raises on an unknown name."""
    known = list(known)
    if not text:
        return known
    wanted = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in wanted if t not in known]
    if unknown:
        raise SystemExit(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    return [k for k in known if k in wanted]
