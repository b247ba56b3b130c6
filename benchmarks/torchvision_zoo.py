"""Benchmark: speedup on the whole torchvision zoo under two kinds of 50% masks, next to Torch-Pruning.

Every model of ``torchvision.models.list_models(module=torchvision.models)`` (80 classifiers) and of
``torchvision.models.list_models(module=torchvision.models.segmentation)`` (6), with random weights,
one after the other:

* build it (``get_model(name, weights=None)``, segmentation also ``weights_backbone=None``) after
  ``torch.manual_seed(0)``, in eval mode; give every BatchNorm random running statistics and affine
  parameters (``_common.randomize_batchnorm``: masked channels then carry non-zero constants that
  speedup must fold); give what torchvision initialises to zero or near zero trained-like values (ViT's
  class token and classifier, ConvNeXt's 1e-6 layer scales; see :func:`prepare`);
* for each mask kind (one table row each):

  ``a`` (random): 50% of the output channels of every Conv2d / Linear except the classifier (the
  layers writing class scores: the last Linear, or last conv where there is none, and every other
  layer with as many outputs, i.e. GoogLeNet's / Inception's auxiliary classifiers and the
  segmentation heads' final convs), chosen at random per layer: weight rows and bias entries.
  Nothing lines up across residual adds, concats or depthwise convs, so speedup can only remove what
  really is unused or constant: mostly a correctness test.

  ``b`` (consistent): ``speedup.groups.consistent_masks(model, dummy, sparsity=0.5, seed=0)``: 50% of
  every dependency group found in the traced graph (residual / concat / depthwise links, attention
  heads where a plugin defines them). Everything masked can go: the speed test.

* ``masked``: :func:`speedup.testing.masked_copy` (built before the speedup); ``sped``:
  ``speedup.shrink(model, masks, dummy)`` in place, timed (seconds, and in forwards of the masked
  model at the dummy's batch, 1);
* status: ``ok`` when every output tensor of ``sped`` has ``masked``'s shape and is close to it on a
  FRESH random input (batch 2, not the dummy; ``speedup.engine.outputs_close``, as speedup's own
  tests), ``MISMATCH`` otherwise, ``ERROR: ...`` when something raised. ``rel diff`` is
  ``max|a - b| / max|a|``, the largest over the output tensors (segmentation: ``out``, ``aux``);
* parameter and FLOPs ratios after / before (``report.param_ratio``, ``report.flops_ratio``);
* latency ratio masked / sped, CPU, ``torch.no_grad()``, median of interleaved runs within a time
  budget (``--budget-s``; at least 3 runs each, so the largest models get few), per batch size;
* Torch-Pruning (when ``torch_pruning`` imports; once per model, shown on both rows): ``MetaPruner``
  with L1 ``MagnitudeImportance`` at 50%, classifier layers ignored, as ``speedup_models.py`` runs it.
  It picks its own channels, so its ratios are against the original model; its latency gain is against
  the masked model (the original's sizes), timed in the same interleaved loop as speedup's model.

Input: square random images, batch 1 for the dummy. 224 px, except inception_v3 (299, its design
size); ``--size`` overrides it for every model but ViT, Swin and MaxViT (fixed at 224: ViT's position
embedding, MaxViT's 7x7 partitions, and Swin as the zoo ships it). A model that does not run at the
``--size`` given goes back to its own size (noted in the JSON).

Usage::

    bash dev.sh bench torchvision_zoo [options]      # = .venv/bin/python benchmarks/torchvision_zoo.py
    bash dev.sh bench torchvision_zoo                # all 86 models, masks a and b, batch 1 and 32, TP
    bash dev.sh bench torchvision_zoo --models resnet18,mobilenet_v3_small,swin_t --size 96 --batch 1
    bash dev.sh bench torchvision_zoo --models 'resnet*,vit_b' --masks b --no-torch-pruning
    bash dev.sh bench torchvision_zoo --no-latency   # correctness, ratios and speedup time only
    bash dev.sh bench torchvision_zoo --masks b --fold-bn  # also the gain of folding BatchNorm into convs

``--models`` takes names, prefixes (``vit_b`` = vit_b_16, vit_b_32) and globs (``'regnet_y_*'``).
One table row per (model, masks) is printed as soon as the model is done; a summary follows at the
end. Rows with details (barriers, warnings, tracebacks, times in ms) go to
``benchmarks/results/torchvision_zoo.json`` (or ``--json PATH``), rewritten after every model.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fnmatch
import gc
import io
import json
import math
import signal
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from _common import (  # noqa: E402
    RESULTS_DIR,
    StreamTable,
    count_flops,
    environment,
    flush_denormals,
    interleaved_latency,
    max_difference,
    memory_limit,
    outputs,
    parameter_count,
    print_table,
    random_channel_masks,
    randomize_batchnorm,
    use_default_threads,
    wall,
    write_json,
)

import speedup  # noqa: E402
from speedup.engine import outputs_close  # noqa: E402
from speedup.groups import consistent_masks  # noqa: E402
from speedup.testing import masked_copy  # noqa: E402

try:  # optional baseline
    import torch_pruning as tp
except Exception as _exc:  # noqa: BLE001 - any import failure just disables the baseline
    tp = None
    TP_IMPORT_ERROR = f"{type(_exc).__name__}: {_exc}"
else:
    TP_IMPORT_ERROR = ""

import torchvision  # noqa: E402

MASK_KINDS = {"a": "random 50% of output channels per Conv2d/Linear", "b": "consistent_masks(sparsity=0.5)"}
FRESH_BATCH = 2

# ============================================================================================
# Models and inputs
# ============================================================================================

DEFAULT_SIZE = 224
NATIVE_SIZE = {"inception_v3": 299}
FIXED_SIZE = {"vit_": 224, "swin_": 224, "maxvit_": 224}  # by name prefix; --size does not apply

FAMILIES = ("wide_resnet", "resnext", "resnet", "mobilenet_v2", "mobilenet_v3", "efficientnet_v2", "efficientnet",
            "regnet_x", "regnet_y", "vit", "swin_v2", "swin", "maxvit", "convnext", "densenet", "shufflenet_v2",
            "mnasnet", "squeezenet", "vgg", "alexnet", "googlenet", "inception", "deeplabv3", "fcn", "lraspp")


def family(name: str) -> str:
    return next((f for f in FAMILIES if name.startswith(f)), name)


def input_size(name: str, override: Optional[int]) -> tuple[int, bool]:
    """(side in pixels, whether it is fixed)."""
    for prefix, size in FIXED_SIZE.items():
        if name.startswith(prefix):
            return size, True
    if override:
        return override, False
    return NATIVE_SIZE.get(name, DEFAULT_SIZE), False


def image(batch: int, size: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def build(name: str, segmentation: bool) -> nn.Module:
    torch.manual_seed(0)
    kwargs: dict[str, Any] = {"weights": None}
    if segmentation:
        kwargs["weights_backbone"] = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # googlenet / inception_v3 warn about their init without weights
        return torchvision.models.get_model(name, **kwargs).eval()


def classifier_layers(model: nn.Module, segmentation: bool) -> list[nn.Module]:
    """The layers writing class scores: never masked in (a), ignored by Torch-Pruning.

    The last Linear (classification; the last Conv2d where there is no Linear: SqueezeNet; always the
    last Conv2d for segmentation), and every other Conv2d / Linear with as many outputs: GoogLeNet's
    and Inception's auxiliary classifiers (not run in eval mode), FCN's / DeepLab's aux head and
    LR-ASPP's low and high classifiers.
    """
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    linears = [m for m in layers if isinstance(m, nn.Linear)]
    final = linears[-1] if linears and not segmentation else [m for m in layers if isinstance(m, nn.Conv2d)][-1]
    classes = final.weight.shape[0]
    return [m for m in layers if m.weight.shape[0] == classes]


def prepare(model: nn.Module, classifiers: list[nn.Module], seed: int = 1) -> dict:
    """Random BatchNorm statistics and affine parameters; trained-like values where torchvision puts (near) zeros.

    * ViT's ``class_token`` and classifier are zeros: an untrained ViT outputs a constant and speedup
      (rightly) removes nearly everything. They get N(0, 0.02), as in ``speedup_models.py``.
    * ConvNeXt's ``layer_scale`` is 1e-6, which makes every residual branch 1e-6 of the stream: a
      wrong branch would hide under the relative tolerance. Trained ones are 0.1 to 1: U(0.1, 0.5).
    """
    generator = torch.Generator().manual_seed(seed)
    facts: dict[str, Any] = {"batchnorms_randomized": randomize_batchnorm(model, seed=seed), "made_nonzero": [],
                             "layer_scales": 0}
    final = {id(p) for m in classifiers for p in m.parameters(recurse=False)}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.numel():
                continue
            largest = float(param.abs().max())
            if name.rpartition(".")[2] == "layer_scale" and largest < 1e-3:
                param.copy_(torch.rand(param.shape, generator=generator) * 0.4 + 0.1)
                facts["layer_scales"] += 1
            elif largest == 0 and (id(param) in final or name.rpartition(".")[2] == "class_token"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
                facts["made_nonzero"].append(name)
    return facts


# ============================================================================================
# Masks
# ============================================================================================

Masks = dict[str, dict[str, torch.Tensor]]


def make_masks(kind: str, model: nn.Module, segmentation: bool, dummy: torch.Tensor) -> Masks:
    if kind == "a":
        return random_channel_masks(model, classifier_layers(model, segmentation), seed=0)
    return consistent_masks(model, dummy, sparsity=0.5, seed=0)


def masked_fraction(masks: Masks) -> float:
    kept = total = 0
    for entry in masks.values():
        for mask in entry.values():
            kept += int(mask.sum())
            total += mask.numel()
    return 1 - kept / total if total else 0.0


# ============================================================================================
# Torch-Pruning baseline
# ============================================================================================


def torch_pruning(model: nn.Module, classifiers: list[nn.Module], dummy: torch.Tensor) -> tuple[float, str]:
    """Prunes ``model`` in place with Torch-Pruning at 50% of channels; returns (analysis + pruning seconds, note)."""
    from torchvision.models.convnext import CNBlock
    from torchvision.models.vision_transformer import VisionTransformer

    kwargs: dict[str, Any] = dict(importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=0.5,
                                  ignored_layers=list(classifiers), round_to=None)
    notes = []
    attentions = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    if attentions:
        # As in speedup_models.py: nn.MultiheadAttention ties q/k/v/out to embed_dim, so Torch-Pruning
        # prunes the residual stream with every head kept and head_dim halved, grouped per head.
        kwargs["out_channel_groups"] = {m: m.num_heads for m in attentions}
        notes.append("nn.MultiheadAttention pruned in embed_dim (heads kept, head_dim halved)")
    unwrapped = []
    if isinstance(model, VisionTransformer):
        unwrapped += [(model.class_token, 2), (model.encoder.pos_embedding, 2)]
    unwrapped += [(m.layer_scale, 0) for m in model.modules() if isinstance(m, CNBlock)]  # (C, 1, 1)
    if unwrapped:
        kwargs["unwrapped_parameters"] = unwrapped
    start = time.perf_counter()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(model, dummy, **kwargs)
        pruner.step()
    seconds = time.perf_counter() - start
    if isinstance(model, VisionTransformer):
        model.hidden_dim = model.conv_proj.out_channels  # torchvision's ViT reshapes with it
    model.eval()
    with torch.no_grad():
        model(dummy)  # must still run
    return seconds, "; ".join(notes)


# ============================================================================================
# Helpers
# ============================================================================================


class Timeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: Optional[float], what: str) -> Iterator[None]:
    """Raises :class:`Timeout` in the main thread after ``seconds`` (SIGALRM; no limit where there is none)."""
    if not seconds or not hasattr(signal, "SIGALRM"):
        yield
        return

    def alarm(signum, frame):  # noqa: ARG001
        raise Timeout(f"{what} took more than {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(max(1, int(seconds)))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def short(exc: BaseException, limit: int = 120) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def compare(expected: Any, actual: Any) -> tuple[bool, float, str]:
    """(same shapes and close, the largest relative difference max|a-b| / max|a| over the outputs, note)."""
    ref, got = outputs(expected), outputs(actual)
    if len(ref) != len(got):
        return False, math.inf, f"{len(got)} outputs instead of {len(ref)}"
    ok, worst, note = True, 0.0, ""
    for i, (a, b) in enumerate(zip(ref, got)):
        if a.shape != b.shape:
            return False, math.inf, f"output {i}: shape {tuple(b.shape)} instead of {tuple(a.shape)}"
        diff, scale = max_difference(a, b)
        relative = diff / scale if scale else (0.0 if diff == 0 else math.inf)
        if math.isnan(relative):
            relative = math.inf
        worst = max(worst, relative)
        if not outputs_close(a, b):
            ok, note = False, note or f"output {i}: max |diff| {diff:.2e} at scale {scale:.2e}"
    return ok, worst, note


def warm_up_speedup() -> float:
    """One tiny speedup call, so that the first model does not pay the one-time costs (plugin loading)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    masks = {"0": {"weight": torch.tensor([1, 0, 1, 0], dtype=torch.bool)[:, None, None, None].expand(4, 3, 3, 3)}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, seconds = wall(lambda: speedup.shrink(model, masks, torch.randn(1, 3, 8, 8)))
    return seconds


def budgeted_latency(models: dict[str, nn.Module], inputs: Any, budget_s: float) -> dict[str, dict]:
    """Interleaved latency within ``budget_s``, for forwards from milliseconds to minutes: each model
    warms up for a share of the budget (one run if its forward is longer), no unmeasured round, at
    least 3 and at most 25 measured rounds."""
    return interleaved_latency(models, inputs, warmup=1, repeats=25, budget_s=budget_s,
                               warmup_s=budget_s / (2 * len(models)), warm_round=False)


def median(values: list) -> Optional[float]:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(values) if values else None


def select_models(text: Optional[str], known: list[str]) -> list[str]:
    """``--models``: comma list of exact names, prefixes or globs, in the zoo's order."""
    if not text:
        return list(known)
    chosen: set[str] = set()
    for token in (t.strip() for t in text.split(",")):
        if not token:
            continue
        if any(c in token for c in "*?["):
            hits = fnmatch.filter(known, token)
        elif token in known:
            hits = [token]
        else:
            hits = [n for n in known if n.startswith(token)]
        if not hits:
            raise SystemExit(f"--models: nothing matches {token!r}; choose from {', '.join(known)}")
        chosen.update(hits)
    return [n for n in known if n in chosen]


# ============================================================================================
# One model
# ============================================================================================


def bench_model(name: str, segmentation: bool, args: argparse.Namespace) -> list[dict]:
    size, fixed = input_size(name, args.size)
    common: dict[str, Any] = {"model": name, "family": family(name), "segmentation": segmentation, "size": size}
    caught: list[str] = []
    rows: list[dict] = []
    base = tp_model = None
    try:
        with warnings.catch_warnings(record=True) as records:
            warnings.simplefilter("always")
            try:
                base, build_s = wall(lambda: build(name, segmentation))
                classifiers = classifier_layers(base, segmentation)
                common.update(prepare(base, classifiers), build_s=build_s, params=parameter_count(base),
                              classifiers=[n for n, m in base.named_modules() if any(m is c for c in classifiers)])
                dummy = image(1, size, 0)
                try:
                    flops = count_flops(base, dummy)  # also: does the model run at this size?
                except Exception as exc:  # noqa: BLE001
                    native, _ = input_size(name, None)
                    if fixed or size == native:
                        raise
                    common["size_note"] = f"does not run at {size} px ({short(exc, 80)}); run at {native}"
                    size = common["size"] = native
                    dummy = image(1, size, 0)
                    flops = count_flops(base, dummy)
                common["flops"] = flops
            except Exception as exc:  # noqa: BLE001 - one model's failure must not stop the run
                message = f"ERROR: build: {short(exc)}"
                return [dict(common, masks=kind, status=message, error=traceback.format_exc()) for kind in args.masks]

            inputs = {batch: image(batch, size, 100 + batch) for batch in args.batches}
            fresh = image(FRESH_BATCH, size, 1)
            tp_info, tp_model = run_torch_pruning(base, classifiers, dummy, common, args)

            for index, kind in enumerate(args.masks):
                last = index == len(args.masks) - 1
                row = dict(common, masks=kind, **tp_info)
                rows.append(row)
                model = base if last else copy.deepcopy(base)  # the last kind shrinks the base itself
                if last:
                    base = None
                try:
                    run_masks(kind, model, segmentation, dummy, fresh, inputs, row, args, tp_model)
                finally:
                    model = None
                    gc.collect()
        caught = sorted({f"{w.category.__name__}: {str(w.message).splitlines()[0][:200]}" for w in records})
    finally:
        base = tp_model = None
        gc.collect()
    for row in rows:
        row["python_warnings"] = caught[:20]
    return rows


def run_torch_pruning(base: nn.Module, classifiers: list[nn.Module], dummy: torch.Tensor, common: dict,
                      args: argparse.Namespace) -> tuple[dict, Optional[nn.Module]]:
    """Torch-Pruning on a copy of ``base``: status, time and ratios, and the pruned model (timed later,
    in the same interleaved loop as the masked and the sped-up model: see :func:`run_masks`)."""
    info: dict[str, Any] = {"tp_status": None}
    if not args.torch_pruning:
        return info, None
    if tp is None:
        info["tp_status"] = f"ERROR: not importable ({TP_IMPORT_ERROR})"
        return info, None
    tp_model = copy.deepcopy(base)
    stage = "prune"
    try:
        with time_limit(args.tp_timeout_s, "Torch-Pruning"):
            copied = {id(m): m for m in classifiers}
            mapping = dict(zip((id(m) for m in base.modules()), tp_model.modules()))
            seconds, note = torch_pruning(tp_model, [mapping[i] for i in copied], dummy)
        info.update(tp_status="ok", tp_s=seconds, tp_note=note or None,
                    tp_param_ratio=parameter_count(tp_model) / common["params"])
        stage = "count FLOPs"
        info["tp_flops_ratio"] = count_flops(tp_model, dummy) / common["flops"]
        return info, tp_model.eval()
    except Exception as exc:  # noqa: BLE001 - the baseline may fail; report and go on
        info["tp_status"] = f"ERROR: {short(exc)}" if stage == "prune" else f"ERROR: {stage}: {short(exc)}"
        info["tp_traceback"] = traceback.format_exc(limit=-6)
        return info, None


def run_masks(kind: str, model: nn.Module, segmentation: bool, dummy: torch.Tensor, fresh: torch.Tensor,
              inputs: dict[int, torch.Tensor], row: dict, args: argparse.Namespace,
              tp_model: Optional[nn.Module] = None) -> None:
    """Masks ``model`` (kind ``a`` or ``b``), speeds it up in place, and fills ``row``.

    Latency: the masked model, the sped-up one, its BatchNorm-folded copy and Torch-Pruning's model
    (same architecture sizes as the masked model before pruning) run in one interleaved loop, so
    every gain is against the same masked-model median, measured at the same time.
    """
    stage = "masks"
    masked = None
    try:
        masks, seconds = wall(lambda: make_masks(kind, model, segmentation, dummy))
        row.update(masks_s=seconds, masked_modules=len(masks), masked_fraction=masked_fraction(masks))
        stage = "masked_copy"
        masked = masked_copy(model, masks).eval()
        stage = "shrink"
        with time_limit(args.timeout_s, "speedup.shrink"):
            report, shrink_s = wall(lambda: speedup.shrink(model, masks, dummy))
        masks = None  # free them before the latency runs
        row.update(shrink_s=shrink_s, shrink_timings=dict(report.timings), params_after=report.params_after,
                   param_ratio=report.param_ratio, flops_before=report.flops_before)
        stage = "count FLOPs"
        row.update(flops_after=report.flops_after, flops_ratio=report.flops_ratio,
                   report_max_abs_diff=report.max_abs_diff, modules_rebuilt=len(report.modules),
                   parameters_sliced=len(report.parameters), barriers=[str(b) for b in report.barriers],
                   kept_for_verification=list(report.kept_for_verification), report_warnings=list(report.warnings))
        del report
        sped = model.eval()

        stage = "compare"
        with torch.no_grad():
            expected, actual = masked(fresh), sped(fresh)
        ok, relative, note = compare(expected, actual)
        del expected, actual
        row.update(status="ok" if ok else "MISMATCH", rel_diff=relative, mismatch=note or None)

        contenders = {"masked": masked, "sped": sped}
        if tp_model is not None:
            contenders["tp"] = tp_model
        if args.fold_bn:
            stage = "fold BatchNorm"
            folded = copy.deepcopy(sped)
            row["bn_folded"] = len(speedup.fold_batchnorm(folded, dummy))
            if row["bn_folded"]:
                contenders["folded"] = folded

        stage = "latency"
        for batch, batch_inputs in inputs.items():
            latency = budgeted_latency(contenders, batch_inputs, args.budget_s)
            m, s = latency["masked"]["median"], latency["sped"]["median"]
            row.update({f"masked_ms_b{batch}": m * 1e3, f"sped_ms_b{batch}": s * 1e3, f"lat_b{batch}": m / s,
                        f"runs_b{batch}": latency["masked"]["runs"]})
            if "folded" in latency:
                row[f"fold_lat_b{batch}"] = m / latency["folded"]["median"]
            if "tp" in latency:
                row.update({f"tp_ms_b{batch}": latency["tp"]["median"] * 1e3, f"tp_lat_b{batch}": m / latency["tp"]["median"]})
        if 1 in inputs:  # the dummy's batch and shape
            forward = row["masked_ms_b1"] / 1e3
        else:
            latency = budgeted_latency({"masked": masked}, dummy, min(args.budget_s, 5.0))
            forward = latency["masked"]["median"]
        row.update(masked_forward_ms=forward * 1e3, shrink_fwd=row["shrink_s"] / forward)
    except Exception as exc:  # noqa: BLE001 - one failure must not stop the run
        if row.get("status") is None or stage != "latency":
            row["status"] = f"ERROR: {stage}: {short(exc)}"
        else:  # the outputs were compared; only a timing failed
            row["latency_error"] = short(exc)
        row["error"] = traceback.format_exc()
    finally:
        masked = None
        gc.collect()


# ============================================================================================
# Output
# ============================================================================================


def columns(args: argparse.Namespace) -> list[tuple[str, str, str, int]]:
    cols = [("model", "model", "", 28), ("masks", "m", "", 1), ("size", "px", "d", 3),
            ("rel_diff", "rel diff", ".1e", 8), ("param_ratio", "params", ".3f", 6),
            ("flops_ratio", "FLOPs", ".3f", 6)]
    cols += [(f"lat_b{b}", f"lat b{b}", ".2f", 6) for b in args.batches]
    if args.fold_bn:
        cols += [(f"fold_lat_b{b}", f"+BN b{b}", ".2f", 6) for b in args.batches]
    cols += [("shrink_s", "shrink s", ".1f", 7), ("shrink_fwd", "fwds", ".0f", 5)]
    if args.torch_pruning:
        cols += [("tp_short", "TP", "", 5), ("tp_s", "TP s", ".1f", 5), ("tp_param_ratio", "TP par", ".3f", 6),
                 ("tp_flops_ratio", "TP FLOPs", ".3f", 6)]
        cols += [(f"tp_lat_b{b}", f"TP b{b}", ".2f", 6) for b in args.batches]
    cols.append(("status_text", "status", "", 0))
    return cols


def decorate(row: dict) -> dict:
    """Adds the display-only cells: TP's short status, and the status with TP's error at the end."""
    status = row.get("tp_status")
    row["tp_short"] = None if status is None else ("ok" if status == "ok" else "ERROR")
    text = row.get("status") or "?"
    if row.get("status") == "MISMATCH" and row.get("mismatch"):
        text += f" ({row['mismatch']})"
    if row.get("latency_error"):
        text += f" (latency: {row['latency_error']})"
    if status and status != "ok":
        text += f" | TP {status}"
    row["status_text"] = text
    return row


def gains(rows: list[dict], key: str, batch: int, ratio_key: str) -> list[tuple[float, float]]:
    """(latency gain, gain / ideal) for the rows with both; ideal = 1 / FLOPs ratio."""
    out = []
    for r in rows:
        gain, ratio = r.get(f"{key}{batch}"), r.get(ratio_key)
        if gain and ratio:
            out.append((gain, gain * ratio))
    return out


def summarize(rows: list[dict], args: argparse.Namespace) -> list[str]:
    lines = []
    models = list(dict.fromkeys(r["model"] for r in rows))
    for kind in args.masks:
        mine = [r for r in rows if r["masks"] == kind]
        ok = [r for r in mine if r.get("status") == "ok"]
        lines.append(f"masks {kind} ({MASK_KINDS[kind]}): {len(ok)}/{len(mine)} models ok")
        for label in ("MISMATCH", "ERROR"):
            bad = [r["model"] for r in mine if (r.get("status") or "").startswith(label)]
            if bad:
                lines.append(f"  {label} ({len(bad)}): {', '.join(bad)}")
        for batch in args.batches:
            ours = gains(ok, "lat_b", batch, "flops_ratio")
            if ours:
                lines.append(f"  batch {batch}: median latency gain {median([g for g, _ in ours]):.2f}x, "
                             f"median gain / ideal (1 / FLOPs ratio) {median([e for _, e in ours]):.2f} "
                             f"over {len(ours)} ok models")
            folded = [r[f"fold_lat_b{batch}"] / r[f"lat_b{batch}"] for r in ok if r.get(f"fold_lat_b{batch}")]
            if folded:
                lines.append(f"  batch {batch}: folding BatchNorm into the convs (--fold-bn) multiplies the latency "
                             f"gain by {median(folded):.2f} in the median over {len(folded)} models that have it")
            compared = [r for r in ok if r.get(f"tp_lat_b{batch}") and r.get(f"lat_b{batch}")]
            better = [r["model"] for r in compared if r[f"tp_lat_b{batch}"] > r[f"lat_b{batch}"]]
            if compared:
                lines.append(f"  batch {batch}: Torch-Pruning's latency gain beats ours on {len(better)}/{len(compared)} "
                             f"ok models where both ran" + (f": {', '.join(better)}" if better else ""))
        timed = [r for r in mine if r.get("shrink_s") is not None]
        if timed:
            slowest = max(timed, key=lambda r: r["shrink_s"])
            fwds = [r for r in timed if r.get("shrink_fwd") is not None]
            text = f"  speedup call: median {median([r['shrink_s'] for r in timed]):.2f} s, max {slowest['shrink_s']:.1f} s ({slowest['model']})"
            if fwds:
                most = max(fwds, key=lambda r: r["shrink_fwd"])
                text += (f"; in forwards of the masked model at batch 1: median {median([r['shrink_fwd'] for r in fwds]):.0f},"
                         f" max {most['shrink_fwd']:.0f} ({most['model']})")
            lines.append(text)
    if args.torch_pruning:
        tp_rows = {r["model"]: r for r in rows}
        tp_ok = [m for m, r in tp_rows.items() if r.get("tp_status") == "ok"]
        lines.append(f"Torch-Pruning: ok on {len(tp_ok)}/{len(models)} models")
        first = [r for r in tp_rows.values() if r.get("tp_status") == "ok"]
        for batch in args.batches:
            theirs = gains(first, "tp_lat_b", batch, "tp_flops_ratio")
            if theirs:
                lines.append(f"  batch {batch}: median latency gain {median([g for g, _ in theirs]):.2f}x, "
                             f"median gain / ideal {median([e for _, e in theirs]):.2f} over {len(theirs)} models")
        for m, r in tp_rows.items():
            if r.get("tp_status") not in (None, "ok"):
                lines.append(f"  {m}: {r['tp_status']}")
    return lines


def family_table(rows: list[dict]) -> list[dict]:
    """Under masks (b): per family, models ok / run and median (min-max) parameter and FLOPs ratios of the ok ones."""
    out = []
    for name in dict.fromkeys(r["family"] for r in rows if r["masks"] == "b"):
        mine = [r for r in rows if r["masks"] == "b" and r["family"] == name]
        ok = [r for r in mine if r.get("status") == "ok"]
        entry: dict[str, Any] = {"family": name, "ok": f"{len(ok)}/{len(mine)}"}
        for key in ("param_ratio", "flops_ratio", "tp_param_ratio", "tp_flops_ratio"):
            values = [r[key] for r in (ok if not key.startswith("tp") else mine) if r.get(key) is not None]
            if values:
                entry[key] = median(values)
                entry[key + "_range"] = f"{min(values):.2f}-{max(values):.2f}" if len(values) > 1 else ""
        out.append(entry)
    return out


def save(rows: list[dict], args: argparse.Namespace, env: dict, total_s: float, complete: bool) -> Path:
    settings = {k: v for k, v in vars(args).items()}
    payload = {"environment": env, "args": settings, "total_s": total_s, "complete": complete,
               "summary": summarize(rows, args) if rows else [], "families_b": family_table(rows), "rows": rows}
    return write_json(args.json, payload)


def earlier_rows(args: argparse.Namespace) -> list[dict]:
    """Rows of an earlier run in ``args.json`` for the models and mask kinds of this one (``--resume``)."""
    path = Path(args.json)
    if not path.exists():
        return []
    earlier = json.loads(path.read_text()).get("rows", [])
    by_model: dict[str, list[dict]] = {}
    for row in earlier:
        by_model.setdefault(row["model"], []).append(row)
    return [row for model_rows in by_model.values() if {r["masks"] for r in model_rows} >= set(args.masks)
            for row in model_rows if row["masks"] in args.masks]


# ============================================================================================
# Main
# ============================================================================================


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", help="comma list of names, prefixes (vit_b) or globs ('regnet_y_*'); default all 86")
    parser.add_argument("--masks", default="a,b", help="mask kinds: a (random per layer), b (consistent); default a,b")
    parser.add_argument("--size", type=int, help="input side in px for every model but ViT/Swin/MaxViT (224); "
                                                 "default 224, inception_v3 299")
    parser.add_argument("--batch", default="1,32", help="latency batch sizes, comma list; '' for none (default 1,32)")
    parser.add_argument("--no-latency", action="store_true", help="no latency measurements (same as --batch '')")
    parser.add_argument("--no-torch-pruning", dest="torch_pruning", action="store_false",
                        help="skip the Torch-Pruning baseline")
    parser.add_argument("--budget-s", type=float, default=10.0,
                        help="time budget of one latency measurement in s (default 10; at least 3 runs of each model)")
    parser.add_argument("--timeout-s", type=float, default=1800.0,
                        help="give up one speedup call after this many s (default 1800)")
    parser.add_argument("--tp-timeout-s", type=float, default=300.0,
                        help="give up Torch-Pruning on one model after this many s (default 300; on Swin it "
                             "runs for minutes and >15 GB before failing)")
    parser.add_argument("--fold-bn", action="store_true",
                        help="also time the sped-up model with BatchNorm folded into its convs (speedup.fold_batchnorm); "
                             "+BN bN = latency masked / folded")
    parser.add_argument("--keep-denormals", action="store_true", help="do not flush denormals (noisier timings)")
    parser.add_argument("--json", help="where the rows go (default benchmarks/results/torchvision_zoo.json)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows already in --json and bench only the models missing there (a whole zoo "
                             "run with latency takes hours on 2 cores: it can be spread over several runs)")
    args = parser.parse_args(argv)

    classification = torchvision.models.list_models(module=torchvision.models)
    segmentation = torchvision.models.list_models(module=torchvision.models.segmentation)
    names = select_models(args.models, classification + segmentation)
    args.masks = [k.strip() for k in args.masks.split(",") if k.strip()]
    if not args.masks or any(k not in MASK_KINDS for k in args.masks):
        raise SystemExit(f"--masks takes a comma list of {', '.join(MASK_KINDS)}")
    try:
        args.batches = [] if args.no_latency else sorted({int(b) for b in args.batch.split(",") if b.strip()})
    except ValueError:
        raise SystemExit(f"--batch takes a comma list of batch sizes, not {args.batch!r}") from None
    if any(b < 1 for b in args.batches):
        raise SystemExit("--batch: batch sizes must be positive")
    args.json = str(Path(args.json) if args.json else RESULTS_DIR / "torchvision_zoo.json")

    threads = use_default_threads()
    flushed = flush_denormals(not args.keep_denormals)
    env = environment()
    env["flush_denormal"] = flushed
    warm = warm_up_speedup()
    print(f"speedup {env['speedup']}, torch {env['torch']}, torchvision {env['torchvision']}, torch_pruning "
          f"{env.get('torch_pruning_dist', env['torch_pruning']) if args.torch_pruning else 'skipped'}; "
          f"{threads} threads, {env['cpu_count']} CPUs; {len(names)} models x masks {','.join(args.masks)}; "
          f"input {args.size or DEFAULT_SIZE} px (inception_v3 {args.size or NATIVE_SIZE['inception_v3']}, "
          f"ViT/Swin/MaxViT 224); latency batches {','.join(map(str, args.batches)) or 'none'}, "
          f"{args.budget_s:g} s per measurement; speedup warm-up call {warm:.2f} s", flush=True)
    print("masks: " + "; ".join(f"{k} = {v}" for k, v in MASK_KINDS.items() if k in args.masks))
    print("rel diff = max|masked - sped| / max|masked| on a fresh input (batch 2); params / FLOPs = after / before; "
          "lat bN = latency masked / sped at batch N (median); shrink s = speedup call, fwds = the same in forwards "
          "of the masked model at batch 1", flush=True)
    if args.torch_pruning:
        print("TP = Torch-Pruning (L1 magnitude, 50%, classifier ignored), once per model with ITS OWN channel "
              "choice: its param / FLOPs ratios are against the original model; its latency gain (TP bN) against the masked "
              "model, timed in the same interleaved loop as ours",
              flush=True)
    print(flush=True)

    table = StreamTable(columns(args))
    table.header()
    started = time.perf_counter()
    rows = [r for r in earlier_rows(args) if r["model"] in names] if args.resume else []
    for row in rows:
        table.row(decorate(row))
    done = {r["model"] for r in rows}
    for name in [n for n in names if n not in done]:
        t0 = time.perf_counter()
        try:
            with memory_limit():  # a model that needs too much fails with MemoryError instead of the OOM killer
                model_rows = bench_model(name, name in segmentation, args)
        except Exception as exc:  # noqa: BLE001 - belt and braces: bench_model catches per stage
            model_rows = [{"model": name, "family": family(name), "masks": kind, "status": f"ERROR: {short(exc)}",
                           "error": traceback.format_exc()} for kind in args.masks]
        for row in model_rows:
            row["bench_wall_s"] = time.perf_counter() - t0
            table.row(decorate(row))
        rows += model_rows
        gc.collect()
        save(rows, args, env, time.perf_counter() - started, complete=False)
    total = time.perf_counter() - started

    print("\nsummary:")
    for line in summarize(rows, args):
        print("  " + line)
    families = family_table(rows)
    if families:
        print()
        fam_cols = [("family", "family", ""), ("ok", "ok", ""), ("param_ratio", "params (b)", ".3f"),
                    ("param_ratio_range", "range", ""), ("flops_ratio", "FLOPs (b)", ".3f"),
                    ("flops_ratio_range", "range", "")]
        if args.torch_pruning:
            fam_cols += [("tp_param_ratio", "TP params", ".3f"), ("tp_flops_ratio", "TP FLOPs", ".3f")]
        print_table(families, fam_cols, title="masks b per family: median (range) over the ok models of "
                                               "parameters and FLOPs after / before")
    print(f"\ntotal {total:.0f} s")
    path = save(rows, args, env, total, complete=True)
    print(f"saved {path}")
    return 1 if any(r.get("status") != "ok" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
