"""StreamBPTrainer against transformers.Trainer + gradient checkpointing: a fine-tuning run.

The model is the benchmark's trained byte LM (``benchmarks/quant_lm.py``: Llama
architecture, d=512, 6 layers, vocabulary = 256 byte values, trained on the Python
standard library at 256-512 bytes of context; loaded from its cache, trained per its
recipe when the cache is missing). Both runs fine-tune it at a longer context ``T``
(default 1024, twice its trained one) on the same windows of the standard library's
training text, batch 1, AdamW, linear schedule, gradient clipping, fp32, same seed:

- ``Trainer`` with ``gradient_checkpointing=True`` (non-reentrant);
- ``StreamBPTrainer`` (``n_chunks`` chunks per sequence, default 4).

The runs are sequential (one Trainer each, 2 torch threads); per step the wall time and
the process CPU time are recorded by a callback.

What "the same losses to rounding" means is measured, not assumed: AdamW turns rounding
differences in near-zero gradient entries into whole ``lr``-sized steps, so two exact
methods drift apart within a few steps. Checkpointing against plain backprop would not
show it (the recomputed forward is the same arithmetic: bit-identical gradients), so the
noise floor is a third run that differs from the reference by rounding only: Trainer +
checkpointing on **1** torch thread (the same math, other summation orders). Target:
StreamBPTrainer's loss curve is as close to the reference as that run's: max |loss
difference| <= max(1e-3, 2 x the 1-thread run's), factor 2 because two drifting runs
differ by chance.

Runtime: three runs one after the other (each run's minutes are in the published
table); on the shared 2-core machine under load a step at T=1024 takes several seconds,
so a few hundred steps per run (the issue's ask) take hours there: pass ``--steps 300``
on a quiet or larger machine.

    python benchmarks/streambp_trainer.py                      # T=1024, 30 steps each
    python benchmarks/streambp_trainer.py --T 2048 --steps 300
    python benchmarks/streambp_trainer.py --quick              # small model, T=256, 10 steps
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import _report, quant_lm  # noqa: E402
from gradrewrite.errors import InputError  # noqa: E402

TOL = 1e-3
SLACK = 2.0
TARGET = ("StreamBPTrainer's training losses equal Trainer + checkpointing's to rounding: max |diff| <= "
          f"max({TOL:g}, {SLACK:g} x that of the same checkpointing run on 1 thread)")
CONTROL = "checkpoint, 1 thread"
# method -> (trainer, torch threads); the first is the reference, CONTROL the noise floor
RUNS = {"checkpoint": ("checkpoint", 2), CONTROL: ("checkpoint", 1), "stream-bp": ("stream-bp", 2)}


class Windows(torch.utils.data.Dataset):
    """``n`` fixed windows of ``T`` bytes of the training text (labels = ids: the model
    shifts them)."""

    def __init__(self, T: int, n: int, seed: int = 0):
        text = quant_lm.corpus(held_out=False)
        self.ids = quant_lm.windows(text, T, n, torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _timing_callback():
    from transformers import TrainerCallback

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.wall: list[float] = []
            self.cpu: list[float] = []

        def on_step_begin(self, args, state, control, **kw):
            self._w, self._c = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            self.wall.append(time.perf_counter() - self._w)
            self.cpu.append(time.process_time() - self._c)
    return StepTimes()


def run(method: str, T: int, steps: int, lr: float, n_chunks: int, quick: bool, threads: int) -> dict:
    import transformers as tr

    from gradrewrite.training import StreamBPTrainer

    torch.set_num_threads(threads)
    model, record = quant_lm.trained(verbose=True, quick=quick)
    lm = model.lm.train()
    lm.config.use_cache = False
    timer = _timing_callback()
    with tempfile.TemporaryDirectory() as out:
        args = tr.TrainingArguments(
            output_dir=out, per_device_train_batch_size=1, gradient_accumulation_steps=1,
            max_steps=steps, learning_rate=lr, optim="adamw_torch", weight_decay=0.0,
            lr_scheduler_type="linear", warmup_steps=max(1, steps // 20), max_grad_norm=1.0,
            logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", seed=0,
            dataloader_num_workers=0, disable_tqdm=True,
            gradient_checkpointing=method == "checkpoint",
            gradient_checkpointing_kwargs={"use_reentrant": False} if method == "checkpoint" else None)
        data = Windows(T, steps)
        kw = {"n_chunks": n_chunks} if method == "stream-bp" else {}
        cls = StreamBPTrainer if method == "stream-bp" else tr.Trainer
        trainer = cls(model=lm, args=args, train_dataset=data, callbacks=[timer], **kw)
        t0 = time.perf_counter()
        trainer.train()
        total = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    skip = min(2, len(timer.wall) - 1)   # the first steps capture / warm up
    return {"losses": losses, "wall_s": timer.wall, "cpu_s": timer.cpu, "total_s": total, "threads": threads,
            "median_wall_s": statistics.median(timer.wall[skip:]),
            "median_cpu_s": statistics.median(timer.cpu[skip:]),
            "lm_key": record["key"], "lm_cached": record.get("cached", False)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=1024, help="sequence length of the fine-tuning windows")
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--n-chunks", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="the small quick LM, T=256, 10 steps (smoke run)")
    args = ap.parse_args()
    if args.quick:
        args.T, args.steps = 256, 10
    if args.T < 16 or args.steps < 2 or args.n_chunks < 1:
        raise InputError(f"streambp_trainer: T={args.T}, steps={args.steps}, n_chunks={args.n_chunks}",
                         "use --T >= 16, --steps >= 2, --n-chunks >= 1")
    _report.need_plots()
    t_start = time.time()
    runs = {}
    for name, (method, threads) in RUNS.items():
        runs[name] = run(method, args.T, args.steps, args.lr, args.n_chunks, args.quick, threads)
        r = runs[name]
        print(f"{name}: first/last loss {r['losses'][0]:.4f} / {r['losses'][-1]:.4f}, "
              f"median step {r['median_wall_s']:.2f} s wall, {r['median_cpu_s']:.2f} s CPU", flush=True)
    ref = runs["checkpoint"]
    diffs = {name: [abs(a - b) for a, b in zip(ref["losses"], r["losses"])]
             for name, r in runs.items() if name != "checkpoint"}
    floor = max(diffs[CONTROL])
    max_diff = max(diffs["stream-bp"])
    bound = max(TOL, SLACK * floor)
    holds = max_diff <= bound and all(len(d) == args.steps for d in diffs.values())
    print(f"max |loss difference| from checkpointing over {args.steps} steps: stream-bp {max_diff:.2e}, "
          f"{CONTROL} {floor:.2e}; target ({TARGET}): {'holds' if holds else 'missed'}", flush=True)
    rows = [[m, r["threads"], f"{r['losses'][0]:.4f}", f"{r['losses'][-1]:.4f}",
             f"{max(diffs[m]):.2e}" if m in diffs else "", f"{statistics.fmean(diffs[m]):.2e}" if m in diffs else "",
             round(r["median_wall_s"], 2), round(r["median_cpu_s"], 2),
             f"{r['median_cpu_s'] / ref['median_cpu_s']:.3f}" if r["threads"] == ref["threads"] else "",
             round(r["total_s"] / 60, 1)] for m, r in runs.items()]
    image = _plot(runs, diffs, args)
    first_k = min(5, args.steps)
    text = (f"Fine-tuning the trained byte LM of `benchmarks/quant_lm.py` (d=512, 6 layers, vocabulary 256; "
            f"trained at 256 bytes of context, cache key {ref['lm_key']}) at T={args.T} for {args.steps} "
            f"AdamW steps (lr {args.lr:g}, linear schedule, clip 1.0, batch 1, fp32), same seed and windows of "
            "the standard library's training text. The reference is Trainer + gradient checkpointing on 2 torch "
            f"threads; StreamBPTrainer(n_chunks={args.n_chunks}) on 2 threads; the noise floor is the reference "
            "run on 1 thread (the same arithmetic in other summation orders: its loss differences are what "
            "rounding alone does to this training run). Runs one after the other on a shared 2-core machine "
            f"(load average {os.getloadavg()[0]:.1f} at the end); step times are medians after the first two "
            "steps, CPU time is the process's (compared only at equal threads). Loss differences are from the "
            f"reference, step by step; over the first {first_k} steps: stream-bp "
            f"{max(diffs['stream-bp'][:first_k]):.1e}, 1 thread {max(diffs[CONTROL][:first_k]):.1e}. "
            f"Target ({TARGET}): {'holds' if holds else 'missed'} ({max_diff:.2e} against {bound:.2e}).")
    _report.publish("streambp_trainer", {
        "title": "StreamBPTrainer vs Trainer + gradient checkpointing: fine-tuning the byte LM",
        "quick": args.quick, "T": args.T, "steps": args.steps, "lr": args.lr, "n_chunks": args.n_chunks,
        "runs": runs, "max_abs_loss_diff": max_diff, "noise_floor_max_abs_loss_diff": floor,
        "bound": bound, "target": TARGET, "holds": holds,
        "runtime_seconds": round(time.time() - t_start, 1),
        "sections": [{"heading": "Loss curves and step time", "text": text,
                      "columns": ["run", "threads", "first loss", "last loss", "max |diff| vs reference",
                                  "mean |diff|", "median step s (wall)", "median step s (CPU)",
                                  "CPU vs checkpoint", "run minutes"],
                      "rows": rows, "image": image}]}, quick=args.quick)
    print(f"total {time.time() - t_start:.0f}s")


def _plot(runs: dict, diffs: dict[str, list[float]], args) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.6))
    for m, r in runs.items():
        ax.plot(range(1, len(r["losses"]) + 1), r["losses"], label=m,
                lw=1.0, ls={"checkpoint": "-", CONTROL: ":"}.get(m, "--"))
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/byte)")
    ax.set_title(f"byte LM fine-tuning at T={args.T}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    for m, d in diffs.items():
        bx.semilogy(range(1, len(d) + 1), [max(x, 1e-9) for x in d], lw=1.0, label=m,
                    ls=":" if m == CONTROL else "-")
    bx.axhline(TOL, color="k", ls="--", lw=0.8)
    bx.set_xlabel("step")
    bx.set_ylabel("|loss difference| from checkpoint")
    bx.set_title("drift from the reference run")
    bx.legend(fontsize=8)
    bx.grid(alpha=0.3, which="both")
    if args.quick:   # smoke runs stay out of results/
        _report.QUICK.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        fig.savefig(_report.QUICK / "streambp_trainer_quick.png", dpi=100)
        plt.close(fig)
        return "tmp/streambp_trainer_quick.png"
    return _report.save_png(fig, "streambp_trainer")


if __name__ == "__main__":
    from benchmarks.streambp import cli

    cli(main)
