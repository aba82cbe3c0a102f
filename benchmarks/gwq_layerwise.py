"""GWQ's gradient criterion computed layer by layer (a streamed backward, issue 22) against
the whole-model gradient, on a model where both fit: the trained byte-level Llama LM of
the quantization benchmark (``benchmarks/quant_lm.py``, d=512, 6 layers; its cached
weights are needed: run ``python benchmarks/quant_lm.py`` once).

For each gradient loss (causal-lm: next-token cross-entropy; mse: output distance at the
RTN weights) it reports, both ways: the time of the gradient computation (process CPU
seconds, the two paths interleaved), the largest relative difference of the aggregated
scores, the overlap of the selected 1% outlier sets per layer (|A and B| / |A|), and the
held-out perplexity of the quantized model (GWQ: RTN 4-bit g128 + 1% gradient outliers,
``quantize(...,layerwise=off)`` against ``layerwise=auto``). Targets: overlap 100% on every
layer and equal perplexity (the streamed backward is the exact gradient, so any
difference is floating-point summation order).

    python benchmarks/gwq_layerwise.py            # publish results/gwq_layerwise.json + BENCHMARKS.md
    python benchmarks/gwq_layerwise.py --quick    # the small quick LM, results/tmp only
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import _report, quant_lm  # noqa: E402
from benchmarks.quantization import lm_data  # noqa: E402
from gradrewrite.compiler import run_pipeline  # noqa: E402
from gradrewrite.errors import InputError  # noqa: E402
from gradrewrite.passes.quantize.gradient_layerwise import gradient_stack, layerwise_gradient_scores  # noqa: E402
from gradrewrite.passes.quantize.layers import find_layers  # noqa: E402
from gradrewrite.passes.quantize.outliers import gradient_scores, top_k_mask  # noqa: E402
from gradrewrite.passes.quantize.weight_only import rtn_dequantized  # noqa: E402
from gradrewrite.rewrite.capture import capture  # noqa: E402
from gradrewrite.rewrite.registry import PassContext  # noqa: E402

FRACTION, BITS, GROUP = 0.01, 4, 128
ROUNDS = 1   # timings of each path, interleaved (the machine is shared: one round keeps a run under ~15 min)


def cached_model(quick: bool):
    config = quant_lm.QUICK_CONFIG if quick else quant_lm.CONFIG
    recipe = quant_lm.QUICK_RECIPE if quick else quant_lm.RECIPE
    weights, record, _ = quant_lm._paths(quant_lm.cache_key(config, recipe))
    if not (weights.exists() and record.exists()):
        raise InputError(f"the trained LM is not cached ({weights.name})",
                         f"train it first: python benchmarks/quant_lm.py{' --quick' if quick else ''}")
    return quant_lm.trained(verbose=False, quick=quick)


def measure(quick: bool) -> dict:
    model, train = cached_model(quick)
    seq, batch, held, cal_b = lm_data(quick)
    graph = capture(model, (held[:batch, :-1],))
    layers, _ = find_layers(graph, "op:linear", "", kinds=("linear",), what="benchmark")
    stack, reason = gradient_stack(graph, layers, "auto")

    def ppl(g) -> float:
        total, count = 0.0, 0
        for i in range(0, len(held), batch):
            x = held[i:i + batch]
            logits = g(x[:, :-1])[0].float()
            total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                             x[:, 1:].reshape(-1), reduction="sum"))
            count += x[:, 1:].numel()
        return float(torch.tensor(total / count).exp())

    rows = []
    base = ppl(graph)
    for loss in ("causal-lm", "mse"):
        opts = dict(loss=loss, aggregation="abs", rtn=lambda w: rtn_dequantized(w, BITS, GROUP))
        cpu = {"whole-graph": [], "layer-wise": []}
        scores = {}
        for _ in range(ROUNDS):
            for path in cpu:
                t0 = time.process_time()
                scores[path] = (gradient_scores(graph, layers, cal_b, **opts) if path == "whole-graph" else
                                layerwise_gradient_scores(graph, stack, layers, cal_b, **opts))
                cpu[path].append(time.process_time() - t0)
        a, b = scores["whole-graph"], scores["layer-wise"]
        rel = max(float((b[k] - a[k]).abs().max() / a[k].abs().max()) for k in a)
        overlap = {}
        for k in a:
            ma, mb = top_k_mask(a[k], FRACTION), top_k_mask(b[k], FRACTION)
            overlap[k] = float((ma & mb).sum()) / max(1, int(ma.sum()))
        perplexity = {}
        for layerwise in ("off", "auto"):
            q = graph.clone()
            res = run_pipeline(q, f"quantize(bits={BITS},group={GROUP},outliers={FRACTION},criterion=gradient,"
                                  f"loss={loss},embeddings=off,layerwise={layerwise})",
                               verify=False, ctx=PassContext(calibration=cal_b, seed=0))
            assert res.records[-1].report["gradient_calibration"]["path"] == \
                ("whole-graph" if layerwise == "off" else "layer-wise")
            perplexity[layerwise] = ppl(q)
        row = {"loss": loss, "cpu_s": {k: round(statistics.median(v), 2) for k, v in cpu.items()},
               "cpu_s_all": {k: [round(x, 2) for x in v] for k, v in cpu.items()},
               "max_relative_score_difference": rel, "min_overlap": min(overlap.values()),
               "mean_overlap": sum(overlap.values()) / len(overlap), "overlap": overlap,
               "perplexity": {"whole-graph": round(perplexity["off"], 5), "layer-wise": round(perplexity["auto"], 5)}}
        row["targets"] = {"overlap_100pct": row["min_overlap"] == 1.0,
                          "equal_perplexity": abs(perplexity["off"] - perplexity["auto"]) <= 1e-3 * perplexity["off"]}
        print({k: v for k, v in row.items() if k != "overlap"}, flush=True)
        rows.append(row)
    return {"model": f"quant_lm d={model.lm.config.hidden_size}, {stack.count} layers ({train['key']})",
            "stack": reason, "fp32_perplexity": round(base, 5), "calibration": f"{len(cal_b)} batches of "
            f"{batch} x {seq} tokens", "held_out_tokens": int(held[:, 1:].numel()), "rows": rows,
            "threads": torch.get_num_threads()}


def publish(result: dict, quick: bool) -> None:
    m = _report.machine()
    table = [[r["loss"], r["cpu_s"]["whole-graph"], r["cpu_s"]["layer-wise"],
              f"{r['max_relative_score_difference']:.2e}", f"{100 * r['min_overlap']:.2f}%",
              r["perplexity"]["whole-graph"], r["perplexity"]["layer-wise"],
              "yes" if all(r["targets"].values()) else "NO"] for r in result["rows"]]
    for line in table:
        print(" | ".join(map(str, line)))
    text = (f"GWQ outliers (RTN {BITS}-bit g{GROUP} + {FRACTION:.0%} by |gradient| summed over the calibration "
            f"batches) with the gradient through the whole model (`layerwise=off`) and by the streamed backward "
            f"(`layerwise=auto`: layer-boundary activations kept, each decoder layer rerun alone and "
            f"backpropagated). Model: {result['model']}; calibration {result['calibration']}; held-out "
            f"perplexity over {result['held_out_tokens']} tokens (fp32: {result['fp32_perplexity']}). "
            f"CPU: process seconds of the gradient computation, median of {ROUNDS} interleaved runs each "
            f"({m.get('cpu', '?')}, {m.get('cpu_count')} cores, {result['threads']} torch threads, machine shared "
            f"with other jobs). Overlap: |outliers A and B| / |A|, the least over the {len(result['rows'][0]['overlap'])} "
            f"quantized layers. Targets: 100% overlap on every layer and the same perplexity (to 0.1%).")
    data = {"title": "GWQ gradients layer by layer against the whole-model gradient", "result": result,
            "sections": [{"text": text, "columns": ["loss", "CPU s whole", "CPU s layer-wise",
                                                    "max rel. score diff", "least overlap",
                                                    "ppl whole", "ppl layer-wise", "targets hold"],
                          "rows": table}]}
    _report.publish("gwq_layerwise", data, quick=quick)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the small quick LM; write results/tmp only")
    args = ap.parse_args()
    try:
        result = measure(args.quick)
    except InputError as e:
        print(e.one_line(), file=sys.stderr)
        sys.exit(e.exit_code)
    publish(result, args.quick)


if __name__ == "__main__":
    main()
