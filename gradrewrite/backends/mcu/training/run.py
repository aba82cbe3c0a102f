"""Run a generated training step over a data set (``gradrewrite run --train``): the host
harness, or ``train.elf`` under QEMU for Cortex-M targets (``harness.py`` has the
files they read and write), with progress per step; the data set and option checks
of ``run --train``; the trained parameters whole, and saving them.
"""
from __future__ import annotations

import math
import os
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ....errors import BackendError, ConfigError, InputError
from ..firmware.build import TRAIN_ELF, check_harness_exit, toolchain_missing
from ..firmware.qemu import by_symbol, qemu_command, run_counting
from ..targets import get_target
from .harness import CONFIG, DATA, EXE, OUT, decode_train_output, stack_values, step_line, write_batches, write_config

IDLE_TIMEOUT_S = 300      # no step finished for this long: the harness hangs
COUNT_TIMEOUT_S = 600
WEIGHT_SUFFIXES = (".safetensors", ".pt")

Progress = Callable[[int, int, float], None]   # (step, steps, loss)


@dataclass
class TrainRun:
    losses: np.ndarray                       # float32, one per step
    params: dict[str, np.ndarray]            # trained parameters as stored (a split one: its trained rows)
    stats: dict[str, Any] = field(default_factory=dict)   # the harness's stack/heap numbers, instructions
    batches: int = 1
    trained_bytes: int = 0                   # SRAM the trained parameters take
    saved: list[str] = field(default_factory=list)  # parameters written by save_weights


# ------------------------------------------------------------------ running
def run_training(project: str | Path, facts: dict[str, Any], x: np.ndarray, labels: np.ndarray, steps: int,
                 lr: float, *, target: str | None = None, progress: Progress | None = None,
                 count_instructions: bool = False) -> TrainRun:
    """``steps`` SGD steps cycling over the batches of (x, labels), on the host
    executable or the target's train.elf under QEMU; ``count_instructions`` (QEMU only)
    also counts the instructions of the first step."""
    project = Path(project).resolve()
    target = target or facts.get("target", "host")
    host = get_target(target).is_host
    image = project / (EXE if host else TRAIN_ELF)
    if not image.is_file():
        raise BackendError(f"{str(project)!r} has no built training harness ({image.name})",
                           "compile the model again with --train --backend mcu")
    if host:
        cmd = [str(image), DATA, CONFIG, OUT]
        where = "training harness (host)"
    else:
        reason = toolchain_missing(target)
        if reason:
            raise BackendError(f"cannot run the training firmware for {target}: {reason}")
        cmd = qemu_command(image, target)
        where = f"{target} training firmware (QEMU)"
    with tempfile.TemporaryDirectory(prefix="gr-train-") as tmp:
        t = Path(tmp)
        batches = write_batches(t / DATA, facts, x, labels)
        write_config(t / CONFIG, steps, batches, lr)
        counter = None
        if count_instructions and not host:
            code, text, counter = run_counting(cmd, tmp, COUNT_TIMEOUT_S)
        else:
            code, text = _run_streaming(cmd, tmp, steps, progress)
        if code == 4:
            raise BackendError(f"model_train_step returned an error in the {where}", "report it with the model")
        check_harness_exit(code, text, where)
        out = t / OUT
        if not out.is_file():
            raise BackendError(f"the {where} exited without writing its output",
                               "semihosting file I/O failed; check the QEMU version (7.2 is known to work)")
        losses, params = decode_train_output(facts, out.read_bytes(), steps)
    stats = stack_values(text)
    reserve = stats.get("stack_reserve_bytes")
    if reserve and stats.get("stack_peak_bytes", 0) >= reserve:
        raise BackendError(f"the training firmware used its whole {reserve}-byte stack reserve: the stack "
                           "overflowed into the heap", "the generated code needs far less stack; report it")
    if counter is not None:
        per_pc, calls = counter
        per_fn = by_symbol(per_pc, project / TRAIN_ELF)
        stats.update(instructions_per_step=sum(per_fn.values()),
                     instructions_per_symbol=dict(sorted(per_fn.items(), key=lambda kv: -kv[1])),
                     instructions_per_call=[{"function": f, "instructions": n} for f, n in calls])
    return TrainRun(losses, params, stats, batches)


def _run_streaming(cmd: list[str], cwd: str, steps: int, progress: Progress | None) -> tuple[int, str]:
    """Run the harness, reporting each step as its line arrives; kill it when no step
    finishes for IDLE_TIMEOUT_S. Returns (exit code, everything it printed)."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace")
    stalled = threading.Event()

    def kill():
        stalled.set()
        proc.kill()

    timer = threading.Timer(IDLE_TIMEOUT_S, kill)
    timer.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            step = step_line(line)
            if step is not None:
                timer.cancel()
                timer = threading.Timer(IDLE_TIMEOUT_S, kill)
                timer.start()
                if progress is not None:
                    progress(step[0], steps, step[1])
        code = proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if stalled.is_set():
        raise BackendError(f"the training harness finished no step for {IDLE_TIMEOUT_S} s and was stopped",
                           "the model may be too big to emulate in time; check it on the host target first")
    return code, "".join(lines)


# ------------------------------------------------------------------ data set checks
def load_dataset(path: str | Path, facts: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) from an .npz with keys ``x`` and ``y``, checked against the compiled step."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"training data {str(path)!r} does not exist", "pass an .npz with arrays x and y")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise InputError(f"cannot read {str(path)!r} as .npz: {str(exc).splitlines()[0] if str(exc) else exc}",
                         "save it with numpy.savez(path, x=inputs, y=labels)") from exc
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise InputError(f"{str(path)!r} is a single .npy array, not an .npz with x and y",
                         "save it with numpy.savez(path, x=inputs, y=labels)")
    missing = [k for k in ("x", "y") if k not in data.files]
    if missing:
        raise InputError(f"{str(path)!r} has no array {' or '.join(map(repr, missing))} (it has: "
                         f"{', '.join(data.files) or 'nothing'})",
                         "save it with numpy.savez(path, x=inputs, y=labels)")
    x, y = data["x"], data["y"]
    in_shape, lab = list(facts["input"]["shape"]), facts["labels"]
    batch = in_shape[0]
    if list(x.shape[1:]) != in_shape[1:]:
        raise InputError(f"x holds samples of shape {tuple(x.shape[1:])}, the step was compiled for "
                         f"{tuple(in_shape[1:])}", f"x must be shaped (N, {', '.join(map(str, in_shape[1:]))})")
    if list(y.shape[1:]) != list(lab["shape"][1:]) or len(y) != len(x):
        raise InputError(f"y is shaped {tuple(y.shape)} for {len(x)} samples of x",
                         f"y must hold one label per sample: shape ({len(x)}, "
                         f"{', '.join(map(str, lab['shape'][1:]))})".replace(", )", ",)"))
    if len(x) < batch:
        raise InputError(f"{str(path)!r} holds {len(x)} samples, fewer than one batch of {batch}",
                         f"the step was compiled for batches of {batch}; give at least {batch} samples")
    want_x = np.dtype(facts["input"]["dtype"])
    quantized = bool(facts["inputs"][0].get("quantize"))   # a float input the C API takes as int8
    if x.dtype.kind not in "fiu" or (want_x.kind in "iu" and x.dtype.kind == "f" and not quantized):
        raise InputError(f"x is {x.dtype}, the step takes {want_x} inputs", f"save x as {want_x}")
    if y.dtype.kind not in "iu":
        raise InputError(f"y is {y.dtype}; labels must be integer class ids", "save y as int64")
    classes = int(facts["outputs"][0]["shape"][-1])
    if y.size and (y.min() < 0 or y.max() >= classes):
        raise InputError(f"y holds labels {int(y.min())}..{int(y.max())}, the model has {classes} classes",
                         f"labels must be class ids in 0..{classes - 1}")
    return x, y


def check_run_options(steps: int, lr: float, save_weights: str | None) -> None:
    if steps < 1:
        raise ConfigError(f"--steps {steps} must be at least 1", "e.g. --steps 20")
    if not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"--lr {lr} must be a positive number", "e.g. --lr 0.05")
    if save_weights is not None and not str(save_weights).endswith(WEIGHT_SUFFIXES):
        raise ConfigError(f"--save-weights {save_weights!r} must end in .safetensors or .pt",
                          "e.g. --save-weights trained.safetensors")
    if save_weights is not None and not Path(save_weights).resolve().parent.is_dir():
        raise ConfigError(f"the folder of --save-weights {save_weights!r} does not exist", "create it first")


# ------------------------------------------------------------------ results
def whole_parameters(project: str | Path, facts: dict[str, Any], params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every trained parameter whole, as float32 torch-side values: its trained rows
    then the frozen (flash) rows of a split one, times ``to_param_scale`` per row when
    the parameter is stored as integers."""
    rows_file = Path(project) / "train" / "frozen_rows.npz"
    frozen_rows = dict(np.load(rows_file)) if rows_file.is_file() else {}
    whole = {}
    for p in facts["trained"]:
        value = params[p["path"]].astype(np.float64).reshape(-1)
        if p["path"] in frozen_rows:
            value = np.concatenate([value, frozen_rows[p["path"]].astype(np.float64).reshape(-1)])
        elif p.get("optimizer_state") and p.get("rows") is not None:  # momentum of untrained rows: zero
            value = np.concatenate([value, np.zeros(int(np.prod(p["shape"])) - value.size)])
        value = value.reshape(p["shape"])
        if p.get("to_param_scale") is not None:
            scale = np.asarray(p["to_param_scale"], np.float64)
            value = value * scale.reshape((-1,) + (1,) * (value.ndim - 1))
        whole[p["path"]] = value.astype(np.float32)
    return whole


def save_weights(path: str | Path, weights: dict[str, np.ndarray]) -> None:
    """``.safetensors`` or ``.pt`` (torch.save of a dict of tensors), written atomically."""
    import torch

    path = Path(path)
    tensors = {name: torch.from_numpy(np.ascontiguousarray(v)) for name, v in weights.items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    os.close(fd)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file
            save_file(tensors, tmp)
        else:
            torch.save(tensors, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
