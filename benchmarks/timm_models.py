"""Benchmark: speedup on timm architectures nobody tuned it for, under two kinds of 50% masks.

A sweep for generality, not for speed: does every architecture give the masked model's outputs, and
how far does each shrink? For each model (random weights, ``timm.create_model(name,
pretrained=False)``, eval mode; BatchNorm statistics randomised; parameters that timm initialises to
zero, as the last gain of a residual branch or a classifier, given N(0, 0.02) so that no branch hides):

* masks ``a``: a random half of the output channels of every ``Conv2d`` / ``Linear`` except the
  classifier (``model.get_classifier()``), with their biases;
* masks ``b``: ``speedup.groups.consistent_masks(model, dummy, sparsity=0.5)``;
* ``speedup.shrink(model, masks, dummy)`` with a dummy of batch 1 at the model's input size, then the
  outputs of the sped-up and the masked model on a FRESH batch of 2, compared with the product's
  tolerance (:func:`speedup.engine.closeness`).

One row per model and kind of masks: status (``ok``, ``MISMATCH``, or the error), largest absolute
difference, parameter and FLOPs ratios, calls kept whole for verification, barriers and the call's
time. Summary lines give the models that passed and the median ratios under masks ``b``.

Usage::

    bash dev.sh bench timm_models                          # the 71 default architectures (about 10 min on 2 cores)
    bash dev.sh bench timm_models --models resnet18d,pvt_v2_b0 --masks b

Rows go to ``benchmarks/results/timm_models.json`` (``--json PATH`` to put them elsewhere).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import timm  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from _common import RESULTS_DIR, environment, print_table, random_channel_masks, randomize_batchnorm, write_json  # noqa: E402

import speedup  # noqa: E402
from speedup.engine import closeness  # noqa: E402
from speedup.groups import consistent_masks  # noqa: E402
from speedup.testing import masked_copy  # noqa: E402
from speedup.tracer import iter_tensors  # noqa: E402

MODELS = """
resnet18d resnet50_gn seresnext26d_32x4d skresnet18 resnest14d regnetx_002 regnety_002 rexnet_100 mobilenetv3_large_100
mobilenetv4_conv_small efficientnetv2_rw_t tf_efficientnet_lite0 mixnet_s fbnetc_100 lcnet_050 ghostnetv2_100
cspresnet50 cspdarknet53 dpn68 xception41 inception_v4 ese_vovnet19b_dw selecsls42b hrnet_w18_small_v2 dla46_c
tresnet_m repvgg_a0 mobileone_s0 fastvit_t8 efficientformer_l1 efficientformerv2_s0 levit_128s pit_ti_224
deit_tiny_patch16_224 cait_xxs24_224 coat_lite_tiny convit_tiny crossvit_tiny_240 pvt_v2_b0 poolformer_s12
resmlp_12_224 mixer_s32_224 gmlp_ti16_224 mobilevit_xxs mobilevitv2_050 edgenext_xx_small coatnet_nano_rw_224
maxvit_nano_rw_256 swin_tiny_patch4_window7_224 nf_resnet26 regnetz_b16 gernet_s resnetv2_50x1_bit
eva02_tiny_patch14_224 sequencer2d_s tnt_s_patch16_224 visformer_tiny hgnetv2_b0 inception_next_tiny repghostnet_050
efficientvit_b0 efficientvit_m0 tiny_vit_5m_224 davit_tiny focalnet_tiny_srf gcvit_xxtiny rdnet_tiny starnet_s1
hiera_tiny_224 convnext_atto_rms eca_nfnet_l0
""".split()

def build(name: str, seed: int = 3) -> nn.Module:
    model = timm.create_model(name, pretrained=False).eval()
    randomize_batchnorm(model, seed=1)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.numel() and float(param.abs().max()) == 0:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    return model


def bench(name: str, kind: str) -> dict:
    row: dict = {"model": name, "masks": kind}
    try:
        model = build(name)
        size = timm.data.resolve_data_config({}, model=model)["input_size"]
        generator = torch.Generator().manual_seed(5)
        dummy, fresh = torch.randn(1, *size, generator=generator), torch.randn(2, *size, generator=generator)
        head = model.get_classifier() if hasattr(model, "get_classifier") else None
        heads = [head] if isinstance(head, nn.Module) else []
        masks = random_channel_masks(model, heads) if kind == "a" else consistent_masks(model, dummy, sparsity=0.5, seed=0)
        masked = masked_copy(model, masks).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            started = time.perf_counter()
            report = speedup.shrink(model, masks, dummy)
            row["shrink_s"] = time.perf_counter() - started
        with torch.no_grad():
            expected, actual = masked(fresh), model(fresh)
        ok, worst = True, 0.0
        for a, b in zip(iter_tensors(expected), iter_tensors(actual)):
            if a.shape != b.shape:
                ok, worst = False, math.inf
                break
            close, difference = closeness(a, b)
            ok, worst = ok and close, max(worst, difference)
        row.update(status="ok" if ok else "MISMATCH", max_diff=worst, param_ratio=report.param_ratio,
                   flops_ratio=report.flops_ratio, kept=len(report.kept_for_verification),
                   barriers=sorted({b.op for b in report.barriers}), attributes=len(report.attributes),
                   masked_modules=len(masks))
    except Exception as exc:  # noqa: BLE001 - one model's failure must not stop the sweep
        row["status"] = f"ERROR: {type(exc).__name__}: {str(exc)[:160]}"
    return row


def summary(rows: list[dict]) -> list[str]:
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
    return lines


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", help="comma list of timm model names (default: the 71 listed in MODELS)")
    parser.add_argument("--masks", default="a,b", help="mask kinds: a (random 50%% per layer), b (consistent); default a,b")
    parser.add_argument("--json", default=str(RESULTS_DIR / "timm_models.json"), help="where the rows go")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.models.split(",")] if args.models else MODELS
    kinds = [k.strip() for k in args.masks.split(",") if k.strip()]
    torch.manual_seed(0)
    started = time.perf_counter()
    rows = []
    for name in names:
        for kind in kinds:
            rows.append(bench(name, kind))
            r = rows[-1]
            print(f"{name:32s} {kind}  {r['status'][:60]:8s}  params {r.get('param_ratio', math.nan):.3f}  "
                  f"FLOPs {r.get('flops_ratio', math.nan):.3f}  kept {r.get('kept', '-')}  "
                  f"{r.get('shrink_s', math.nan):.2f} s", flush=True)
    columns = [("model", "model", ""), ("masks", "masks", ""), ("status", "status", ""), ("max_diff", "max |diff|", ".1e"),
               ("param_ratio", "params a/b", ".3f"), ("flops_ratio", "FLOPs a/b", ".3f"), ("kept", "kept", ""),
               ("attributes", "sizes set", ""), ("shrink_s", "call s", ".2f")]
    print()
    print_table(rows, columns, title="speedup on timm models (random weights; a/b = after / before)")
    lines = summary(rows)
    print("\n".join(lines))
    write_json(args.json, {"environment": environment(), "timm": timm.__version__, "args": vars(args),
                           "total_s": time.perf_counter() - started, "summary": lines, "rows": rows})
    print(f"saved {args.json}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
