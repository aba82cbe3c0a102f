"""The causal LM the quantization benchmark measures: a Llama-architecture byte-level model
(``transformers`` LlamaForCausalLM: d=512, 6 layers, 8 heads, SwiGLU 1536, RMSNorm,
rotary positions, vocabulary = the 256 byte values) trained here on the Python standard
library's source until its held-out loss flattens.

Training runs once: the weights are cached under ``benchmarks/results/tmp/`` by a hash of
the configuration, the corpus file list and this training recipe, so reruns load them.
Every 10th stdlib file (sorted) is held out; the rest is training text.

    python benchmarks/quant_lm.py          # train (or load) and print held-out perplexity
"""
from __future__ import annotations

import hashlib
import inspect as pyinspect
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import _report  # noqa: E402

CACHE = _report.QUICK   # gitignored
CONFIG = dict(vocab_size=256, hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
              num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512,
              rms_norm_eps=1e-5, tie_word_embeddings=False, rope_theta=10000.0)
SHORT_RECIPE = dict(seq=256, batch=16, lr=2e-3, warmup=100, eval_every=100, eval_windows=64,
              flat_rel=0.02, max_steps=4000, max_seconds=4500, cooldown=0.15, weight_decay=0.05,
              seed=0, autocast="bf16")
# the same with no total time budget: stops when the held-out loss is flat (or at
# max_steps), trained over as many resumable sittings as that takes (--seconds N).
# torch.compile: faster training steps on this CPU, after a compile of a few minutes.
# The benchmark's recipe: SHORT_RECIPE's 4500 s budget stopped it before the loss was flat.
LONG_RECIPE = {**SHORT_RECIPE, "max_steps": 8000, "max_seconds": None, "compile": True}
RECIPE = LONG_RECIPE
# --quick runs of the benchmark: a small model and a short run, cached the same way
QUICK_CONFIG = {**CONFIG, "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 4}
QUICK_RECIPE = {**SHORT_RECIPE, "seq": 128, "batch": 8, "eval_every": 50, "max_steps": 150, "max_seconds": 600}


class Logits(torch.nn.Module):
    """``input_ids -> logits`` (no cache, no dict): the graph the passes capture."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids):
        return self.lm(input_ids=input_ids, use_cache=False, return_dict=True).logits


def stdlib_files(held_out: bool) -> list[Path]:
    lib = Path(pyinspect.getfile(pyinspect)).parent
    files = sorted(p for p in lib.glob("*.py"))
    return [p for i, p in enumerate(files) if (i % 10 == 0) == held_out]


def corpus(held_out: bool) -> torch.Tensor:
    data = b"\n".join(p.read_bytes() for p in stdlib_files(held_out))
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def windows(arr: torch.Tensor, seq: int, n: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(arr) - seq - 1, (n,), generator=gen)
    return torch.stack([arr[s:s + seq] for s in starts])


def build(config: dict = CONFIG, seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**config, attn_implementation="sdpa")
    return Logits(LlamaForCausalLM(cfg))


def cache_key(config: dict = CONFIG, recipe: dict = RECIPE) -> str:
    files = [(p.name, p.stat().st_size) for p in stdlib_files(False)]
    blob = json.dumps([config, recipe, files, sys.version_info[:2]], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@torch.no_grad()
def held_out_loss(model, held: torch.Tensor, batch: int = 16) -> float:
    total, count = 0.0, 0
    for i in range(0, len(held), batch):
        x = held[i:i + batch]
        logits = model(x[:, :-1]).float()
        total += float(F.cross_entropy(logits.reshape(-1, 256), x[:, 1:].reshape(-1), reduction="sum"))
        count += x[:, 1:].numel()
    return total / count


class NotTrainedYet(RuntimeError):
    """Training stopped at this invocation's time limit; its checkpoint resumes it."""


def _paths(key: str) -> tuple[Path, Path, Path]:
    return (CACHE / f"quant_lm_{key}.pt", CACHE / f"quant_lm_{key}.json", CACHE / f"quant_lm_{key}.ckpt.pt")


def trained(verbose: bool = True, quick: bool = False, recipe: dict | None = None,
            session_seconds: float | None = None) -> tuple[torch.nn.Module, dict]:
    """The trained model (eval mode, fp32) and its training record (``quick``: the small one).

    Training resumes from its checkpoint (written at every evaluation) when one exists, so a
    run that needs more time than one sitting takes several: ``session_seconds`` stops this
    invocation after that long (checkpoint written, ``NotTrainedYet`` raised). ``max_seconds``
    in the recipe is a budget over all sittings (None: train until flat or ``max_steps``)."""
    config = QUICK_CONFIG if quick else CONFIG
    r = recipe or (QUICK_RECIPE if quick else RECIPE)
    key = cache_key(config, r)
    weights, record_path, ckpt_path = _paths(key)
    model = build(config, r["seed"])
    if weights.exists() and record_path.exists():
        model.load_state_dict(torch.load(weights, weights_only=True))
        return model.eval(), {**json.loads(record_path.read_text()), "cached": True}
    train, held_arr = corpus(False), corpus(True)
    held = windows(held_arr, r["seq"] + 1, r["eval_windows"], torch.Generator().manual_seed(123))
    gen = torch.Generator().manual_seed(r["seed"])
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": r["weight_decay"]},
                             {"params": rest, "weight_decay": 0.0}], lr=r["lr"], betas=(0.9, 0.95))
    curve, before, step, cool_from = [], 0.0, 0, None
    if ckpt_path.exists():   # our own file, written below: plain tensors and numbers only
        ck = torch.load(ckpt_path, weights_only=True)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        gen.set_state(ck["gen"])
        curve, step, before = json.loads(ck["curve"]), int(ck["step"]), float(ck["seconds"])
        cool_from = None if int(ck["cool_from"]) < 0 else int(ck["cool_from"])
        if verbose:
            print(f"lm: resuming from step {step} ({before:.0f} s trained before)", flush=True)
    t0 = time.perf_counter()

    def lr_at(s: int) -> float:
        if s < r["warmup"]:
            return r["lr"] * (s + 1) / r["warmup"]
        if cool_from is None:
            return r["lr"]
        n_cool = max(1, int(cool_from * r["cooldown"]))
        return r["lr"] * max(0.02, 1 - (s - cool_from) / n_cool)

    def checkpoint():
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(),
                    "curve": json.dumps(curve), "step": step, "seconds": before + time.perf_counter() - t0,
                    "cool_from": -1 if cool_from is None else cool_from}, tmp)
        tmp.replace(ckpt_path)   # a killed run leaves the previous checkpoint whole

    model.train()
    forward = torch.compile(model) if r.get("compile") else model   # shares model's parameters
    while True:
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        x = windows(train, r["seq"] + 1, r["batch"], gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=r["autocast"] == "bf16"):
            logits = forward(x[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, 256), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        elapsed = before + time.perf_counter() - t0
        if cool_from is not None and step >= cool_from + max(1, int(cool_from * r["cooldown"])):
            break
        if step % r["eval_every"] == 0:
            model.eval()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=r["autocast"] == "bf16"):
                h = held_out_loss(model, held)
            model.train()
            curve.append({"step": step, "train_loss": round(loss.item(), 4), "held_out_loss": round(h, 4),
                          "seconds": round(elapsed, 1)})
            if verbose:
                print(f"lm step {step}: train {loss.item():.3f} held-out {h:.3f} "
                      f"(ppl {math.exp(h):.3f}, {elapsed:.0f}s)", flush=True)
            flat = len(curve) >= 3 and (curve[-3]["held_out_loss"] - h) < r["flat_rel"] * curve[-3]["held_out_loss"]
            budget_out = step >= r["max_steps"] or (r["max_seconds"] is not None and elapsed >= r["max_seconds"])
            if cool_from is None and (flat or budget_out):
                cool_from = step   # flattened (or out of budget): linear cool-down, then stop
                if verbose:
                    print(f"lm: held-out loss flat ({'yes' if flat else 'budget'}), cooling down from step {step}",
                          flush=True)
            checkpoint()
            if session_seconds is not None and time.perf_counter() - t0 >= session_seconds:
                raise NotTrainedYet(f"stopped at step {step} after this sitting's {session_seconds:.0f} s; "
                                    f"rerun to resume from {ckpt_path.name}")
    model.eval()
    final = held_out_loss(model, held)
    curve.append({"step": step, "train_loss": round(loss.item(), 4), "held_out_loss": round(final, 4),
                  "seconds": round(before + time.perf_counter() - t0, 1)})
    record = {"key": key, "config": config, "recipe": r, "steps": step, "curve": curve,
              "train_seconds": round(before + time.perf_counter() - t0, 1),
              "held_out_ppl_fp32": round(math.exp(final), 4),
              "parameters": sum(p.numel() for p in model.parameters()),
              "train_tokens": step * r["batch"] * r["seq"]}
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), weights)
    record_path.write_text(json.dumps(record, indent=1))
    ckpt_path.unlink(missing_ok=True)
    return model, {**record, "cached": False}


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description="train (or load) the benchmark's LM and print its record")
    ap.add_argument("--quick", action="store_true", help="the small model of --quick benchmark runs")
    ap.add_argument("--short", action="store_true",
                    help="the older recipe with a total time budget of 4500 s (the default trains until flat)")
    ap.add_argument("--seconds", type=float, default=None,
                    help="stop this sitting after about this long (resumable: rerun to continue)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    try:
        m, rec = trained(quick=args.quick, recipe=SHORT_RECIPE if args.short else None, session_seconds=args.seconds)
    except NotTrainedYet as exc:
        print(f"lm: {exc}")
        raise SystemExit(3)
    print(json.dumps({k: v for k, v in rec.items() if k != "curve"}, indent=1))


if __name__ == "__main__":
    main()
