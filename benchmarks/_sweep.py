"""What the generality sweeps share (``timm_models``, ``hf_architectures``): one row per model and kind
of masks, from a speedup compared with the masked model on a fresh input, and the summary lines."""

from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

import speedup
from speedup.engine import closeness
from speedup.plugins.manager import loaded_plugins
from speedup.testing import masked_copy, run
from speedup.tracer import iter_tensors

from _common import RESULTS_DIR, environment, print_table, write_json

COLUMNS = [("model", "model", ""), ("masks", "masks", ""), ("status", "status", ""), ("max_diff", "max |diff|", ".1e"),
           ("param_ratio", "params a/b", ".3f"), ("flops_ratio", "FLOPs a/b", ".3f"), ("kept", "kept", ""),
           ("attributes", "sizes set", ""), ("shrink_s", "call s", ".2f")]


def sweep_row(name: str, kind: str, prepare: Callable[[], tuple[nn.Module, dict, Any, Any]]) -> dict:
    """``prepare()`` gives the model, its masks, the dummy input and a fresh one; the model is sped up
    and compared with its masked copy on the fresh input, with the product's tolerance
    (:func:`speedup.engine.closeness`). Any error becomes the row's status."""
    row: dict = {"model": name, "masks": kind}
    try:
        model, masks, dummy, fresh = prepare()
        masked = masked_copy(model, masks).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            started = time.perf_counter()
            report = speedup.shrink(model, masks, dummy)
            row["shrink_s"] = time.perf_counter() - started
        ok, worst = True, 0.0
        is_state = loaded_plugins().registry.is_state  # a key/value cache follows the model's sizes
        for a, b in zip(iter_tensors(_seeded_run(masked, fresh), is_state), iter_tensors(_seeded_run(model, fresh), is_state)):
            if a.shape != b.shape:
                ok, worst = False, math.inf
                break
            close, difference = closeness(a, b)
            ok, worst = ok and close, max(worst, difference)
        row.update(status="ok" if ok else "MISMATCH", max_diff=worst, param_ratio=report.param_ratio,
                   flops_ratio=report.flops_ratio, kept=len(report.kept_for_verification),
                   barriers=sorted({b.op for b in report.barriers}), attributes=len(report.attributes),
                   sizes_set={k: [str(v) for v in vs] for k, vs in report.attributes.items()},
                   refilled=len(report.refilled), masked_modules=len(masks))
    except Exception as exc:  # noqa: BLE001 - one model's failure must not stop the sweep
        row["status"] = f"ERROR: {type(exc).__name__}: {str(exc)[:160]}"
    print(f"{name:32s} {kind}  {row['status'][:60]:8s}  params {row.get('param_ratio', math.nan):.3f}  "
          f"FLOPs {row.get('flops_ratio', math.nan):.3f}  kept {row.get('kept', '-')}  "
          f"{row.get('shrink_s', math.nan):.2f} s", flush=True)
    return row


def _seeded_run(model: nn.Module, inputs: Any) -> Any:
    """The model's outputs, with the random numbers it may draw in ``forward`` (ViT-MAE's shuffle)
    the same in every run."""
    torch.manual_seed(0)
    return run(model, inputs)


def print_summary(rows: list[dict], title: str) -> list[str]:
    """Prints the table and the summary lines (models that passed, median ratios per kind of masks,
    barriers met); returns the lines."""
    print()
    print_table(rows, COLUMNS, title=title)
    lines = []
    for kind in sorted({r["masks"] for r in rows}):
        done = [r for r in rows if r["masks"] == kind]
        ok = [r for r in done if r["status"] == "ok"]
        line = f"masks {kind}: {len(ok)}/{len(done)} models ok"
        if ok:
            line += (f"; median parameters {statistics.median(r['param_ratio'] for r in ok):.3f}, "
                     f"FLOPs {statistics.median(r['flops_ratio'] for r in ok):.3f} of before; "
                     f"largest difference {max(r['max_diff'] for r in ok):.1e}")
        lines.append(line)
    barriers = sorted({b for r in rows for b in r.get("barriers", [])})
    lines.append(f"barriers: {', '.join(barriers) if barriers else 'none'}")
    print("\n".join(lines))
    return lines



def sweep_main(argv: Optional[list[str]], description: str, names: Sequence[str], bench: Callable[[str, str], dict],
               name: str, title: str, versions: dict) -> int:
    """The command line of a sweep: ``--models`` (default ``names``), ``--masks``, ``--json`` (default
    ``benchmarks/results/<name>.json``); runs ``bench(model, kind)`` for each, prints and saves the rows."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--models", help=f"comma list of names (default: the {len(names)} listed)")
    parser.add_argument("--masks", default="a,b", help="mask kinds: a (random 50%% per layer), b (consistent); default a,b")
    parser.add_argument("--json", default=str(RESULTS_DIR / f"{name}.json"), help="where the rows go")
    args = parser.parse_args(argv)
    chosen = [n.strip() for n in args.models.split(",")] if args.models else list(names)
    kinds = [k.strip() for k in args.masks.split(",") if k.strip()]
    started = time.perf_counter()
    rows = [bench(model, kind) for model in chosen for kind in kinds]
    lines = print_summary(rows, title)
    write_json(args.json, {"environment": environment(), **versions, "args": vars(args),
                           "total_s": time.perf_counter() - started, "summary": lines, "rows": rows})
    print(f"saved {args.json}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1
