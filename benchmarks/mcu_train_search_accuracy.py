"""The budget search against a hand-written scheme at the same memory: fine-tuning accuracy under QEMU (issue 19).

For three models pretrained on digits 0-5 (benchmarks/mcu_train_transfer.py: scikit-learn
digits upsampled to RESxRES, the same cached pretraining, a fresh seeded 4-way head) and
fine-tuned on the held-out digits 6-9, at SRAM budgets of 64, 128 and 256 KB:

1. the budget search: `fold-bn,quantize(mode=static),sparse-update(budget='BKB'),qas(...)`
   on the int8 step (static int8 calibrated on the 16 pretraining images the transfer
   benchmark uses), its gradient scores from 8 labelled fine-tuning images (real batches
   of the task: `CompileOptions(calibration=[(image, label), ...])`), compiled for
   Cortex-M7 and linked with B + LINK_MARGIN_KB (harness, heap and stack reserves on top
   of the model's planned SRAM), one step measured under QEMU;
2. a hand-written scheme at the same memory: from a fixed family of TTE-style schemes
   (HAND_FAMILY: the biases of the last k layers, the classifier, and the last n 1x1
   convs / linear layers before it at a share r of their output channels), every member
   is planned by the mcu backend's planner (the planner the search uses), and the one
   with the largest planned SRAM within B is compiled, linked and measured likewise;
3. each compiled step fine-tunes under QEMU (`Artifact.train(data.npz, save_weights=...)`)
   on the same seeded image orders (mcu_train_transfer's int8 + QAS rows: batch 1, lr
   LR_SPARSE, 2 epochs of the 6-9 training images), and its accuracy on the 6-9 test
   images is that of the static int8 graph with the saved trained integers
   (mcu_train_transfer.int8_accuracy).

A budget too small for any scheme of the search (a one-line ConfigError naming the
smallest scheme's need) or of the hand family is a row that says so.

    python benchmarks/mcu_train_search_accuracy.py [--quick] [--jobs 2] [--orders N] [--models A,B]
    (--quick: QUICK_STEPS steps, one order, results/tmp, BENCHMARKS.md untouched; --jobs: models
    measured at once, one process each; --models: a subset, the others keep their published rows;
    --from-json FILE: the section again from a run's JSON, nothing measured)
"""
from __future__ import annotations

import argparse
import copy
import os
import re
import sys
import tempfile
import time
import warnings
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import _report  # noqa: E402
from benchmarks import mcu_train_transfer as T  # noqa: E402
from benchmarks.mcu_train_budget import LINK_MARGIN_KB, SEARCH_BUDGETS_KB, _cpu  # noqa: E402

MODELS = ("MobileNetV2-w0.35", "MCUNet-like", "MobileNetV3-small-like")
BUDGETS_KB = SEARCH_BUDGETS_KB   # 64, 128, 256
QAS = T.QAS                      # qas(rounding=stochastic,seed=1)
LR = T.LR_SPARSE                 # 0.01, as the transfer benchmark's int8 + QAS rows
FLASH_KB = T.FLASH_KB            # the emulated board's 4 MB: the budget is on SRAM only
SCORE_IMAGES = 8                 # labelled 6-9 training images the search scores on (its max_calibration_batches)
ORDERS = 1                       # fine-tuning runs per scheme (the transfer benchmark: 3); see estimate_s
QUICK_STEPS = 40
# The hand-written family (TTE-style): a ladder of nested schemes, each training all the
# previous one does and more: (k, n, r) = bias_last=k, the classifier whole, and the last n
# 1x1 convs / linear layers before it (from the output inward; in MobileNetV3-small-like
# these include the SE blocks' 1x1 convs) at the share r of their output channels.
HAND_LADDER = ((2, 0, None), (4, 1, Fraction(1, 8)), (6, 2, Fraction(1, 8)), (8, 2, Fraction(1, 4)),
               (10, 3, Fraction(1, 4)), (12, 4, Fraction(1, 4)), (14, 4, Fraction(1, 2)), (16, 5, Fraction(1, 2)),
               (18, 6, Fraction(1, 2)), (20, 6, Fraction(1)), (22, 7, Fraction(1)), (26, 8, Fraction(1)),
               (30, 10, Fraction(1)), (36, 12, Fraction(1)))

# ------------------------------------------------------------------ the step and its compiles
def int8_step(start: torch.nn.Module, calib: np.ndarray):
    """The int8 training step `gradrewrite.compile(..., train=Train(lr), passes="fold-bn,
    quantize(mode=static),...")` trains (training.prepare: the inference passes with
    outputs=all, trainable int8, the logit headroom, the captured SGD step): built once
    per model here so that the passes after it get labelled calibration batches."""
    import gradrewrite as gr
    from gradrewrite.rewrite.capture import capture
    from gradrewrite.rewrite.pipeline import parse_pipeline
    from gradrewrite.training import capture_sgd_step, int8_step_chains, run_inference_passes

    g = capture(copy.deepcopy(start), (torch.from_numpy(calib[:1]),))
    specs = [int8_step_chains(s) for s in parse_pipeline("fold-bn,quantize(mode=static)")]
    run_inference_passes(g, specs, calibration=[(torch.from_numpy(calib[i:i + 1]),) for i in range(len(calib))])
    return capture_sgd_step(g, gr.Train(lr=LR, logit_headroom=T.HEADROOM))


def labelled(data: dict[str, np.ndarray], n: int = SCORE_IMAGES) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``n`` fine-tuning training images (digits 6-9, labels 0-3) as (image, label) batches."""
    return [(torch.from_numpy(data["ft_x_train"][i:i + 1]), torch.from_numpy(data["ft_y_train"][i:i + 1]))
            for i in range(n)]


def _options(budget_kb: int) -> dict:
    return {"target": T.TARGET, "ram_kb": budget_kb + LINK_MARGIN_KB, "flash_kb": FLASH_KB, "measure": True}


def compile_step(step, passes: str, budget_kb: int, out: Path, calibration=None):
    """One compile of the step for Cortex-M7 (host build bit-exact against the integer
    reference, train.elf linked with the budget + LINK_MARGIN_KB, one step under QEMU)."""
    from gradrewrite.compiler import CompileOptions, compile_graph

    opts = CompileOptions(passes=passes, backend="mcu", verify_inputs=1, latency_runs=0, calibration=calibration,
                          backend_options=_options(budget_kb))
    return compile_graph(step.clone(), out, opts)


def _one_line(exc: Exception) -> str:
    return re.sub(r"^pass '[^']+' \([^)]*\): ", "", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


def measured(art) -> dict:
    plan, mcu = art.report["memory_plan"], art.report["mcu"]
    dev = plan.get("device", {})
    return {"planned_sram_bytes": plan.get("sram_bytes"), "arena_bytes": plan.get("arena_bytes"),
            "trained_bytes": plan.get("trained_weights_bytes"), "elf_model_sram_bytes": dev.get("model_sram_bytes"),
            "measured_sram_bytes": dev.get("sram_measured_bytes"),
            "sram_linked_bytes": mcu["firmware"]["sram_bytes"],
            "instructions_per_step": mcu.get("runtime", {}).get("instructions_per_step"),
            "bit_exact": (mcu.get("int8_check") or {}).get("bit_exact")}


class Planner:
    """The mcu backend's plan of a pruned step (``Backend.plan_memory``: the planner
    ``compile`` gives the search), memoised by the scheme the step was pruned to: a plan
    depends on the step and the scheme only (not on the budget), so a model's three
    searches and its hand-written family plan each scheme once."""

    def __init__(self):
        from gradrewrite.backends.base import get_backend
        from gradrewrite.compiler import typed_backend_options

        self.backend, self.options = get_backend("mcu"), typed_backend_options("mcu", _options(max(BUDGETS_KB)))
        self.plans: dict[str, dict] = {}
        self.planned = 0

    def __call__(self, graph) -> dict:
        key = graph.meta["train_step"]["sparse_update"]["scheme"]
        if key not in self.plans:
            self.plans[key] = self.backend.plan_memory(graph, self.options)
            self.planned += 1
        return dict(self.plans[key])


def scheme_pass(text: str) -> str:
    """A scheme as the search reports it ('bias_last=4 biases=a,b weights=x:1,y:1/2') as pass options."""
    opts = dict(part.split("=", 1) for part in text.split())
    return "sparse-update(" + ",".join(f"{k}={v}" if k == "bias_last" else f"{k}='{v}'" for k, v in opts.items()) + ")"


def search_compile(step, budget_kb: int, data, out: Path, planner: Planner) -> dict:
    """The budget search, `sparse-update(budget=B),qas` on the int8 step scored on labelled
    6-9 images, then the scheme found compiled. The search runs as the compile runs it
    (the same pass, ``qas`` after it, the mcu planner, the same calibration) but with
    ``planner`` memoised across the model's budgets; the compile of the scheme it found
    must plan the same SRAM (checked)."""
    from gradrewrite.compiler import run_pipeline
    from gradrewrite.errors import ConfigError
    from gradrewrite.rewrite.registry import PassContext

    t0, before = time.time(), planner.planned
    g = step.clone()
    try:
        result = run_pipeline(g, f"sparse-update(budget='{budget_kb}KB'),{QAS}", verify=False,
                              ctx=PassContext(calibration=labelled(data), memory_planner=planner))
    except ConfigError as exc:   # a budget below the smallest scheme: one line naming its need
        return {"fits": False, "error": _one_line(exc), "search_seconds": round(time.time() - t0, 1)}
    search_s = time.time() - t0
    su = next(r for r in _pass_reports(result) if r[0] == "sparse-update")[1]
    scheme = scheme_pass(su["scheme"])
    t0 = time.time()
    art = compile_step(step, f"{scheme},{QAS}", budget_kb, out)
    r = {"fits": True, "scheme": scheme, "search_seconds": round(search_s, 1),
         "candidates_planned": len(su["search_trials"]), "plans_computed": planner.planned - before,
         "search_planned_sram_bytes": su["memory"]["sram_bytes"], "score_proxy": su.get("score_proxy"),
         "smallest_sram_bytes": su["search"]["smallest_bytes"], "smallest_scheme": su["search"]["smallest_scheme"],
         "compile_s": round(time.time() - t0, 1), "art": art, **measured(art)}
    if r["planned_sram_bytes"] != r["search_planned_sram_bytes"]:
        raise RuntimeError(f"the compile of {scheme} plans {r['planned_sram_bytes']} B, the search "
                           f"{r['search_planned_sram_bytes']} B")
    return r


def _pass_reports(result) -> list[tuple[str, dict]]:
    """(pass name, report) of each pass run_pipeline ran."""
    return [(r["name"], r.get("report", {})) for r in result.reports()]


# ------------------------------------------------------------------ the hand-written family
def pointwise_from_output(step) -> list:
    """The 1x1 convs (groups 1) and linear layers before the classifier, from the output inward."""
    from gradrewrite.passes.sparse_update import find_layers

    params = step.meta["train_step"]["params"]
    layers = find_layers(step)
    out = [l for l in layers[:-1] if l.groups == 1 and (l.kind == "linear" or
                                                          tuple(params[l.weight]["shape"][2:]) == (1, 1))]
    return layers, out[::-1]


def hand_family(step) -> list[str]:
    """The ladder on this model, smallest first (bias_last capped at the layers with a bias)."""
    layers, pw = pointwise_from_output(step)
    with_bias = sum(1 for l in layers if l.bias)
    schemes = []
    for k, n, r in HAND_LADDER:
        weights = [f"{layers[-1].path}:1"] + [f"{l.path}:{r}" for l in pw[:n]]
        text = f"sparse-update(bias_last={min(k, with_bias)},weights='{','.join(weights)}')"
        if text not in schemes:
            schemes.append(text)
    return schemes


def plan_hand(step, scheme: str, planner: Planner) -> dict:
    """A scheme's planned SRAM by the mcu backend's planner (the step pruned, reordered,
    qas run on it, lowered: the plan the search compares with its budget)."""
    from gradrewrite.compiler import run_pipeline
    from gradrewrite.errors import GradrewriteError

    g = step.clone()
    try:
        run_pipeline(g, f"{scheme},{QAS}", verify=False)
        return {"scheme": scheme, "planned_sram_bytes": planner(g)["sram_bytes"]}
    except GradrewriteError as exc:
        return {"scheme": scheme, "refused": _one_line(exc)}


def pick_hand(step, family: list[str], plans: dict[str, dict], planner: Planner, budget_kb: int) -> dict | None:
    """The ladder's largest member whose planned SRAM fits the budget: a bisection (the
    ladder is nested, so its plans grow along it); ``plans`` keeps every member planned."""
    def fits(i: int) -> bool:
        if family[i] not in plans:
            plans[family[i]] = plan_hand(step, family[i], planner)
        return plans[family[i]].get("planned_sram_bytes", float("inf")) <= budget_kb * 1024

    lo, hi = -1, len(family) - 1          # fits(lo) holds (lo = -1: nothing), the answer is <= hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return plans[family[lo]] if lo >= 0 else None


def hand_compile(step, family: list[str], plans: dict[str, dict], planner: Planner, budget_kb: int,
                 out: Path) -> dict:
    pick = pick_hand(step, family, plans, planner, budget_kb)
    if pick is None:
        least = plans[family[0]].get("planned_sram_bytes")
        return {"fits": False, "error": f"budget {budget_kb} KB is too small for the hand-written family: its "
                                        f"smallest member needs {least / 1024:.1f} KB" if least else
                f"the smallest hand-written scheme is refused: {plans[family[0]].get('refused')}"}
    t0 = time.time()
    try:
        art = compile_step(step, f"{pick['scheme']},{QAS}", budget_kb, out)
    except Exception as exc:  # a refusal at link or check time is the finding: recorded, the rest goes on
        return {"fits": False, "scheme": pick["scheme"], "error": f"{type(exc).__name__}: {_one_line(exc)}"}
    return {"fits": True, "scheme": pick["scheme"], "ladder_step": family.index(pick["scheme"]),
            "compile_s": round(time.time() - t0, 1), "art": art, **measured(art)}


# ------------------------------------------------------------------ fine-tuning
def finetune(art, start, calib, orders, data, tmp: Path) -> dict:
    """Train the compiled step under QEMU on each order; int8 test accuracy on 6-9."""
    from safetensors.torch import load_file

    runs = []
    for i, (xs, ys) in enumerate(orders):
        np.savez(tmp / "ft.npz", x=xs, y=ys)
        t0 = time.time()
        run = art.train(tmp / "ft.npz", steps=len(xs), lr=LR, save_weights=tmp / "w.safetensors")
        train_s = time.time() - t0
        acc, off, _ = T.int8_accuracy(start, calib, load_file(str(tmp / "w.safetensors")),
                                      data["ft_x_test"], data["ft_y_test"])
        if off > 1e-3:
            raise RuntimeError(f"saved int8 weights are {off} off the integers: the int8 graphs differ")
        losses = np.asarray(run.losses, np.float64)
        k = max(1, len(losses) // 10)
        runs.append({"order": i, "accuracy": acc, "loss_first_tenth": float(losses[:k].mean()),
                     "loss_last_tenth": float(losses[-k:].mean()), "train_s": round(train_s, 1)})
    accs = [r["accuracy"] for r in runs]
    return {"runs": runs, "accuracy": float(np.mean(accs)), "accuracy_min": min(accs), "accuracy_max": max(accs),
            "train_s": round(sum(r["train_s"] for r in runs), 1), "steps": len(orders[0][0])}


def run_model(name: str, data, steps: int, n_orders: int, tmp: Path, log) -> dict:
    t0 = time.time()
    pre, cached = T.pretrained(name, data)
    res = {"pretrain_s": round(time.time() - t0, 1), "pretrain_cached": cached,
           "pretrain_accuracy_0_5": T.accuracy(pre, data["pre_x_test"], data["pre_y_test"], 64), "budgets": {}}
    start = T.start_model(name, data)
    calib = T.calibration(data)
    orders = [T.order(data, steps, i) for i in range(n_orders)]
    step = int8_step(start, calib)
    planner = Planner()
    family = hand_family(step)
    plans: dict[str, dict] = {}
    t0 = time.time()
    for end in (family[0], family[-1]):   # the ladder's two ends (its range, for the log and the text)
        plans[end] = plan_hand(step, end, planner)
    res["hand_family_plan_s"] = round(time.time() - t0, 1)
    took = "cached" if cached else f"{res['pretrain_s']} s"
    ends = [plans[family[0]].get("planned_sram_bytes"), plans[family[-1]].get("planned_sram_bytes")]
    log(f"  {name}: pretrained ({took}), {res['pretrain_accuracy_0_5']:.1f} % on 0-5; hand ladder: {len(family)} "
        f"schemes, " + "-".join(f"{e / 1024:.1f}" if e else "refused" for e in ends) + " KB")
    trained: dict[str, dict] = {}   # scheme -> fine-tuning result (a scheme met twice trains once)
    for budget in BUDGETS_KB:
        row = {}
        for kind, fn in (("search", lambda o: search_compile(step, budget, data, o, planner)),
                         ("hand", lambda o: hand_compile(step, family, plans, planner, budget, o))):
            sub = tmp / f"{kind}_{budget}"
            sub.mkdir()
            try:
                r = fn(sub / "art")
            except Exception as exc:  # noqa: BLE001 -- a failure is the row's finding
                r = {"fits": False, "error": f"{type(exc).__name__}: {_one_line(exc)}"}
            art = r.pop("art", None)
            if art is not None:
                if r["scheme"] not in trained:
                    trained[r["scheme"]] = finetune(art, start, calib, orders, data, sub)
                r.update(trained[r["scheme"]])
            row[kind] = r
            res["hand_family"] = [plans.get(f, {"scheme": f, "not_planned": True}) for f in family]
            log(f"  {name} @ {budget} KB {kind}: " + (
                f"{r['accuracy']:.1f} %, measured {r['measured_sram_bytes'] / 1024:.1f} KB "
                f"(planned {r['planned_sram_bytes'] / 1024:.1f}), {(r['instructions_per_step'] or 0) / 1e6:.1f} M "
                f"instr/step, compile {r['compile_s']} s, train {r['train_s']} s: {r['scheme']}"
                if "accuracy" in r else r.get("error", "?")))
        s, h = row["search"], row["hand"]
        if "accuracy" in s and "accuracy" in h:
            row["search_ge_hand"] = s["accuracy"] >= h["accuracy"]
        res["budgets"][budget] = row
    return res


# ------------------------------------------------------------------ runtime estimate
# From the --quick runs on this 2-core machine (beside other work, so in CPU seconds of the
# process, its compilers and QEMU: ~ wall seconds on a quiet machine): per model, "fixed" =
# everything but pretraining and the QEMU fine-tuning (planning the hand ladder's members,
# the three searches, six compiles with their QEMU step, the int8 accuracy of each run),
# "per_step" = QEMU seconds of one fine-tuning step summed over the model's distinct schemes
# (the six compiled, less those met twice); pretraining when not cached.
EST = {"pretrain_s": 60, "eval_s": 4,
       # MobileNetV2-w0.35: its 64 KB search alone took 850 s CPU (every move of its 52 layers
       # planned, each a lowering of the step: at 32x32 nothing stops the walk to the input)
       "fixed_s": {"MobileNetV2-w0.35": 1600, "MCUNet-like": 380, "MobileNetV3-small-like": 360},
       "per_step_s": {"MobileNetV2-w0.35": 0.6, "MCUNet-like": 0.35, "MobileNetV3-small-like": 0.13}}


def estimate_model_s(m: str, steps: int, n_orders: int, cached: bool) -> float:
    return ((0 if cached else EST["pretrain_s"]) + EST["fixed_s"][m] + steps * n_orders * EST["per_step_s"][m]
            + 2 * len(BUDGETS_KB) * (n_orders - 1) * EST["eval_s"])


def estimate_s(models, steps: int, n_orders: int, cached: set[str], jobs: int = 1) -> float:
    """Wall seconds on a quiet machine: each model's estimate, over ``jobs`` processes
    (the slowest model first, each to the process that frees first)."""
    ends = [0.0] * max(1, min(jobs, len(models)))
    for t in sorted((estimate_model_s(m, steps, n_orders, m in cached) for m in models), reverse=True):
        ends[ends.index(min(ends))] += t
    return max(ends)


# ------------------------------------------------------------------ report
def _kb(v) -> object:
    return round(v / 1024, 1) if isinstance(v, (int, float)) else "-"


def _acc(r: dict) -> str:
    if "accuracy" not in r:
        need = re.search(r"needs ([\d.]+ KB)", r.get("error", ""))
        return f"too small: needs {need[1]}" if need else "error: " + r.get("error", "?")[:80]
    return (f"{r['accuracy']:.1f}" if r["accuracy_min"] == r["accuracy_max"]
            else f"{r['accuracy']:.1f} ({r['accuracy_min']:.1f}-{r['accuracy_max']:.1f})")


def _scheme(r: dict) -> str:
    if r.get("scheme"):
        return r["scheme"].replace("sparse-update(", "").rstrip(")") if r["scheme"].startswith("sparse-update(") \
            else r["scheme"]
    need = re.search(r"needs ([\d.]+ KB)", r.get("error", ""))
    return f"too small: the smallest scheme needs {need[1]}" if need else "no: " + r.get("error", "?")[:90]


def publish(results: dict, data, steps: int, n_orders: int, quick: bool, seconds: float, cpu_s: float) -> None:
    rows, held, compared = [], 0, 0
    for name, res in results.items():
        for budget, row in res["budgets"].items():
            s, h = row["search"], row["hand"]
            verdict = "-"
            if "search_ge_hand" in row:
                compared += 1
                held += row["search_ge_hand"]
                verdict = "yes" if row["search_ge_hand"] else "no"
            rows.append([name, budget, _scheme(s), _kb(s.get("measured_sram_bytes")), _acc(s), _scheme(h),
                         _kb(h.get("measured_sram_bytes")), _acc(h), verdict, _kb(s.get("planned_sram_bytes")),
                         _kb(h.get("planned_sram_bytes")),
                         round(s["instructions_per_step"] / 1e6, 1) if s.get("instructions_per_step") else "-",
                         round(h["instructions_per_step"] / 1e6, 1) if h.get("instructions_per_step") else "-",
                         s.get("search_seconds", "-")])
    summary = (f"budget search accuracy >= hand-written scheme at the same budget: holds on {held} of {compared}"
               + (f", missed on {compared - held} of {compared}" if held < compared else "")
               + (f" (rows where both fit: {compared} of {len(rows)})" if compared < len(rows) else ""))
    pre = "; ".join(f"{n} {r['pretrain_accuracy_0_5']:.1f} %" for n, r in results.items())
    ladder = ", ".join(f"({k}, {n}, {r or '-'})" for k, n, r in HAND_LADDER)
    family = ("a ladder of nested TTE-style schemes (each trains all the one before it does, and more; TTE's "
              "heuristic: the biases of the last blocks, a few pointwise convs in part), (k, n, r) = "
              "`bias_last=k` (at most the layers with a bias), the classifier whole, and the last n of the 1x1 "
              "convs and linear layers before it (from the output inward; in MobileNetV3-small-like these include "
              f"the SE blocks' 1x1 convs) at the share r of their output channels: {ladder}; the member taken is "
              "found by bisection along the ladder (its plans grow along it)")
    nfam = "; ".join(f"{n} " + "-".join(f"{p['planned_sram_bytes'] / 1024:.1f}" if "planned_sram_bytes" in p
                                         else "refused" for p in (r["hand_family"][0], r["hand_family"][-1])) + " KB"
                     for n, r in results.items())
    floors = []
    for n, r in results.items():
        rows_ = [row["search"] for row in r["budgets"].values()]
        least = next((x["smallest_sram_bytes"] / 1024 for x in rows_ if "smallest_sram_bytes" in x), None)
        need = next((float(m[1]) for x in rows_ for m in [re.search(r"needs ([\d.]+) KB", x.get("error", ""))] if m),
                    None)
        floors.append(f"{n} {least if least is not None else need:.1f} KB" if (least or need) else f"{n} -")
    stream = "--quick" if quick else f"{T.EPOCHS} epochs of {len(data['ft_y_train'])} images"
    text = (f"scikit-learn digits upsampled to {T.RES}x{T.RES} as in mcu_train_transfer (pretrained in fp32 on "
            f"digits 0-5, the same cached weights; accuracy on 0-5: {pre}; MobileNetV3-small-like: width 0.5, "
            "squeeze-excitation with a hardsigmoid gate in 9 of 11 bottlenecks, hardswish), a fresh 4-way head, "
            f"fine-tuned on digits 6-9 under QEMU (Cortex-M7), batch 1, lr {LR}, {steps} steps ({stream}), "
            f"{n_orders} seeded image order(s) (the transfer benchmark's int8 + QAS rows use 3"
            + ("; one here to keep the run under 25 minutes" if n_orders == 1 else "")
            + f"); accuracy on the {len(data['ft_y_test'])} test images of 6-9 (int8 graph with the saved trained "
            "integers), mean (min-max) over the orders. Search: `sparse-update(budget='BKB'),"
            f"{QAS}` on the int8 step of `fold-bn,quantize(mode=static)` (what `gradrewrite.compile(..., "
            "train=Train(lr))` captures; static int8 calibrated on 16 images of 0-5), run as the compile runs it "
            f"(the mcu backend's planner, qas on each candidate) with its gradient scores on {SCORE_IMAGES} "
            "labelled 6-9 training images (the task's own batches) and the planner's results shared by a model's "
            "three budgets (search s: the later budgets reuse the earlier plans); the scheme found is then "
            "compiled (its compile plans the same SRAM as the search did, checked). Hand: the member of a fixed "
            "family with the largest planned SRAM within B, planned by the same planner. The family: "
            f"{family}; its range (smallest to largest member, planned): {nfam}. Both are compiled for "
            "Cortex-M7 with "
            f"`ram_kb = B + {LINK_MARGIN_KB}` (the budget is the model's planned SRAM: arena + trained arrays + "
            "labels; harness, heap and stack reserves link on top), the host build checked bit for bit against "
            "the integer reference, one step measured under QEMU. Measured = linked SRAM less the unused stack "
            "and heap reserves (the model's planned SRAM plus the harness, C library heap and stack). "
            f"Resolution: {T.RES}x{T.RES}, the transfer benchmark's (its pretrained weights, and 8x8 digits gain "
            "nothing from a larger upsampling); the budgets still bind there: the smallest scheme the search "
            f"plans needs {'; '.join(floors)} (the hand ladder's range is above). A row "
            "whose budget is below the smallest scheme says so. " + summary + ".")
    if quick:
        text += " `--quick`: a smoke run."
    columns = ["model", "budget KB", "scheme found (search)", "search SRAM measured KB", "search accuracy %",
               "hand-written scheme", "hand SRAM measured KB", "hand accuracy %", "search >= hand",
               "search planned KB", "hand planned KB", "search M instr / step", "hand M instr / step", "search s"]
    out = {"title": "Budget search vs a hand-written scheme: fine-tuning accuracy at 64/128/256 KB (mcu, digits)",
           "quick": quick, "resolution": T.RES, "steps": steps, "orders": n_orders, "seconds": round(seconds, 1),
           "cpu_seconds": round(cpu_s, 1),
           "results": results, "summary": summary,
           "sections": [{"heading": "Scheme found, measured SRAM and accuracy, beside a hand-written scheme at "
                                    "the same budget", "text": text, "columns": columns, "rows": rows}]}
    print(_report.md_table(columns, rows))
    for name, res in results.items():
        for budget, row in res["budgets"].items():
            if "search_ge_hand" in row:
                word = "holds" if row["search_ge_hand"] else "missed"
                print(f"{name} @ {budget} KB: search {row['search']['accuracy']:.1f} % vs hand "
                      f"{row['hand']['accuracy']:.1f} %: search >= hand {word}")
    print(summary)
    print(f"{seconds:.0f} s wall, {cpu_s:.0f} s CPU (this process, its compilers and QEMU), "
          f"torch threads {torch.get_num_threads()}, {os.cpu_count()} cores")
    out["sections"][0]["image"] = plot(results, quick)
    _report.publish("mcu_train_search_accuracy", out, quick=quick)


def plot(results: dict, quick: bool) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 3.6), squeeze=False)
    for ax, (name, res) in zip(axes[0], results.items()):
        budgets = list(res["budgets"])
        for j, (kind, label) in enumerate((("search", "budget search"), ("hand", "hand-written"))):
            rs = [res["budgets"][b][kind] for b in budgets]
            vals = np.array([r.get("accuracy", np.nan) for r in rs])
            err = np.array([[v - r.get("accuracy_min", v), r.get("accuracy_max", v) - v] for v, r in zip(vals, rs)]).T
            x = np.arange(len(budgets)) + (j - 0.5) * 0.38
            ax.bar(x, vals, 0.38, yerr=err, capsize=2, label=label)
            for xi, r in zip(x, rs):
                if r.get("measured_sram_bytes"):
                    ax.text(xi, 2, f"{r['measured_sram_bytes'] / 1024:.0f}", ha="center", fontsize=6, rotation=90,
                            color="white")
                elif "accuracy" not in r:
                    ax.text(xi, 2, "does not fit", ha="center", fontsize=6, rotation=90)
        ax.set_xticks(range(len(budgets)), [f"{b} KB" for b in budgets])
        ax.set_ylim(0, 100)
        ax.set_title(name, fontsize=9)
    axes[0][0].set_ylabel("test accuracy on digits 6-9 (%)\n(bar labels: SRAM measured, KB)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("fine-tuning under QEMU: the budget search vs a hand-written scheme at the same SRAM budget",
                 fontsize=9)
    return _report.save_png(fig, "mcu_train_search_accuracy", quick=quick)


def _worker(name: str, steps: int, n_orders: int, t0: float) -> dict:
    """One model's rows (in this process or a pool worker)."""
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    c0 = _cpu()

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:6.0f} s wall, {name} {_cpu() - c0:5.0f} s CPU] {msg}", flush=True)

    with tempfile.TemporaryDirectory(prefix="gr-search-acc-") as tmp:
        res = run_model(name, T.digits(), steps, n_orders, Path(tmp), log)
    res["cpu_seconds"] = round(_cpu() - c0, 1)
    return res


def main(quick: bool, n_orders: int | None, models: list[str], jobs: int) -> None:
    _report.need_plots()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    data = T.digits()
    steps = QUICK_STEPS if quick else T.EPOCHS * len(data["ft_y_train"])
    n_orders = 1 if quick else (n_orders or ORDERS)
    cached = {m for m in models if (_report.QUICK / f"mcu_train_transfer_{m}_{T._cache_key(m, data)}.pt").is_file()}
    print(f"digits {T.RES}x{T.RES}; models {', '.join(models)} "
          f"(pretraining cached: {', '.join(sorted(cached)) or 'none'}); "
          f"budgets {'/'.join(map(str, BUDGETS_KB))} KB; {steps} fine-tuning steps per scheme and order, "
          f"{n_orders} order(s); torch threads {torch.get_num_threads()}, {os.cpu_count()} cores; "
          f"{jobs} process(es); estimated ~{estimate_s(models, steps, n_orders, cached, jobs) / 60:.0f} min "
          "on a quiet 2-core machine",
          flush=True)
    t0, c0 = time.time(), _cpu()

    if jobs > 1 and len(models) > 1:   # one model per process, the slowest first
        from concurrent.futures import ProcessPoolExecutor
        import multiprocessing

        order = sorted(models, key=lambda m: -estimate_model_s(m, steps, n_orders, m in cached))
        with ProcessPoolExecutor(min(jobs, len(models)), mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {m: pool.submit(_worker, m, steps, n_orders, t0) for m in order}
            results = {m: futures[m].result() for m in models}
    else:
        results = {m: _worker(m, steps, n_orders, t0) for m in models}
    previous = _report.RESULTS / "mcu_train_search_accuracy.json"
    if not quick and previous.exists() and set(models) != set(MODELS):   # a model not rerun keeps its rows
        import json

        old = json.loads(previous.read_text())
        if old.get("steps") == steps and old.get("orders") == n_orders:
            kept = {m: r for m, r in old.get("results", {}).items() if m not in results}
            results = {m: results.get(m) or kept[m] for m in MODELS if m in results or m in kept}
            print(f"kept the published rows of {', '.join(sorted(kept)) or 'no other model'}")
    publish(results, data, steps, n_orders, quick, time.time() - t0, _cpu() - c0)


def republish(path: Path) -> None:
    """The section again from a run's JSON (e.g. after a change of its text), quick or not as that run was."""
    import json

    _report.need_plots()
    run = json.loads(Path(path).read_text())
    publish(run["results"], T.digits(), run["steps"], run["orders"], run["quick"], run["seconds"],
            run.get("cpu_seconds", 0.0))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_STEPS} steps, one order, results under results/tmp")
    ap.add_argument("--orders", type=int, default=None, help=f"fine-tuning orders per scheme (default {ORDERS})")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                    help="models measured at once, one process each (default: 2 where there are 2 cores)")
    ap.add_argument("--from-json", type=Path, default=None,
                    help="rebuild the table, text and plot from a results JSON of this script (no measuring)")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ", ".join(MODELS))
    args = ap.parse_args()
    chosen = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(chosen) - set(MODELS))
    if unknown:
        ap.error(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    if args.from_json:
        republish(args.from_json)
    else:
        main(args.quick, args.orders, chosen, max(1, args.jobs))
