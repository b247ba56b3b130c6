"""Benchmark: speedup on real-size models with half their channels masked, next to Torch-Pruning.

For each model (torchvision resnet50, mobilenet_v2, vit_b_16 with random weights, and a BERT-base
sized encoder built from torch modules), in one run:

* build it, randomise its BatchNorm statistics and affine parameters (so that masked channels hold
  non-zero constants, which speedup has to fold), and mask 50% of its channels (see the mask
  builders below);
* ``masked``: :func:`speedup.testing.masked_copy` of it (weights multiplied by their masks);
* ``sped``: ``speedup.shrink`` on it, timed, the first call and the median of ``--shrink-repeats`` on
  fresh copies; in forward passes (``= fwds``), divided by the median of three masked forwards on the
  dummy timed right before each call (the same state of the machine);
* ``tp``: Torch-Pruning's ``MetaPruner`` (L1 magnitude, 50% of channels) on an unmasked copy, timed
  (when ``torch_pruning`` imports);
* latency of the three, CPU, ``torch.no_grad()``, median of interleaved runs, at batch 1 (and 8 for
  the CNNs); the largest output difference between masked and sped on a fresh input; FLOPs and
  parameters.

Usage::

    python benchmarks/speedup_models.py                     # everything (a few minutes on 2 cores)
    python benchmarks/speedup_models.py --quick             # fewer repetitions
    python benchmarks/speedup_models.py --models resnet50,bert

The table goes to stdout; the same rows go to ``benchmarks/results/speedup_models.json``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from _common import (  # noqa: E402
    add_mask,
    bench_each,
    call,
    count_flops,
    environment,
    first_half_mask,
    flush_denormals,
    interleaved_latency,
    keep_first,
    max_difference,
    no_fused_attention,
    parameter_count,
    print_table,
    randomize_batchnorm,
    report_lines,
    rows_mask,
    save_json,
    split_list,
    use_default_threads,
    wall,
)

import speedup  # noqa: E402
from speedup.engine import outputs_close  # noqa: E402
from speedup.testing import masked_copy  # noqa: E402

try:  # optional baseline
    import torch_pruning as tp
except Exception as _exc:  # noqa: BLE001 - any import failure just disables the baseline
    tp = None
    TP_IMPORT_ERROR = f"{type(_exc).__name__}: {_exc}"
else:
    TP_IMPORT_ERROR = ""


# ============================================================================================
# Masks
#
# Why "keep the first half" is dependency-consistent: a residual add ``a + b`` (ResNet's skip,
# ViT's and BERT's residual stream) can only lose channel c if c is removed from BOTH a and b,
# and a depthwise conv maps input channel c to output channel c. Masking by importance would pick
# different channels in each layer and leave most of them needed somewhere. Here every layer
# keeps the channels with index < ceil(C/2) of its own output, so wherever two tensors meet
# (add, depthwise conv, LayerNorm over the stream), they have zeros (or, after a BatchNorm with a
# shift, constants) at the SAME indices, and everything beyond ceil(C/2) can go, in every layer.
# Layers with different widths (FFN inner, bottleneck inner) only meet themselves, so their own
# first half is consistent too. Attention heads are kept whole: the first ceil(H/2) heads.
# ============================================================================================

Masks = dict[str, dict[str, torch.Tensor]]


def cnn_masks(model: nn.Module, classifier: nn.Module) -> Masks:
    """Every conv / linear except ``classifier``: keep the first ceil(C/2) output channels (weight rows, bias)."""
    masks: Masks = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and module is not classifier:
            masks[name] = rows_mask(module)
    return masks


def _attention_masks(masks: Masks, name: str, attention: nn.MultiheadAttention) -> None:
    """Whole heads: keep the rows of q, k and v (in ``in_proj_weight`` / ``in_proj_bias``) of the first ceil(H/2) heads."""
    embed, heads = attention.embed_dim, attention.num_heads
    head_dim = embed // heads
    rows = torch.arange(3 * embed)
    keep = ((rows % embed) // head_dim) < keep_first(heads)  # row -> head, per q/k/v block
    weight = attention.in_proj_weight
    add_mask(masks, name, "in_proj_weight", keep[:, None].expand(weight.shape).clone())
    if attention.in_proj_bias is not None:
        add_mask(masks, name, "in_proj_bias", keep.clone())


def _transformer_masks(model: nn.Module, classifier: nn.Module) -> Masks:
    """Shared by ViT and BERT: linears/convs keep their first output half (so ``out_proj``, the FFN's
    second linear and the patch embedding write zeros to the second half of the residual stream),
    attention keeps its first half of heads, every LayerNorm (all of them normalise the stream) has
    its second half of weight and bias masked, and every embedding table its second half of columns."""
    masks: Masks = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            _attention_masks(masks, name, module)
        elif isinstance(module, (nn.Conv2d, nn.Linear)) and module is not classifier:
            masks[name] = rows_mask(module)  # includes MultiheadAttention.out_proj: it writes the stream
        elif isinstance(module, nn.LayerNorm):
            add_mask(masks, name, "weight", first_half_mask(module.weight, 0))
            add_mask(masks, name, "bias", first_half_mask(module.bias, 0))
        elif isinstance(module, nn.Embedding):
            add_mask(masks, name, "weight", first_half_mask(module.weight, 1))
    return masks


def vit_masks(model: nn.Module) -> Masks:
    """torchvision ViT: the transformer rule, plus the class token and position embedding (they write the stream)."""
    masks = _transformer_masks(model, model.heads.head)
    add_mask(masks, "", "class_token", first_half_mask(model.class_token, 2))
    add_mask(masks, "encoder", "pos_embedding", first_half_mask(model.encoder.pos_embedding, 2))
    return masks


def bert_masks(model: nn.Module) -> Masks:
    """The BERT-like encoder: the transformer rule (word and position embeddings are nn.Embedding)."""
    return _transformer_masks(model, model.classifier)


# ============================================================================================
# Models
# ============================================================================================


class BertLikeEncoder(nn.Module):
    """BERT-base sized: 12 layers, hidden 768, 12 heads, FFN 3072, post-norm, GELU; a classifier on [CLS]."""

    def __init__(self, vocab: int = 30522, hidden: int = 768, layers: int = 12, heads: int = 12, ffn: int = 3072,
                 max_positions: int = 512, classes: int = 2):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, hidden)
        self.position_embeddings = nn.Embedding(max_positions, hidden)
        self.embedding_norm = nn.LayerNorm(hidden)
        layer = nn.TransformerEncoderLayer(hidden, heads, ffn, batch_first=True, activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.classifier = nn.Linear(hidden, classes)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        x = self.encoder(self.embedding_norm(x))
        return self.classifier(x[:, 0])


def _torchvision(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)()

    return build


def _vit_b_16() -> nn.Module:
    """torchvision's ViT-B/16, with its zero-initialised classifier and class token given random values.

    torchvision initialises ``heads.head`` (weight and bias) and ``class_token`` to zeros, so an
    untrained ViT outputs a constant and speedup (rightly) removes almost everything. A trained
    model has neither; random values like the other layers' make the benchmark meaningful.
    """
    import torchvision

    model = torchvision.models.vit_b_16()
    with torch.no_grad():
        nn.init.normal_(model.heads.head.weight, std=0.02)
        nn.init.normal_(model.heads.head.bias, std=0.02)
        nn.init.normal_(model.class_token, std=0.02)
    return model


def _image(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


def _tokens(batch: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 30522, (batch, 128), generator=torch.Generator().manual_seed(seed))


@dataclass
class Spec:
    name: str
    build: Callable[[], nn.Module]
    masks: Callable[[nn.Module], Masks]
    classifier: Callable[[nn.Module], nn.Module]
    inputs: Callable[[int, int], torch.Tensor]
    batches: tuple[int, ...]
    attention: bool = False


SPECS = {
    "resnet50": Spec("resnet50", _torchvision("resnet50"), lambda m: cnn_masks(m, m.fc), lambda m: m.fc, _image, (1, 8)),
    "mobilenet_v2": Spec("mobilenet_v2", _torchvision("mobilenet_v2"), lambda m: cnn_masks(m, m.classifier[1]),
                         lambda m: m.classifier[1], _image, (1, 8)),
    "densenet201": Spec("densenet201", _torchvision("densenet201"), lambda m: cnn_masks(m, m.classifier),
                        lambda m: m.classifier, _image, (1, 8)),
    "vit_b_16": Spec("vit_b_16", _vit_b_16, vit_masks, lambda m: m.heads.head, _image, (1,), attention=True),
    "bert": Spec("bert", BertLikeEncoder, bert_masks, lambda m: m.classifier, _tokens, (1,), attention=True),
}


# ============================================================================================
# Torch-Pruning baseline
# ============================================================================================


def torch_pruning(spec: Spec, model: nn.Module, example: torch.Tensor) -> tuple[Optional[float], str]:
    """Prunes ``model`` in place with Torch-Pruning at 50% of channels; returns (seconds, note)."""
    if tp is None:
        return None, f"torch_pruning not importable ({TP_IMPORT_ERROR})"
    kwargs: dict[str, Any] = dict(importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=0.5,
                                  ignored_layers=[spec.classifier(model)], round_to=None)
    note = ""
    if spec.attention:
        # nn.MultiheadAttention ties q/k/v/out widths to embed_dim, so Torch-Pruning prunes embed_dim
        # (the residual stream) with every head kept and head_dim halved; grouping its channels per
        # head makes each head lose the same number (as Torch-Pruning's own torchvision example
        # does). Its `num_heads=` / `prune_num_heads=` target separate q/k/v nn.Linear layers: given
        # nn.MultiheadAttention modules, 1.6.1 then leaves the whole residual stream unpruned.
        kwargs["out_channel_groups"] = {m: m.num_heads for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
        note = "TP: nn.MultiheadAttention pruned in embed_dim (all heads kept, head_dim halved)"
        if spec.name == "vit_b_16":
            kwargs["unwrapped_parameters"] = [(model.class_token, 2), (model.encoder.pos_embedding, 2)]
    model.eval()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(model, example, **kwargs)
        pruner.step()
    seconds = time.perf_counter() - start
    if spec.name == "vit_b_16":
        model.hidden_dim = model.conv_proj.out_channels  # torchvision's ViT reshapes with it
    with torch.no_grad():
        model(example)  # must still run
    return seconds, note


# ============================================================================================
# One model
# ============================================================================================


def bench_model(spec: Spec, args: argparse.Namespace) -> tuple[list[dict], dict]:
    torch.manual_seed(0)
    model = spec.build().eval()
    bns = randomize_batchnorm(model, seed=1)
    masks = spec.masks(model)
    dummy = spec.inputs(1, 0)

    masked = masked_copy(model, masks).eval()
    tp_model = copy.deepcopy(model) if not args.no_tp else None
    spares = [copy.deepcopy(model) for _ in range(args.shrink_repeats - 1)]

    with torch.no_grad():  # as a user's model has: run once (the first forward of a process sets up kernels)
        call(masked, dummy)
    def forwards_beside() -> list[float]:
        # Masked forwards on the dummy, timed right before each speedup call: the call's length in
        # forward passes compares two things measured in the same state of the machine.
        with torch.no_grad():
            return [wall(lambda: call(masked, dummy))[1] for _ in range(3)]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        forwards = forwards_beside()
        report, shrink_s = wall(lambda: speedup.shrink(model, masks, dummy))
        # The first call of a process also pays one-time costs (loading plugins, first use of
        # code paths); further calls on fresh copies show the steady cost. Both are reported.
        repeats = []
        for spare in spares:
            forwards += forwards_beside()
            repeats.append(wall(lambda m=spare: speedup.shrink(m, masks, dummy))[1])
    shrink_median_s = statistics.median([shrink_s] + repeats)
    forward_s = statistics.median(forwards)
    del spares
    sped = model.eval()
    details: dict[str, Any] = {
        "model": spec.name,
        "batchnorms_randomized": bns,
        "masked_modules": len(masks),
        "shrink_timings_s": dict(report.timings),
        "report_max_abs_diff_dummy": report.max_abs_diff,
        "modules_rebuilt": len(report.modules),
        "parameters_sliced": len(report.parameters),
        "barriers": [str(b) for b in report.barriers],
        "kept_for_verification": list(report.kept_for_verification),
        "report_warnings": list(report.warnings),
        "python_warnings": sorted({f"{w.category.__name__}: {w.message}" for w in caught}),
        "notes": [],
    }
    print(f"  speedup.shrink: {shrink_s:.2f} s  ({', '.join(f'{k} {v:.2f}' for k, v in report.timings.items())}); "
          f"median of {len(repeats) + 1} calls {shrink_median_s:.2f} s; masked forward beside them "
          f"{forward_s * 1e3:.1f} ms (median of {len(forwards)})", flush=True)
    summary = report.summary().splitlines()
    shown = [line for line in summary if not line.startswith("warning: ")]
    warned = [line for line in summary if line.startswith("warning: ")]
    shown += warned[:2] + ([f"... and {len(warned) - 2} more warnings (all in the JSON file)"] if len(warned) > 2 else [])
    print("  " + "\n  ".join(shown), flush=True)

    tp_s = tp_note = None
    if tp_model is not None:
        try:
            tp_s, tp_note = torch_pruning(spec, tp_model, dummy)
            print(f"  torch_pruning: {tp_s:.2f} s" + (f"  ({tp_note})" if tp_note else ""), flush=True)
        except Exception as exc:  # noqa: BLE001 - the baseline may fail; report and go on
            tp_note = f"TP failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            print(f"  {tp_note}", flush=True)
            tp_model = None
        if tp_note:
            details["notes"].append(tp_note)
    elif args.no_tp:
        details["notes"].append("TP skipped (--no-tp)")

    # report.flops_after is counted during speedup's verification pass, the first forward of the
    # sped-up model; count again on a later forward (what every forward after the first costs).
    flops_recount = count_flops(sped, dummy)
    details["flops_after_recount"] = flops_recount
    tp_params = parameter_count(tp_model) if tp_model is not None else None
    tp_flops = count_flops(tp_model, dummy) if tp_model is not None else None

    rows = []
    for batch in spec.batches:
        if batch != 1 and args.no_batch8:
            continue
        fresh = spec.inputs(batch, 1000 + batch)
        with torch.no_grad():
            expected, actual = masked(fresh), sped(fresh)
        diff, scale = max_difference(expected, actual)
        close = expected.shape == actual.shape and outputs_close(expected, actual)
        candidates = {"masked": masked, "sped": sped}
        if tp_model is not None:
            candidates["tp"] = tp_model
        warmup, repeats, budget = args.warmup, args.repeats if batch == 1 else args.repeats_large, args.budget
        latency = interleaved_latency(candidates, fresh, warmup=warmup, repeats=repeats, budget_s=budget)
        row = {
            "model": spec.name,
            "batch": batch,
            "masked_ms": latency["masked"]["median"] * 1e3,
            "sped_ms": latency["sped"]["median"] * 1e3,
            "latency_x": latency["masked"]["median"] / latency["sped"]["median"],
            "flops_ratio": report.flops_ratio,
            "flops_ratio_recount": flops_recount / report.flops_before if report.flops_before else None,
            "params_before_m": report.params_before / 1e6,
            "params_after_m": report.params_after / 1e6,
            "max_diff": diff,
            "out_scale": scale,
            "close": close,
            "shrink_s": shrink_s,
            "forward_beside_ms": forward_s * 1e3,
            "shrink_fwd": shrink_s / forward_s,
            "shrink_median_s": shrink_median_s,
            "shrink_median_fwd": shrink_median_s / forward_s,
            "tp_s": tp_s if tp_model is not None else None,
            "tp_ms": latency["tp"]["median"] * 1e3 if "tp" in latency else None,
            "tp_latency_x": latency["masked"]["median"] / latency["tp"]["median"] if "tp" in latency else None,
            "tp_flops_ratio": tp_flops / report.flops_before if tp_flops and report.flops_before else None,
            "tp_params_m": tp_params / 1e6 if tp_params is not None else None,
            "runs": latency["masked"]["runs"],
            "masked_min_ms": latency["masked"]["min"] * 1e3,
            "sped_min_ms": latency["sped"]["min"] * 1e3,
            "tp_min_ms": latency["tp"]["min"] * 1e3 if "tp" in latency else None,
            "error": None,
        }
        rows.append(row)
        print(f"  batch {batch}: masked {row['masked_ms']:.1f} ms, sped {row['sped_ms']:.1f} ms "
              f"({row['latency_x']:.2f}x)" + (f", tp {row['tp_ms']:.1f} ms" if row["tp_ms"] else "")
              + f", max diff {diff:.2e} (output scale {scale:.2e}), {latency['masked']['runs']} runs", flush=True)
    if args.fastpath_check and spec.attention:
        # The masked nn.MultiheadAttention / TransformerEncoderLayer run torch's fused fast path; the
        # sped-up PrunedMultiheadAttention cannot. For reference, the masked model without it:
        with no_fused_attention():
            plain = interleaved_latency({"masked": masked}, spec.inputs(1, 1001), warmup=args.warmup,
                                        repeats=args.repeats, budget_s=args.budget)
        details["masked_ms_without_fastpath"] = plain["masked"]["median"] * 1e3
        print(f"  masked without fused attention fast path: {plain['masked']['median'] * 1e3:.1f} ms", flush=True)
    return rows, details


# ============================================================================================
# Main
# ============================================================================================

COLUMNS = [
    ("model", "model", ""),
    ("batch", "bs", "d"),
    ("masked_ms", "masked ms", ".1f"),
    ("sped_ms", "sped ms", ".1f"),
    ("latency_x", "lat x", ".2f"),
    ("flops_ratio", "FLOPs a/b", ".3f"),
    ("flops_ratio_recount", "(recount)", ".3f"),
    ("params_before_m", "params M", ".2f"),
    ("params_after_m", "-> M", ".2f"),
    ("max_diff", "max |diff|", ".1e"),
    ("shrink_s", "shrink s", ".2f"),
    ("shrink_fwd", "= fwds", ".1f"),
    ("shrink_median_s", "median s", ".2f"),
    ("shrink_median_fwd", "= fwds", ".1f"),
    ("tp_s", "TP s", ".2f"),
    ("tp_ms", "TP ms", ".1f"),
    ("tp_flops_ratio", "TP FLOPs", ".3f"),
    ("tp_params_m", "TP M", ".2f"),
]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", help=f"comma-separated subset of {','.join(SPECS)}")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    parser.add_argument("--no-tp", action="store_true", help="skip the Torch-Pruning baseline")
    parser.add_argument("--shrink-repeats", type=int, default=3,
                        help="speedup calls per model (on fresh copies) for the median time")
    parser.add_argument("--no-batch8", action="store_true", help="only batch 1 for the CNNs")
    parser.add_argument("--no-fastpath-check", dest="fastpath_check", action="store_false",
                        help="skip timing the masked attention models without torch's fused fast path")
    parser.add_argument("--keep-denormals", action="store_true",
                        help="do not flush denormals to zero (timings then vary up to 10x between runs here)")
    parser.add_argument("--output", default="speedup_models", help="JSON name under benchmarks/results/")
    args = parser.parse_args(argv)
    names = split_list(args.models, SPECS)
    if args.quick:
        args.warmup, args.repeats, args.repeats_large, args.budget = 1, 3, 3, 10.0
    else:
        args.warmup, args.repeats, args.repeats_large, args.budget = 3, 25, 11, 30.0

    threads = use_default_threads()
    flushed = flush_denormals(not args.keep_denormals)
    env = environment()
    env["flush_denormal"] = flushed
    print(f"speedup {env['speedup']}, torch {env['torch']}, torchvision {env['torchvision']}, torch_pruning "
          f"{env.get('torch_pruning_dist', env['torch_pruning'])}; {threads} threads, {env['cpu_count']} CPUs; "
          f"{'quick' if args.quick else 'full'} run: warm-up {args.warmup}, median of up to {args.repeats} "
          f"interleaved runs (batch 8: {args.repeats_large})", flush=True)
    rows, details, total = bench_each(names, lambda name: bench_model(SPECS[name], args))

    print()
    print_table(rows, COLUMNS, title=f"speedup on 50%-masked models (CPU, {threads} threads, latency = median ms; "
                                     f"lat x = masked / sped; FLOPs a/b = after / before)")
    for row in rows:
        if row.get("error"):
            print(f"  {row['model']}: FAILED: {row['error']}")
    for info in details:
        lines = report_lines(info) + info.get("notes", [])
        if "masked_ms_without_fastpath" in info:
            lines.append(f"masked without torch's fused attention fast path: {info['masked_ms_without_fastpath']:.1f} ms")
        if lines:
            print(f"  {info['model']}: " + "\n    ".join(lines))
    print(f"\ntotal {total:.0f} s")
    path = save_json(args.output, {"environment": env, "quick": args.quick, "total_s": total,
                                   "columns": [c[0] for c in COLUMNS], "rows": rows, "details": details})
    print(f"saved {path}")
    return 1 if any(r.get("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
