"""N:M sparsity: accuracy of one-shot pruning vs sparse training, storage, and speed.

Accuracy. Two small models written here, trained on scikit-learn's bundled digits (8x8
grey images, 10 classes; one fixed stratified 75/25 split, standardised with the training
set's mean/std): an MLP-Mixer (2x2 patches -> 16 tokens, LayerNorm, GELU) and a small CNN
(three 3x3 convs + ReLU + max-pool, no batch norm). Per seed: dense pretraining (Adam,
one-cycle), then ``gr.capture`` and, for every method and N:M ratio, a fine-tune of the
same number of steps with the same optimizer, learning rate schedule and batch order,
then ``nm-finalize`` and test accuracy:

- dense: no sparsity, fine-tuned the same number of steps (the reference);
- one-shot: ``nm-sparsity(mode=oneshot)`` magnitude masks, no fine-tune;
- one-shot + FT: the same masks, fine-tuned with the mask held fixed;
- SR-STE, PGF mask decay (both β decays, ``decay=linear`` and ``decay=exp``, side by
  side), PGF structure decay: ``nm-sparsity(mode=...)`` training rules (dense warm-up 10%
  of the steps, decay / schedule 70%, fixed mask 20%).

Every row names its variant (the mask-decay rows their β decay, and which one is the
pass default), and the run prints, per model and ratio, whether PGF mask decay with the
pass's default decay reaches SR-STE's mean accuracy, and which decay measured better.

The first layer (Mixer patch embedding, 4 pixels per patch; CNN conv1, 1 input
channel) and the classifier head stay dense; the pass's skip list is recorded.

Storage. Bits per weight from the pass report, the ONNX Runtime artifact size
(``gr.compile(..., backend="ort")``: zeros stored densely) and the packed N:M size from
``gradrewrite.rewrite.nm_storage``.

Speed. Not measured here: see the section text.

    python benchmarks/nm_sparsity.py [--seeds 3] [--epochs 30] [--ft-epochs 20] [--quick]
"""
from __future__ import annotations

import argparse
import dataclasses
import gzip
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gradrewrite as gr  # noqa: E402
from benchmarks import _report  # noqa: E402
from gradrewrite.passes.nm_sparsity import NMSparsity  # noqa: E402
from gradrewrite.passes.nm_sparsity.training import NMTrainConfig  # noqa: E402

RATIOS = [(2, 4), (1, 4), (1, 8), (1, 16)]
# The pass's own default β decay (read from the pass, so the labels follow it).
DEFAULT_DECAY = next(f.default for f in dataclasses.fields(NMSparsity) if f.name == "decay")
DECAYS = ("linear", "exp")
# Training variants: benchmark key -> nm-sparsity options (the mode plus what tells it apart).
TRAINING = {"srste": {"mode": "srste"},
            **{f"pgf-mask-{d}": {"mode": "pgf-mask", "decay": d} for d in DECAYS},
            "pgf-structure": {"mode": "pgf-structure"}}
METHODS = ["oneshot", "oneshot+ft", *TRAINING]
PGF_DEFAULT = f"pgf-mask-{DEFAULT_DECAY}"
LABELS = {"dense": "dense (fine-tuned)", "oneshot": "one-shot magnitude",
          "oneshot+ft": "one-shot + masked FT", "srste": "SR-STE",
          **{f"pgf-mask-{d}": f"PGF mask decay, {d} β" + (" (pass default)" if d == DEFAULT_DECAY
                                                          else "") for d in DECAYS},
          "pgf-structure": "PGF structure decay"}
BATCH = 64
PRETRAIN_LR = 3e-3
FT_LR = 1e-3
WARMUP_FRAC, DECAY_FRAC = 0.1, 0.7          # the rest (20%) trains with the final mask fixed


# --------------------------------------------------------------------------- models
class MixerBlock(nn.Module):
    def __init__(self, tokens: int, dim: int, token_hidden: int, channel_hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_fc1 = nn.Linear(tokens, token_hidden)
        self.token_fc2 = nn.Linear(token_hidden, tokens)
        self.norm2 = nn.LayerNorm(dim)
        self.channel_fc1 = nn.Linear(dim, channel_hidden)
        self.channel_fc2 = nn.Linear(channel_hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x).transpose(1, 2)
        x = x + self.token_fc2(F.gelu(self.token_fc1(y))).transpose(1, 2)
        return x + self.channel_fc2(F.gelu(self.channel_fc1(self.norm2(x))))


class Mixer(nn.Module):
    """MLP-Mixer for 1x8x8 inputs: 2x2 patches -> 16 tokens of 4 pixels."""

    def __init__(self, dim: int = 64, depth: int = 2, token_hidden: int = 64,
                 channel_hidden: int = 128, patch: int = 2):
        super().__init__()
        self.patch, self.grid = patch, 8 // patch
        self.embed = nn.Linear(patch * patch, dim)
        self.blocks = nn.Sequential(*[MixerBlock(self.grid ** 2, dim, token_hidden, channel_hidden)
                                      for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, g = self.patch, self.grid   # -1 batch: the captured graph accepts any batch size
        x = x.reshape(-1, g, p, g, p).permute(0, 1, 3, 2, 4).reshape(-1, g * g, p * p)
        x = self.blocks(self.embed(x))
        return self.head(self.norm(x).mean(1))


class CNN(nn.Module):
    """conv(1->32) conv(32->64) pool conv(64->64) pool fc(256->128) head; ReLU, no BN."""

    def __init__(self, c1: int = 32, c2: int = 64, c3: int = 64, hidden: int = 128):
        super().__init__()
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1)
        self.fc = nn.Linear(c3 * 4, hidden)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)
        return self.head(F.relu(self.fc(x.flatten(1))))


MODELS: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "mixer": (Mixer, "embed|head"),   # model factory, layers left dense (exclude globs)
    "cnn": (CNN, "head"),             # conv1 (K=1 input channel) is skipped by the pass itself
}


# --------------------------------------------------------------------------- data
def load_data() -> dict[str, torch.Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.images.astype(np.float32)
    xtr, xte, ytr, yte = train_test_split(x, digits.target, test_size=0.25, random_state=0,
                                          stratify=digits.target)
    mean, std = xtr.mean(), xtr.std()
    return {"xtr": torch.from_numpy((xtr - mean) / std).unsqueeze(1), "ytr": torch.from_numpy(ytr),
            "xte": torch.from_numpy((xte - mean) / std).unsqueeze(1), "yte": torch.from_numpy(yte)}


def batches(data: dict[str, torch.Tensor], steps: int, seed: int):
    """``steps`` shuffled mini-batches; the same seed gives the same order."""
    gen = torch.Generator().manual_seed(seed)
    n, step = len(data["xtr"]), 0
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, BATCH):
            if step == steps:
                return
            idx = perm[i:i + BATCH]
            yield data["xtr"][idx], data["ytr"][idx]
            step += 1


def train(module: nn.Module, data, steps: int, lr: float, seed: int, *, one_cycle: bool = False,
          trainer: Any = None, masks: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None):
    """Adam on every trainable parameter. ``trainer`` (an NMTrainer) follows the
    optimizer's steps; ``masks`` ({name: (param, bool mask)}) are held fixed."""
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    if one_cycle:
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    else:   # cosine to 10% of lr over the fine-tune
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=0.1 * lr)
    if trainer is not None:
        trainer.attach(opt)
    for x, y in batches(data, steps, seed):
        loss = F.cross_entropy(module(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if masks:
            for p, mask in masks.values():
                p.grad.mul_(mask)
        opt.step()
        sched.step()
        if masks:
            with torch.no_grad():
                for p, mask in masks.values():
                    p.mul_(mask)


@torch.no_grad()
def accuracy(module: nn.Module, data) -> float:
    return float((module(data["xte"]).argmax(1) == data["yte"]).float().mean())


# --------------------------------------------------------------------------- one run
def phase_steps(steps: int) -> tuple[int, int]:
    """(warm-up, decay) steps of a ``steps``-step fine-tune."""
    return int(round(WARMUP_FRAC * steps)), max(1, int(round(DECAY_FRAC * steps)))


def nm_spec(n: int, m: int, method: str, exclude: str, steps: int) -> str:
    """The pipeline text of one method (a key of TRAINING, or ``oneshot``)."""
    options = TRAINING.get(method, {"mode": method})
    spec = f"nm-sparsity(n={n},m={m},exclude='{exclude}'"
    spec += "".join(f",{k}={v}" for k, v in options.items())
    if options["mode"] != "oneshot":
        warmup, decay = phase_steps(steps)
        spec += f",warmup_steps={warmup},decay_steps={decay}"
    return spec + ")"


def mean_beta(decay: str, steps: int) -> float:
    """pgf-mask's β averaged over the decay phase of a ``steps``-step fine-tune."""
    warmup, d = phase_steps(steps)
    cfg = NMTrainConfig("pgf-mask", 1, 4, decay=decay, warmup_steps=warmup, decay_steps=d)
    return statistics.mean(cfg.beta(warmup + tau) for tau in range(d))


def layer_density(graph, report: dict[str, Any]) -> tuple[int, int]:
    """(nonzeros, numel) of the sparsified weights, counted in the finalized graph."""
    nz = total = 0
    for layer in report["layers"]:
        w = graph.attr(layer["weight"])
        nz += int((w != 0).sum())
        total += w.numel()
    return nz, total


def weight_density(graph) -> tuple[int, int]:
    """(nonzeros, numel) over every conv/linear weight (>= 2-D), dense layers included."""
    nz = total = 0
    for _, p in graph.gm.named_parameters():
        if p.dim() >= 2:
            nz += int((p != 0).sum())
            total += p.numel()
    return nz, total


def run_method(base, data, method: str, n: int, m: int, exclude: str, steps: int,
               seed: int) -> dict[str, Any]:
    g = base.clone()
    t0 = time.perf_counter()
    out: dict[str, Any] = {}
    if method == "dense":
        for p in g.gm.parameters():
            p.requires_grad_(True)
        train(g.gm, data, steps, FT_LR, seed + 1)
        report = None
    elif method in ("oneshot", "oneshot+ft"):
        report = gr.run_pipeline(g, nm_spec(n, m, "oneshot", exclude, steps)).records[0].report
        if method == "oneshot+ft":
            for p in g.gm.parameters():   # the pass stores new weights as frozen parameters
                p.requires_grad_(True)
            masks = {}
            for layer in report["layers"]:
                p = g.attr(layer["weight"])
                masks[layer["weight"]] = (p, (p != 0).to(p.dtype))
            train(g.gm, data, steps, FT_LR, seed + 1, masks=masks)
    else:   # a training variant
        gr.run_pipeline(g, nm_spec(n, m, method, exclude, steps))
        trainer = g.gm.nm_trainer
        train(g.gm, data, steps, FT_LR, seed + 1, trainer=trainer)
        decay = [h["mask_change_rate"] for h in trainer.history if h["phase"] == "decay"][1:]
        out["mask_change_rate_decay_mean"] = statistics.mean(decay) if decay else None
        out["mask_change_rate_decay_last"] = decay[-1] if decay else None
        out["mask_recomputes"] = len(trainer.history)
        out["final_phase"] = trainer.phase()
        report = gr.run_pipeline(g, "nm-finalize").records[0].report
    out["accuracy"] = accuracy(g.gm, data)
    if report is not None:
        nz, total = layer_density(g, report)
        out["sparsified_density"] = nz / max(1, total)
        out["sparsified_params"] = total
        out["skipped"] = report["skipped"]
        out["bits_per_weight"] = report["totals"]["compressed_bits_per_weight"]
    nz, total = weight_density(g)
    out["weight_density"] = nz / max(1, total)
    out["seconds"] = time.perf_counter() - t0
    out["graph"] = g
    out["report"] = report
    return out


# --------------------------------------------------------------------------- storage
def storage_rows(name: str, dense_graph, oneshot_graphs: dict[str, Any], tmp: Path):
    """ORT artifact sizes (dense vs N:M with stored zeros) and packed N:M sizes."""
    try:
        from gradrewrite.rewrite.nm_storage import pack_nm, packed_bytes, unpack_nm
    except ImportError:
        pack_nm = None

    def ort_size(graph, tag: str) -> tuple[int, int]:
        art = gr.compile(graph, tmp / f"{name}-{tag}", backend="ort", latency_runs=0, force=True)
        files = art.report["artifact"]["files"]
        size = sum(art.report["sizes"][f] for f in files)
        gz = sum(len(gzip.compress((tmp / f"{name}-{tag}" / f).read_bytes(), 9)) for f in files)
        return size, gz

    dense_size, dense_gz = ort_size(dense_graph, "dense")
    rows, records = [], {}
    for ratio, (g, report) in oneshot_graphs.items():
        n, m = map(int, ratio.split(":"))
        size, gz = ort_size(g, ratio.replace(":", "of"))
        dense_layer_bytes = sum(4 * math.prod(layer["shape"]) for layer in report["layers"])
        packed = {}
        if pack_nm is not None:
            for vd in ("fp32", "fp16", "int8"):
                total = 0
                for layer in report["layers"]:
                    w = g.attr(layer["weight"])
                    p = pack_nm(w, n, m, layer["kind"], mask=w != 0, value_dtype=vd)
                    if vd == "fp32":   # packing is lossless for fp32 values
                        assert torch.equal(unpack_nm(p), w.detach()), layer["weight"]
                    total += packed_bytes(p)
                packed[vd] = total
        bits = report["totals"]["compressed_bits_per_weight"]
        records[ratio] = {"bits_per_weight": bits, "ort_bytes": size, "ort_gzip_bytes": gz,
                          "dense_ort_bytes": dense_size, "dense_ort_gzip_bytes": dense_gz,
                          "sparsified_dense_fp32_bytes": dense_layer_bytes, "packed_bytes": packed,
                          "sparsified_params": report["totals"]["sparsified_params"]}
        packed_txt = (f"{packed['fp32'] / 1024:.1f} / {packed['fp16'] / 1024:.1f} / "
                      f"{packed['int8'] / 1024:.1f}" if packed else "nm_storage not available")
        whole = (f"{(size - dense_layer_bytes + packed['fp32']) / 1024:.1f}" if packed else "—")
        rows.append([name, ratio, f"{bits['fp32']:.3g} / {bits['fp16']:.3g} / {bits['int8']:.3g}",
                     f"{dense_size / 1024:.1f}", f"{size / 1024:.1f}",
                     f"{dense_gz / 1024:.1f} → {gz / 1024:.1f}",
                     f"{dense_layer_bytes / 1024:.1f}", packed_txt, whole])
    return rows, records


# --------------------------------------------------------------------------- main
def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt_pct(values: list[float]) -> str:
    mu, sd = mean_std([100 * v for v in values])
    return f"{mu:.1f} ± {sd:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=30, help="dense pretraining epochs")
    ap.add_argument("--ft-epochs", type=int, default=20, help="fine-tuning epochs per method")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: these models are tiny, and more threads only add "
                         "OpenMP contention on a shared machine)")
    ap.add_argument("--quick", action="store_true", help="1 seed, few steps: a smoke test")
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.epochs, args.ft_epochs = 1, 8, 3
    torch.set_num_threads(args.threads)
    data = load_data()
    steps_per_epoch = math.ceil(len(data["xtr"]) / BATCH)
    pre_steps, ft_steps = args.epochs * steps_per_epoch, args.ft_epochs * steps_per_epoch
    print(f"digits: {len(data['xtr'])} train / {len(data['xte'])} test; pretrain {pre_steps} steps, "
          f"fine-tune {ft_steps} steps per method; {args.seeds} seed(s)", flush=True)
    t_start = time.perf_counter()

    ratios = [f"{n}:{m}" for n, m in RATIOS]
    acc: dict[str, dict[str, dict[str, list[float]]]] = {}
    pre_acc: dict[str, list[float]] = {}
    detail: dict[str, dict[str, dict[str, list[dict[str, Any]]]]] = {}
    storage_inputs: dict[str, tuple[Any, dict[str, Any]]] = {}
    skips: dict[str, dict[str, list[dict[str, str]]]] = {}   # the pass's skip list per ratio
    params: dict[str, int] = {}
    for name, (factory, exclude) in MODELS.items():
        acc[name] = {meth: {r: [] for r in ratios} for meth in ["dense", *METHODS]}
        detail[name] = {meth: {r: [] for r in ratios} for meth in METHODS}
        pre_acc[name] = []
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            model = factory()
            params[name] = sum(p.numel() for p in model.parameters())
            t0 = time.perf_counter()
            train(model, data, pre_steps, PRETRAIN_LR, seed, one_cycle=True)
            pre_acc[name].append(accuracy(model.eval(), data))
            base = gr.capture(model.eval(), (data["xte"][:BATCH],), source=f"{name}-seed{seed}")
            print(f"[{name} seed {seed}] dense pretrain: {100 * pre_acc[name][-1]:.1f}% "
                  f"({time.perf_counter() - t0:.1f}s)", flush=True)
            dense = run_method(base, data, "dense", 0, 0, exclude, ft_steps, seed)
            for r in ratios:
                acc[name]["dense"][r].append(dense["accuracy"])
            print(f"[{name} seed {seed}] {'dense':15s} -   : {100 * dense['accuracy']:.1f}% "
                  f"({dense['seconds']:.1f}s)", flush=True)
            if seed == 0:
                storage_inputs[f"{name}:dense"] = (base, {})
            for method in METHODS:
                for (n, m), r in zip(RATIOS, ratios):
                    res = run_method(base, data, method, n, m, exclude, ft_steps, seed)
                    acc[name][method][r].append(res["accuracy"])
                    if seed == 0 and method == "oneshot":
                        storage_inputs[f"{name}:{r}"] = (res["graph"], res["report"])
                    res.pop("graph"), res.pop("report")
                    skips.setdefault(name, {})[r] = res.pop("skipped")
                    detail[name][method][r].append(res)
                    extra = (f", mask flips/update {res['mask_change_rate_decay_mean']:.4f} mean, "
                             f"{res['mask_change_rate_decay_last']:.4f} last"
                             if res.get("mask_change_rate_decay_mean") is not None else "")
                    print(f"[{name} seed {seed}] {method:15s} {r:4s}: {100 * res['accuracy']:.1f}%, "
                          f"density {res['sparsified_density']:.4f} of {res['sparsified_params']} "
                          f"sparsified weights ({res['seconds']:.1f}s{extra})", flush=True)
    train_seconds = time.perf_counter() - t_start

    # ---------------------------------------------------------------- storage
    print("storage: compiling ORT artifacts …", flush=True)
    storage_table, storage_rec = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODELS:
            dense_graph = storage_inputs[f"{name}:dense"][0]
            sparse = {r: storage_inputs[f"{name}:{r}"] for r in ratios}
            rows, rec = storage_rows(name, dense_graph, sparse, Path(tmp))
            storage_table += rows
            storage_rec[name] = rec
    total_seconds = time.perf_counter() - t_start

    # ---------------------------------------------------------------- tables
    acc_rows = []
    for name in MODELS:
        acc_rows.append([name, f"dense pretrained ({params[name]:,} params)"]
                        + [fmt_pct(pre_acc[name])] * len(ratios))
        for meth in ["dense", *METHODS]:
            acc_rows.append([name, LABELS[meth]] + [fmt_pct(acc[name][meth][r]) for r in ratios])

    density_rows = []
    for name in MODELS:
        for r in ratios:
            runs = [d for meth in METHODS for d in detail[name][meth][r]]
            sd = [d["sparsified_density"] for d in runs]
            wd = [d["weight_density"] for d in runs]
            skipped = skips[name][r]
            density_rows.append([
                name, r, f"{runs[0]['sparsified_params']:,}",
                f"{min(sd):.4f}" if min(sd) == max(sd) else f"{min(sd):.4f}–{max(sd):.4f}",
                f"{statistics.mean(wd):.3f}",
                "; ".join(f"{s['path']} ({s['reason']})" for s in skipped) or "none"])

    dyn_rows = []
    for name in MODELS:
        for meth in TRAINING:
            row = [name, LABELS[meth]]
            for r in ratios:
                mean = [d["mask_change_rate_decay_mean"] for d in detail[name][meth][r]
                        if d.get("mask_change_rate_decay_mean") is not None]
                last = [d["mask_change_rate_decay_last"] for d in detail[name][meth][r]
                        if d.get("mask_change_rate_decay_last") is not None]
                row.append(f"{statistics.mean(mean):.4f} / {statistics.mean(last):.4f}"
                           if mean else "—")
            dyn_rows.append(row)

    pgf_rows, pgf_check, better = pgf_vs_srste(acc, ratios)

    diffs = [rec["ort_bytes"] - rec["dense_ort_bytes"] for by_r in storage_rec.values()
             for rec in by_r.values()]
    extra_kib = (f"{min(diffs) / 1024:+.1f}" if min(diffs) == max(diffs)
                 else f"{min(diffs) / 1024:+.1f} to {max(diffs) / 1024:+.1f}")
    png = _plot(acc, ratios, "tmp/nm_sparsity_quick" if args.quick else "nm_sparsity")
    warm, decay = phase_steps(ft_steps)
    betas = {d: mean_beta(d, ft_steps) for d in DECAYS}
    protocol = {
        "dataset": "sklearn load_digits, 8x8, 10 classes; stratified 75/25 split (random_state=0), "
                   "standardised by the training set's mean/std",
        "train_samples": len(data["xtr"]), "test_samples": len(data["xte"]),
        "seeds": args.seeds, "batch": BATCH, "pretrain_steps": pre_steps,
        "pretrain": f"Adam, one-cycle lr max {PRETRAIN_LR}", "finetune_steps": ft_steps,
        "finetune": f"Adam lr {FT_LR}, cosine to {0.1 * FT_LR:g}, same batch order for every method",
        "warmup_steps": warm, "decay_steps": decay, "fixed_mask_steps": ft_steps - warm - decay,
        "exclude": {name: ex for name, (_, ex) in MODELS.items()},
        "quick": args.quick, "threads": args.threads,
        "variants": {meth: {"label": LABELS[meth], "options": TRAINING.get(meth, {})}
                     for meth in ["dense", *METHODS]},
        "pgf_mask_beta": {"linear": "max(0, 1 - tau/D)", "exp": "exp(-tau*ln(1000)/D)",
                          "mean_over_decay": betas},
        "pass_default_decay": DEFAULT_DECAY,
    }
    sections = [
        {"heading": f"Test accuracy on digits (%, mean ± std over {args.seeds} seed"
                    f"{'s' if args.seeds > 1 else ''})",
         "text": f"{len(data['xtr'])} training / {len(data['xte'])} test images (scikit-learn digits, "
                 f"fixed stratified split, standardised). Per seed: dense pretraining ({pre_steps} "
                 f"steps, Adam, one-cycle lr {PRETRAIN_LR:g}), `gr.capture`, then per method and "
                 f"ratio a {ft_steps}-step fine-tune of the captured graph (Adam lr {FT_LR:g}, "
                 f"cosine to {0.1 * FT_LR:g}, batch {BATCH}, the same batch order for every method), "
                 "`nm-finalize`, and test accuracy. *dense (fine-tuned)* gets the same fine-tune "
                 "with no sparsity (its value is repeated in every column); *one-shot magnitude* is "
                 "`nm-sparsity(mode=oneshot)` with no fine-tune; *one-shot + masked FT* fine-tunes "
                 "those masks held fixed. SR-STE (λ = 2e-4) and PGF (mask decay, pass-through "
                 "gradient, once per β decay: *linear* β(τ) = 1 − τ/D and *exp* β(τ) = "
                 "exp(−τ·ln(1000)/D), the forward W·(M + β(1−M)); structure decay: the default "
                 "schedule, e.g. 1:8 → 7:8, 4:8, 2:8, 1:8) train with a dense warm-up of "
                 f"{warm} steps, D = {decay} decay steps and {ft_steps - warm - decay} steps with "
                 f"the final mask fixed. Averaged over the decay steps, β is "
                 f"{betas['linear']:.3f} (linear) and {betas['exp']:.3f} (exp): the linear decay "
                 "keeps the pruned weights at half strength on average and its forward is nearly "
                 "sparse only at the end; the exp decay's β is down to 0.1 a third of the way "
                 f"through. `decay={DEFAULT_DECAY}` is the pass default. The test set has "
                 f"{len(data['xte'])} images: one image is {100 / len(data['xte']):.2f} points.",
         "columns": ["model", "method", *ratios], "rows": acc_rows, "image": png},
        {"heading": "PGF mask decay against SR-STE",
         "text": "Mean test accuracy (%) of the PGF mask-decay rows per β decay and of SR-STE, "
                 "same seeds and batch order. *PGF (default) ≥ SR-STE* compares the means of the "
                 f"pass-default decay (`decay={DEFAULT_DECAY}`) and SR-STE. {better['text']}",
         "columns": ["model", "ratio", *(LABELS[f"pgf-mask-{d}"] for d in DECAYS), "SR-STE",
                     f"PGF ({DEFAULT_DECAY}, default) − SR-STE", "PGF (default) ≥ SR-STE"],
         "rows": pgf_rows},
        {"heading": "Achieved density and layers left dense",
         "text": "Density = nonzero fraction of the sparsified weights, counted in the finalized "
                 "graphs of every sparse run (all methods, all seeds); whole-model density counts "
                 "every conv/linear weight, the dense first layer and head included. The skip list "
                 "is the pass report's (`exclude` for the head and the Mixer's 4-pixel patch "
                 "embedding; the CNN's conv1 has one input channel, fewer than m, so the pass "
                 "skips it itself).",
         "columns": ["model", "ratio", "sparsified weights", "density (sparsified)",
                     "density (all conv/linear)", "left dense (reason)"],
         "rows": density_rows},
        {"heading": "Mask dynamics (training modes)",
         "text": "From `nm_trainer.history`: `mask_change_rate` (fraction of mask bits that "
                 "flipped at a recompute, mean over layers) during the decay phase, where masks are "
                 "recomputed every step: mean over the phase (its first recompute, which compares "
                 "with the dense all-ones mask, left out) / at its last step; mean over seeds. "
                 "pgf-structure's stage changes are included in its mean.",
         "columns": ["model", "method", *ratios], "rows": dyn_rows},
        {"heading": "Storage",
         "text": "Bits per weight of the sparsified layers from the pass report "
                 "(`totals.compressed_bits_per_weight`: n values + n indices of ⌈log2 m⌉ bits per "
                 "group of m, plus a float32 scale per row for int8), for fp32 / fp16 / int8 values "
                 "(dense: 32 / 16 / 8). *ORT artifact* is the file size of `gr.compile(graph, out, "
                 "backend=\"ort\")` for the one-shot-pruned seed-0 model: ONNX stores the pruned "
                 "weights as dense tensors with explicit zeros, so it is the same size as the dense "
                 f"artifact (the {extra_kib} KiB difference is the N:M layer metadata the pass "
                 "attaches; only a general-purpose compressor sees the zeros: the gzip column). "
                 "*Packed* is the sparsified layers packed with `storage.pack_nm` and sized with "
                 "`packed_bytes` (fp32 packing checked lossless with `unpack_nm`); *whole model, "
                 "packed* replaces the sparsified layers' dense fp32 bytes in the ORT artifact by "
                 "their packed fp32 bytes (an estimate of a deployment format that stores them packed; "
                 "the layers left dense stay fp32).",
         "columns": ["model", "ratio", "bits/weight fp32 / fp16 / int8", "ORT dense KiB",
                     "ORT N:M KiB", "gzip'd ORT KiB dense → N:M", "sparsified layers fp32 KiB",
                     "packed KiB fp32 / fp16 / int8", "whole model, packed fp32 KiB"],
         "rows": storage_table},
        {"heading": "Speed",
         "text": "Not measured in this run, and N:M sparsity gives no speed-up on the ONNX Runtime "
                 "artifact: ONNX Runtime has no N:M sparse kernels in either the CPU or the CUDA "
                 "execution provider, so the pruned ORT model (dense tensors with zeros) runs the same "
                 "dense GEMM/conv kernels at dense speed. GPU 2:4 speed-ups are measured with "
                 "`gradrewrite.passes.nm_sparsity.semi_structured` (PyTorch semi-structured sparse "
                 "tensors on sparse tensor cores) on a lent GPU; this machine has no GPU, so no such "
                 "numbers are reported here."},
    ]
    data = {
        "title": "N:M sparsity: accuracy, storage, speed",
        "protocol": protocol,
        "runtime_seconds": {"training": round(train_seconds, 1), "total": round(total_seconds, 1)},
        "pretrain_accuracy": pre_acc,
        "accuracy": acc,
        "accuracy_summary": {name: {meth: {r: dict(zip(("mean", "std"), mean_std(v)))
                                           for r, v in by_r.items()}
                                    for meth, by_r in by_m.items()} for name, by_m in acc.items()},
        "pgf_vs_srste": pgf_check, "better_decay": better,
        "runs": detail, "skipped": skips, "storage": storage_rec, "sections": sections}
    for c in pgf_check:
        print(f"PGF ({DEFAULT_DECAY}, the default decay) >= SR-STE at {c['model']} {c['ratio']}: "
              f"{'holds' if c['holds'] else 'does not hold'} ({c['pgf_default']:.1f} vs "
              f"{c['srste']:.1f})", flush=True)
    print(better["text"], flush=True)
    print(f"total {total_seconds:.0f}s", flush=True)
    _report.publish("nm_sparsity", data, quick=args.quick)


def pgf_vs_srste(acc, ratios) -> tuple[list[list[str]], list[dict[str, Any]], dict[str, Any]]:
    """Table rows, per (model, ratio) checks of "PGF (default decay) >= SR-STE", and which
    β decay measured better (more (model, ratio) cells won, then the higher mean)."""
    def mu(name: str, meth: str, r: str) -> float:
        return mean_std([100 * v for v in acc[name][meth][r]])[0]

    rows, checks = [], []
    wins = {d: 0 for d in DECAYS}
    for name in acc:
        for r in ratios:
            pgf = {d: mu(name, f"pgf-mask-{d}", r) for d in DECAYS}
            sr = mu(name, "srste", r)
            top = max(pgf.values())
            for d in DECAYS:
                wins[d] += pgf[d] == top
            holds = pgf[DEFAULT_DECAY] >= sr
            checks.append({"model": name, "ratio": r, "pgf_default": pgf[DEFAULT_DECAY],
                           "srste": sr, "holds": holds, "pgf": pgf})
            rows.append([name, r, *(fmt_pct(acc[name][f"pgf-mask-{d}"][r]) for d in DECAYS),
                         fmt_pct(acc[name]["srste"][r]), f"{pgf[DEFAULT_DECAY] - sr:+.1f}",
                         "yes" if holds else "no"])
    means = {d: statistics.mean(c["pgf"][d] for c in checks) for d in DECAYS}
    best = max(DECAYS, key=lambda d: (wins[d], means[d]))
    text = (f"Better β decay: {best} (highest mean in {wins[best]} of {len(checks)} model × ratio "
            "cells, ties counted for both; mean over all cells "
            + ", ".join(f"{d} {means[d]:.1f}%" for d in DECAYS) + "); the pass default is "
            f"{DEFAULT_DECAY}" + (" (the same)." if best == DEFAULT_DECAY else " (differs)."))
    return rows, checks, {"decay": best, "wins": wins, "mean": means, "text": text,
                          "is_pass_default": best == DEFAULT_DECAY}


def _plot(acc, ratios, png_name: str) -> str:
    """One column per model; top row all methods, bottom row a zoom on the fine-tuned ones."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(acc)
    fig, axes = plt.subplots(2, len(names), figsize=(5.2 * len(names), 7.2), squeeze=False,
                             height_ratios=[1, 1])
    x = np.arange(len(ratios))
    markers = {"oneshot": "x", "oneshot+ft": "s", "srste": "^", "pgf-mask-linear": "v",
               "pgf-mask-exp": "o", "pgf-structure": "D"}
    colors = dict(zip(METHODS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for col, name in enumerate(names):
        mu, sd = mean_std([100 * v for v in acc[name]["dense"][ratios[0]]])
        for row, methods in enumerate((METHODS, [m for m in METHODS if m != "oneshot"])):
            ax = axes[row, col]
            ax.axhline(mu, color="k", lw=1, label=LABELS["dense"])
            ax.axhspan(mu - sd, mu + sd, color="k", alpha=0.1)
            lows = [mu - sd]
            for i, meth in enumerate(METHODS):
                if meth not in methods:
                    continue
                stats = [mean_std([100 * v for v in acc[name][meth][r]]) for r in ratios]
                lows += [s[0] - s[1] for s in stats]
                ax.errorbar(x + (i - (len(METHODS) - 1) / 2) * 0.04, [s[0] for s in stats], yerr=[s[1] for s in stats],
                            marker=markers[meth], color=colors[meth], capsize=3,
                            label=LABELS[meth])
            ax.set_ylim(max(0, min(lows) - 2), 100.5)
            ax.set_xticks(x, [f"{r}\n(density {int(r.split(':')[0]) / int(r.split(':')[1]):g})"
                              for r in ratios])
            ax.grid(alpha=0.3)
            ax.set_title(f"{name}: digits test accuracy" if row == 0
                         else f"{name}: zoom on the fine-tuned methods")
        axes[1, col].set_xlabel("N:M ratio")
    for row in range(2):
        axes[row, 0].set_ylabel("test accuracy, %\n(mean ± std over seeds)")
    axes[0, -1].legend(fontsize=8, loc="lower left")
    return _report.save_png(fig, png_name)


if __name__ == "__main__":
    main()
