"""Benchmark: speedup on Hugging Face transformers models with half their heads and FFN channels masked.

Two models, random weights built from configs (nothing is downloaded), ``torch.manual_seed(0)``,
eval mode, in one run:

* ``bert``: a BERT-base encoder, ``transformers.BertModel(BertConfig())`` (12 layers, hidden 768,
  12 heads, FFN 3072, about 110M parameters); dummy input batch 1 x 128 tokens;
* ``llama``: a Llama-shaped decoder of about 100M parameters, ``LlamaForCausalLM(LlamaConfig(
  hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
  num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=True))`` (grouped-query attention,
  3 query heads per key/value head; the input and output embeddings are one tensor, as in Llama 3.2
  1B, which is what brings it to 100M instead of 125M); dummy input a batch 1 x 128 prompt.

Masks (chosen at random per layer, ``torch.Generator`` seeded per model):

* heads: 50% of the heads of every layer, whole heads, on the output rows (and biases) of the
  query, key and value projections. For Llama's grouped-query attention whole key/value groups go:
  half the key/value heads (k_proj / v_proj rows) and the query heads that read them (q_proj rows);
* FFN: 50% of the intermediate channels of every layer: BERT ``intermediate.dense`` rows and bias,
  Llama ``gate_proj`` and ``up_proj`` rows (the same channels on both).

For each model:

* ``masked``: :func:`speedup.testing.masked_copy` (built before the speedup); ``sped``:
  ``speedup.shrink(model, masks, dummy)`` in place, timed with the wall clock (first call of the
  model; ``--shrink-repeats`` more on fresh copies show the steady cost), ``report.timings`` per
  phase, and the call's time in forward passes of the masked model at the dummy's shape (batch 1 x
  128, the median measured below in the same run; for Llama the prefill);
* parameters and FLOPs before / after (``report``, FLOPs on the dummy; ``recount``: counted again
  on a later forward of the sped-up model with ``_common.count_flops``);
* latency, CPU, ``torch.no_grad()``, median of interleaved runs (one run of each model per round,
  the order rotating, ``_common.interleaved_latency``): BERT a forward at batch 1 x 128 and
  8 x 128; Llama the prefill (batch 1 x 128 prompt, ``use_cache=True``, logits of every position
  as the dummy's forward) and greedy decoding with the key/value cache (after an untimed prefill,
  ``--decode-steps`` calls of one token each with ``past_key_values``; the time per token);
* correctness on FRESH inputs (other random tokens, not the dummy): the largest output difference
  masked vs sped (BERT: ``last_hidden_state`` and ``pooler_output``, at both batch sizes, the
  batch of 8 with its first sequence padded; Llama: prefill logits, and the logits of every decode
  step), and for Llama whether ``generate(max_new_tokens=N, min_new_tokens=N, do_sample=False)``
  returns the same tokens from both (a batch 1 x 128 prompt, and a left-padded batch of 2).

The last lines give "speedup call on BERT-base: X s = Y forward passes (criterion: <= 5)".

Usage::

    bash dev.sh bench transformers_models                  # both models (a few minutes on 2 cores)
    bash dev.sh bench transformers_models --quick          # tiny configs (2 layers, hidden 128): a smoke test
    bash dev.sh bench transformers_models --models llama --json /tmp/llama.json
    bash dev.sh bench transformers_models --threads 1      # steadier when other work shares the cores

Per-model lines and a table go to stdout; the rows and details go to
``benchmarks/results/transformers_models.json`` (``transformers_models_quick.json`` with
``--quick``; ``--json PATH`` to put them elsewhere).
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
    count_flops,
    environment,
    flush_denormals,
    interleaved_latency,
    max_difference,
    parameter_count,
    print_table,
    report_lines,
    save_json,
    split_list,
    use_default_threads,
    wall,
    write_json,
)

import speedup  # noqa: E402
from speedup.testing import masked_copy  # noqa: E402

import transformers  # noqa: E402

Masks = dict[str, dict[str, torch.Tensor]]


# ============================================================================================
# Models
# ============================================================================================


@dataclass(frozen=True)
class Sizes:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    tokens: int
    """Sequence length of the dummy and of every timed input."""


FULL = {
    "bert": Sizes(layers=12, hidden=768, heads=12, kv_heads=12, ffn=3072, vocab=30522, tokens=128),
    "llama": Sizes(layers=12, hidden=768, heads=12, kv_heads=4, ffn=2048, vocab=32000, tokens=128),
}
QUICK = {
    "bert": Sizes(layers=2, hidden=128, heads=4, kv_heads=4, ffn=512, vocab=1000, tokens=32),
    "llama": Sizes(layers=2, hidden=128, heads=4, kv_heads=2, ffn=256, vocab=1000, tokens=32),
}
LABELS = {"bert": "BERT-base", "llama": "Llama-100M"}


def build_bert(sizes: Sizes, quick: bool) -> nn.Module:
    if quick:
        config = transformers.BertConfig(vocab_size=sizes.vocab, hidden_size=sizes.hidden,
                                         num_hidden_layers=sizes.layers, num_attention_heads=sizes.heads,
                                         intermediate_size=sizes.ffn, max_position_embeddings=128)
    else:
        config = transformers.BertConfig()  # the defaults are BERT-base
    return transformers.BertModel(config)


def build_llama(sizes: Sizes, quick: bool) -> nn.Module:
    config = transformers.LlamaConfig(hidden_size=sizes.hidden, intermediate_size=sizes.ffn,
                                      num_hidden_layers=sizes.layers, num_attention_heads=sizes.heads,
                                      num_key_value_heads=sizes.kv_heads, vocab_size=sizes.vocab,
                                      tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return transformers.LlamaForCausalLM(config)


# ============================================================================================
# Masks
# ============================================================================================


def drop_rows(model: nn.Module, masks: Masks, name: str, drop: torch.Tensor) -> None:
    """Masks the output features ``drop`` (indices) of the Linear ``name``: weight rows and bias entries."""
    module = model.get_submodule(name)
    keep = torch.ones(module.out_features, dtype=torch.bool)
    keep[drop] = False
    add_mask(masks, name, "weight", keep[:, None].expand_as(module.weight).clone())
    if module.bias is not None:
        add_mask(masks, name, "bias", keep.clone())


def head_features(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The feature indices of the given heads."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def random_half(count: int, generator: torch.Generator) -> torch.Tensor:
    """``count // 2`` distinct indices below ``count``, sorted."""
    return torch.randperm(count, generator=generator)[: count // 2].sort().values


def bert_masks(model: nn.Module, seed: int = 0) -> Masks:
    """Half the heads (query/key/value rows) and half the FFN channels of every layer, at random."""
    config = model.config
    heads, head_dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    generator = torch.Generator().manual_seed(seed)
    masks: Masks = {}
    for i in range(config.num_hidden_layers):
        prefix = f"encoder.layer.{i}"
        features = head_features(random_half(heads, generator), head_dim)
        for projection in ("query", "key", "value"):
            drop_rows(model, masks, f"{prefix}.attention.self.{projection}", features)
        drop_rows(model, masks, f"{prefix}.intermediate.dense", random_half(config.intermediate_size, generator))
    return masks


def llama_masks(model: nn.Module, seed: int = 0) -> Masks:
    """Half the key/value groups (k/v rows, and the q rows of their query heads) and half the FFN
    channels (gate and up rows) of every layer, at random."""
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    group = heads // kv_heads
    generator = torch.Generator().manual_seed(seed)
    masks: Masks = {}
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}"
        kv = random_half(kv_heads, generator)
        queries = head_features(kv, group)  # query heads g * group ... g * group + group - 1 read kv head g
        drop_rows(model, masks, f"{prefix}.self_attn.q_proj", head_features(queries, head_dim))
        for projection in ("k_proj", "v_proj"):
            drop_rows(model, masks, f"{prefix}.self_attn.{projection}", head_features(kv, head_dim))
        channels = random_half(config.intermediate_size, generator)
        for projection in ("gate_proj", "up_proj"):
            drop_rows(model, masks, f"{prefix}.mlp.{projection}", channels)
    return masks


# ============================================================================================
# Inputs
# ============================================================================================


def tokens(vocab: int, batch: int, length: int, seed: int, pad_first: int = 0, left: bool = False) -> dict:
    """Random token ids (above the special ids 0-2) and an attention mask; ``pad_first`` pads that many
    positions of the first sequence (at the end, or at the start with ``left``)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=generator)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    if pad_first:
        pad = slice(0, pad_first) if left else slice(length - pad_first, length)
        ids[0, pad] = 0
        attention_mask[0, pad] = 0
    return {"input_ids": ids, "attention_mask": attention_mask}


# ============================================================================================
# Decoding
# ============================================================================================


def greedy_decode(model: nn.Module, prompt: dict, steps: int) -> tuple[torch.Tensor, list[torch.Tensor], float]:
    """Prefill (untimed), then ``steps`` greedy steps of one token each with the key/value cache.

    Returns the new tokens, the logits of every step (the prefill's last position first) and the
    seconds the ``steps`` one-token calls took. Batch 1 without padding: no attention mask is needed
    after the prompt (the model derives positions from the cache).
    """
    with torch.no_grad():
        out = model(**prompt, use_cache=True)
        cache = out.past_key_values
        logits = [out.logits[:, -1].clone()]
        token = logits[-1].argmax(-1, keepdim=True)
        new = [token]
        started = time.perf_counter()
        for _ in range(steps):
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits.append(out.logits[:, -1].clone())
            token = logits[-1].argmax(-1, keepdim=True)
            new.append(token)
        seconds = time.perf_counter() - started
    return torch.cat(new, dim=1), logits, seconds


def interleaved_decode(models: dict[str, nn.Module], prompt: dict, steps: int, *, warmup: int, repeats: int,
                       budget_s: Optional[float]) -> dict[str, dict]:
    """Seconds per decoded token of each model, median of interleaved rounds (one greedy decode of
    ``steps`` tokens per model per round, the order rotating), as ``_common.interleaved_latency`` does
    for forwards; ``budget_s`` stops after the round in which the measured time passes it (>= 3 rounds)."""
    names = list(models)
    for _ in range(warmup):
        for name in names:
            greedy_decode(models[name], prompt, steps)
    samples: dict[str, list[float]] = {name: [] for name in names}
    started = time.perf_counter()
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(greedy_decode(models[name], prompt, steps)[2] / steps)
        if budget_s is not None and round_ >= 2 and time.perf_counter() - started > budget_s:
            break
    return {name: {"median": statistics.median(s), "min": min(s), "runs": len(s), "warmup_runs": warmup}
            for name, s in samples.items()}


def largest_difference(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> tuple[float, float]:
    """``_common.max_difference`` over lists of tensors of equal shapes."""
    return max_difference(tuple(reference), tuple(candidate))


# ============================================================================================
# One model
# ============================================================================================


@dataclass(frozen=True)
class Spec:
    name: str
    build: Callable[[Sizes, bool], nn.Module]
    masks: Callable[[nn.Module], Masks]


SPECS = {
    "bert": Spec("bert", build_bert, bert_masks),
    "llama": Spec("llama", build_llama, llama_masks),
}


def shrink_timed(model: nn.Module, masks: Masks, dummy: dict, repeats: int):
    """``speedup.shrink`` on ``model`` (timed), then on ``repeats`` fresh copies made before it."""
    spares = [copy.deepcopy(model) for _ in range(repeats)]
    with torch.no_grad():  # a user's model has run before: its own first-run costs are not the speedup's
        model(**dummy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report, seconds = wall(lambda: speedup.shrink(model, masks, dummy))
        # The first call of a process also pays one-time costs (loading plugins, first use of code
        # paths); further calls on fresh copies show the steady cost.
        again = []
        for spare in spares:
            again.append(wall(lambda m=spare: speedup.shrink(m, masks, dummy)))
    del spares
    return report, seconds, again, sorted({f"{w.category.__name__}: {w.message}" for w in caught})


def bench_model(spec: Spec, args: argparse.Namespace) -> tuple[list[dict], dict]:
    sizes = (QUICK if args.quick else FULL)[spec.name]
    torch.manual_seed(0)
    model = spec.build(sizes, args.quick).eval()
    masks = spec.masks(model)
    dummy = tokens(sizes.vocab, 1, sizes.tokens, seed=0)
    params = parameter_count(model)
    kept = sum(int(m.sum()) for entry in masks.values() for m in entry.values())
    total = sum(m.numel() for entry in masks.values() for m in entry.values())
    print(f"  {type(model).__name__}: {params:,} parameters ({params / 1e6:.1f}M); {sizes.layers} layers, hidden "
          f"{sizes.hidden}, {sizes.heads} heads ({sizes.kv_heads} key/value), FFN {sizes.ffn}, vocab {sizes.vocab}; "
          f"masks on {len(masks)} linears keep {kept / total:.1%} of their entries", flush=True)

    masked = masked_copy(model, masks).eval()
    report, shrink_s, again, caught = shrink_timed(model, masks, dummy, args.shrink_repeats)
    sped = model.eval()
    timings = dict(report.timings)
    print(f"  speedup.shrink: {shrink_s:.2f} s wall  (report.timings: "
          f"{', '.join(f'{k} {v:.2f} s' for k, v in timings.items())})", flush=True)
    for rep, seconds in again:
        print(f"  again on a fresh copy: {seconds:.2f} s wall  ("
              f"{', '.join(f'{k} {v:.2f} s' for k, v in rep.timings.items())})", flush=True)
    summary = [line for line in report.summary().splitlines() if not line.startswith("time ")]
    print("  " + "\n  ".join(summary), flush=True)

    flops_recount = count_flops(sped, dummy)
    details: dict[str, Any] = {
        "model": spec.name,
        "class": type(model).__name__,
        "sizes": sizes.__dict__,
        "parameters": params,
        "masked_linears": len(masks),
        "mask_density": kept / total,
        "shrink_s": shrink_s,
        "shrink_timings_s": timings,
        "shrink_again_s": [s for _, s in again],
        "shrink_again_timings_s": [dict(r.timings) for r, _ in again],
        "report_max_abs_diff_dummy": report.max_abs_diff,
        "modules_rebuilt": len(report.modules),
        "parameters_sliced": len(report.parameters),
        "attributes": {k: list(v) for k, v in report.attributes.items()},
        "barriers": [str(b) for b in report.barriers],
        "kept_for_verification": list(report.kept_for_verification),
        "report_warnings": list(report.warnings),
        "python_warnings": caught,
        "flops_before": report.flops_before,
        "flops_after": report.flops_after,
        "flops_after_recount": flops_recount,
        "params_before": report.params_before,
        "params_after": report.params_after,
        "params_after_counted": parameter_count(sped),
    }
    print(f"  parameters {report.params_before / 1e6:.2f}M -> {report.params_after / 1e6:.2f}M "
          f"({report.param_ratio:.3f}); FLOPs at the dummy {report.flops_before / 1e9:.2f} G -> "
          f"{report.flops_after / 1e9:.2f} G ({report.flops_ratio:.3f}; recount on a later forward "
          f"{flops_recount / report.flops_before:.3f})", flush=True)

    base = {
        "model": spec.name,
        "params_before_m": report.params_before / 1e6,
        "params_after_m": report.params_after / 1e6,
        "flops_ratio": report.flops_ratio,
        "shrink_s": shrink_s,
    }
    warmup, repeats, budget = args.warmup, args.repeats, args.budget
    rows: list[dict] = []

    def add_row(measure: str, latency: dict, diff: float, scale: float, extra: Optional[dict] = None) -> dict:
        row = dict(base, measure=measure, masked_ms=latency["masked"]["median"] * 1e3,
                   sped_ms=latency["sped"]["median"] * 1e3,
                   latency_x=latency["masked"]["median"] / latency["sped"]["median"],
                   masked_min_ms=latency["masked"]["min"] * 1e3, sped_min_ms=latency["sped"]["min"] * 1e3,
                   runs=latency["masked"]["runs"], max_diff=diff, out_scale=scale, **(extra or {}))
        rows.append(row)
        print(f"  {measure}: masked {row['masked_ms']:.1f} ms, sped {row['sped_ms']:.1f} ms ({row['latency_x']:.2f}x), "
              f"max |diff| {diff:.2e} (output scale {scale:.2e}), {row['runs']} runs", flush=True)
        return row

    pair = {"masked": masked, "sped": sped}
    n = sizes.tokens
    if spec.name == "bert":
        for batch in (1, 8):
            fresh = tokens(sizes.vocab, batch, n, seed=1000 + batch, pad_first=n // 3 if batch > 1 else 0)
            with torch.no_grad():
                expected, actual = masked(**fresh), sped(**fresh)
            diff, scale = largest_difference([expected.last_hidden_state, expected.pooler_output],
                                             [actual.last_hidden_state, actual.pooler_output])
            latency = interleaved_latency(pair, fresh, warmup=warmup, repeats=repeats if batch == 1 else args.repeats_large,
                                          budget_s=budget)
            add_row(f"forward {batch}x{n}", latency, diff, scale)
        forward_s = rows[0]["masked_ms"] / 1e3
    else:
        prompt = tokens(sizes.vocab, 1, n, seed=1001)
        with torch.no_grad():
            expected, actual = masked(**prompt, use_cache=True), sped(**prompt, use_cache=True)
        diff, scale = max_difference(expected.logits, actual.logits)
        latency = interleaved_latency(pair, dict(prompt, use_cache=True), warmup=warmup, repeats=repeats, budget_s=budget)
        add_row(f"prefill 1x{n}", latency, diff, scale)
        forward_s = latency["masked"]["median"]

        steps = args.decode_steps
        tokens_masked, logits_masked, _ = greedy_decode(masked, prompt, steps)
        tokens_sped, logits_sped, _ = greedy_decode(sped, prompt, steps)
        diff, scale = largest_difference(logits_masked, logits_sped)
        same_loop = bool(torch.equal(tokens_masked, tokens_sped))
        latency = interleaved_decode(pair, prompt, steps, warmup=1, repeats=args.decode_repeats, budget_s=budget)
        add_row(f"decode /token ({steps} steps)", latency, diff, scale, {"tokens_equal": same_loop})

        options = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0)
        checks = {}
        for label, inputs in (("1x%d prompt" % n, prompt),
                              ("left-padded 2x%d" % n, tokens(sizes.vocab, 2, n, seed=2002, pad_first=n // 3, left=True))):
            with torch.no_grad():
                (expected_tokens, masked_gen_s), (actual_tokens, sped_gen_s) = (
                    wall(lambda: masked.generate(**inputs, **options)), wall(lambda: sped.generate(**inputs, **options)))
            equal = expected_tokens.shape == actual_tokens.shape and bool(torch.equal(expected_tokens, actual_tokens))
            checks[label] = {"equal": equal, "new_tokens": int(expected_tokens.shape[1] - inputs["input_ids"].shape[1]),
                             "masked_s": masked_gen_s, "sped_s": sped_gen_s}
        details["generate"] = checks
        details["decode_loop_tokens_equal"] = same_loop
        rows[-1]["generate_equal"] = all(c["equal"] for c in checks.values())
        print(f"  greedy decode loop tokens equal: {'yes' if same_loop else 'NO'}; generate() tokens equal: "
              + ", ".join(f"{label} {'yes' if c['equal'] else 'NO'} ({c['new_tokens']} new; masked {c['masked_s']:.2f} s, "
                          f"sped {c['sped_s']:.2f} s once)" for label, c in checks.items()), flush=True)

    details["masked_forward_at_dummy_s"] = forward_s
    details["shrink_forwards"] = shrink_s / forward_s
    details["shrink_again_forwards"] = [s / forward_s for _, s in again]
    for row in rows:
        row["shrink_fwd"] = shrink_s / forward_s
    return rows, details


# ============================================================================================
# Main
# ============================================================================================

COLUMNS = [
    ("model", "model", ""),
    ("measure", "measure", ""),
    ("masked_ms", "masked ms", ".1f"),
    ("sped_ms", "sped ms", ".1f"),
    ("latency_x", "lat x", ".2f"),
    ("max_diff", "max |diff|", ".1e"),
    ("out_scale", "out scale", ".1e"),
    ("params_before_m", "params M", ".2f"),
    ("params_after_m", "-> M", ".2f"),
    ("flops_ratio", "FLOPs a/b", ".3f"),
    ("shrink_s", "shrink s", ".2f"),
    ("shrink_fwd", "= fwds", ".1f"),
    ("generate_equal", "generate =", ""),
]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", help=f"comma-separated subset of {','.join(SPECS)}")
    parser.add_argument("--quick", action="store_true", help="tiny configs (2 layers, hidden 128) and few runs")
    parser.add_argument("--json", help="where the results go (default benchmarks/results/transformers_models.json)")
    parser.add_argument("--shrink-repeats", type=int, default=None,
                        help="more speedup calls on fresh copies, for the steady cost (default 1; 0 with --quick)")
    parser.add_argument("--decode-steps", type=int, default=None, help="tokens decoded (default 32; 8 with --quick)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default torch's own, the physical cores)")
    parser.add_argument("--keep-denormals", action="store_true", help="do not flush denormals (noisier timings)")
    args = parser.parse_args(argv)
    names = split_list(args.models, SPECS)
    if args.quick:
        args.warmup, args.repeats, args.repeats_large, args.decode_repeats, args.budget = 1, 3, 3, 3, 10.0
        defaults = dict(shrink_repeats=0, decode_steps=8)
    else:
        args.warmup, args.repeats, args.repeats_large, args.decode_repeats, args.budget = 3, 25, 11, 9, 30.0
        defaults = dict(shrink_repeats=1, decode_steps=32)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    threads = use_default_threads()
    if args.threads:  # with other work on the machine, fewer threads than cores can be far steadier
        torch.set_num_threads(args.threads)
        threads = args.threads
    flushed = flush_denormals(not args.keep_denormals)
    env = environment()
    env["flush_denormal"] = flushed
    print(f"speedup {env['speedup']}, torch {env['torch']}, transformers {env['transformers']}; {threads} threads, "
          f"{env['cpu_count']} CPUs; {'quick' if args.quick else 'full'} run: warm-up {args.warmup}, median of up to "
          f"{args.repeats} interleaved runs (batch 8: {args.repeats_large}; decode: {args.decode_repeats} rounds of "
          f"{args.decode_steps} tokens)", flush=True)
    rows, details, total = bench_each(names, lambda name: bench_model(SPECS[name], args))

    print()
    print_table(rows, COLUMNS, title=f"speedup on transformers models, 50% of heads and FFN channels masked (CPU, "
                                     f"{threads} threads, latency = median ms; lat x = masked / sped; FLOPs a/b = "
                                     f"after / before at the dummy; = fwds: shrink s / masked forward at the dummy)")
    for row in rows:
        if row.get("error"):
            print(f"  {row['model']}: FAILED: {row['error']}")
    for info in details:
        lines = report_lines(info)
        if lines:
            print(f"  {info['model']}: " + "\n    ".join(lines))
    print()
    for info in details:
        if "shrink_forwards" not in info:
            continue
        label = LABELS[info["model"]] if not args.quick else f"{info['model']} (--quick tiny config)"
        unit = "forward passes" if info["model"] == "bert" else "prefill forward passes"
        line = f"speedup call on {label}: {info['shrink_s']:.2f} s = {info['shrink_forwards']:.1f} {unit}"
        if info["model"] == "bert":
            line += " (criterion: <= 5)"
        if info["shrink_again_s"]:
            line += "; again on a fresh copy: " + ", ".join(
                f"{s:.2f} s = {f:.1f}" for s, f in zip(info["shrink_again_s"], info["shrink_again_forwards"]))
        phases = {k: v for k, v in info["shrink_timings_s"].items() if k != "total"}
        if phases:
            top = max(phases, key=phases.get)
            line += f"; largest phase: {top} {phases[top]:.2f} s"
        print(line)
    print(f"\ntotal {total:.0f} s")
    payload = {"environment": env, "quick": args.quick, "total_s": total, "columns": [c[0] for c in COLUMNS],
               "rows": rows, "details": details}
    path = write_json(args.json, payload) if args.json else save_json(
        "transformers_models_quick" if args.quick else "transformers_models", payload)
    print(f"saved {path}")
    failed = any(r.get("error") for r in rows) or any(
        not (info.get("generate") is None or all(c["equal"] for c in info["generate"].values())) for info in details)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
