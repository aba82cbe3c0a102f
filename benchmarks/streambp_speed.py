"""StreamBP step time against gradient checkpointing (issue 20's speed target).

Model: Llama-like (transformers), hidden 256, 4 layers, GQA 4/2 heads, MLP 688,
vocabulary 32000, fp32, batch 1, random weights. One step = forward + next-token loss +
backward into ``.grad``:

- plain: ``loss.backward()``;
- checkpoint: HF ``gradient_checkpointing_enable`` (non-reentrant);
- stream-bp/N: ``StreamBP(model, n_chunks=N).backward(ids)``.

Timing: the methods run round-robin in one process (so machine noise hits them alike),
one torch thread; both wall time and the process's CPU time are recorded, medians over
the rounds. On a shared machine the CPU time is the comparison to read: wall time
includes the time other jobs hold the cores.

    python benchmarks/streambp_speed.py              # T = 4096, 8192
    python benchmarks/streambp_speed.py --quick      # T = 1024
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

from benchmarks import _report  # noqa: E402
from gradrewrite.passes.stream_bp import StreamBP, causal_lm_loss  # noqa: E402

VOCAB = 32000
TARGET = "stream-bp step time <= 1.0x gradient checkpointing's at T = 4k-16k"


def llama(T: int):
    import transformers as tr

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = tr.LlamaForCausalLM(tr.LlamaConfig(
            vocab_size=VOCAB, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=T,
            use_cache=False, attn_implementation="sdpa"))
    return model.train()


def step_fn(method: str, T: int, ids: torch.Tensor):
    model = llama(T)
    if method.startswith("stream-bp"):
        sbp = StreamBP(model, n_chunks=int(method.split("/")[1]))
        sbp.plan(ids)

        def step():
            model.zero_grad(set_to_none=True)
            sbp.backward(ids)
        return step
    if method == "checkpoint":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def step():
        model.zero_grad(set_to_none=True)
        causal_lm_loss(model(input_ids=ids).logits, ids).backward()
    return step


def measure(T: int, methods: list[str], rounds: int) -> dict:
    ids = torch.randint(0, VOCAB, (1, T), generator=torch.Generator().manual_seed(0))
    steps = {m: step_fn(m, T, ids) for m in methods}
    for fn in steps.values():  # warm-up (and first-call allocations)
        fn()
    wall: dict[str, list[float]] = {m: [] for m in methods}
    cpu: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(rounds):
        for m, fn in steps.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            cpu[m].append(time.process_time() - c0)
            wall[m].append(time.perf_counter() - w0)
    out = {m: {"wall_s": statistics.median(wall[m]), "cpu_s": statistics.median(cpu[m]),
               "wall_runs": wall[m], "cpu_runs": cpu[m]} for m in methods}
    for m in methods:
        for k in ("wall", "cpu"):
            out[m][f"{k}_vs_checkpoint"] = out[m][f"{k}_s"] / out["checkpoint"][f"{k}_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    lengths = [1024] if args.quick else [4096, 8192]
    methods = ["plain", "checkpoint", "stream-bp/4"]
    t_start = time.time()
    results = {}
    for T in lengths:
        results[T] = measure(T, methods, args.rounds)
        print(T, {m: (round(v["cpu_s"], 2), round(v["cpu_vs_checkpoint"], 3)) for m, v in results[T].items()},
              flush=True)
    holds = {T: r["stream-bp/4"]["cpu_vs_checkpoint"] <= 1.0 for T, r in results.items()}
    rows = [[T, m, round(v["cpu_s"], 2), f"{v['cpu_vs_checkpoint']:.3f}", round(v["wall_s"], 2),
             f"{v['wall_vs_checkpoint']:.3f}"] for T, r in results.items() for m, v in r.items()]
    text = ("Llama-like d=256, 4 layers, GQA 4/2, vocabulary 32000, fp32, batch 1, one torch "
            f"thread, {args.rounds} interleaved rounds (medians). CPU time is the process's "
            "(what the step computed); wall time includes other jobs on the shared machine. "
            "Target (" + TARGET + "), on CPU time: "
            + ", ".join(f"T={T} {'holds' if ok else 'missed'}" for T, ok in holds.items()) + ".")
    image = _plot(results, methods)
    _report.publish("streambp_speed", {
        "title": "StreamBP step time vs gradient checkpointing (vocabulary 32000)",
        "quick": args.quick, "lengths": lengths, "methods": methods, "threads": 1,
        "rounds": args.rounds, "results": {str(T): r for T, r in results.items()},
        "target": TARGET, "holds": {str(T): ok for T, ok in holds.items()},
        "runtime_seconds": round(time.time() - t_start, 1),
        "sections": [{"heading": "Step time", "text": text,
                      "columns": ["T", "method", "CPU s", "CPU vs checkpoint", "wall s", "wall vs checkpoint"],
                      "rows": rows, "image": image}]}, quick=args.quick)


def _plot(results: dict, methods: list[str]) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 3.2))
    lengths = list(results)
    x = np.arange(len(lengths))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        ax.bar(x + (i - (len(methods) - 1) / 2) * width, [results[T][m]["cpu_vs_checkpoint"] for T in lengths],
               width, label=m)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xticks(x, [f"T={T}" for T in lengths])
    ax.set_ylabel("step CPU time / checkpointing's")
    ax.set_title("StreamBP vs checkpointing, vocab 32000 (1 thread)")
    ax.legend(fontsize=8)
    return _report.save_png(fig, "streambp_speed")


if __name__ == "__main__":
    main()
