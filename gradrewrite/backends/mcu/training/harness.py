"""The training harness (``templates/train_main.c``) and its files: one harness for the
host executable and ``train.elf``.

The data set goes to the harness as one file of whole batches (input bytes, then label
bytes, per batch) that it reads one batch per step through (semihosted) stdio, so it
never sits in the device's SRAM; the step count, batch count and learning rate go in a
16-byte config file. The harness streams ``gr: step=I loss=0xBITS`` lines (progress),
closes with its stack/heap numbers, and writes the losses and the trained parameters
to its output file (``decode_train_output``).
"""
from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np

from ....errors import BackendError
from ..packing import pack_inputs

HARNESS = "train_main.c"  # one harness for the host executable and train.elf
HARNESS_DIR = "train"  # not in the project root: the Makefile builds every *.c there with main.c
EXE = "train_host"
DATA, CONFIG, OUT = "train_data.bin", "train_config.bin", "train_out.bin"   # the harness's defaults
CONFIG_MAGIC = b"GRT1"


def write_config(path: Path, steps: int, batches: int, lr: float) -> None:
    path.write_bytes(CONFIG_MAGIC + struct.pack("<iif", steps, batches, lr))


def write_batches(path: Path, facts: dict[str, Any], x: np.ndarray, labels: np.ndarray) -> int:
    """Whole batches of the compiled batch size, in order (a remainder is dropped);
    returns how many. Inputs are packed as for model_run (quantized when the C API
    takes an int8 input)."""
    n = int(facts["input"]["shape"][0])
    batches = len(x) // n
    with open(path, "wb") as f:
        for b in range(batches):
            f.write(pack_inputs([x[b * n:(b + 1) * n]], facts["inputs"][:1]))
            f.write(np.ascontiguousarray(labels[b * n:(b + 1) * n], dtype=facts["labels"]["dtype"]).tobytes())
    return batches


def decode_train_output(facts: dict[str, Any], raw: bytes, steps: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The harness's output: ``steps`` float32 losses, then each trained parameter's
    bytes in its storage dtype (a partially trained one: its trained rows only)."""
    losses = np.frombuffer(raw, np.float32, count=steps).copy() if len(raw) >= 4 * steps else None
    offset, params = 4 * steps, {}
    for p in facts["trained"]:
        shape = [p["rows"], *p["shape"][1:]] if p.get("rows") is not None else p["shape"]
        dtype = np.dtype(p.get("dtype", "float32"))
        n = int(np.prod(shape, dtype=np.int64))
        if losses is None or offset + n * dtype.itemsize > len(raw):
            break
        params[p["path"]] = np.frombuffer(raw, dtype, count=n, offset=offset).reshape(shape).copy()
        offset += n * dtype.itemsize
    if losses is None or offset != len(raw):
        raise BackendError(f"the training harness wrote {len(raw)} bytes, expected {offset}",
                           "this is a code generator bug; report it")
    return losses, params


def step_line(line: str) -> tuple[int, float] | None:
    """(step, loss) from 'gr: step=I loss=0xBITS'."""
    if not line.startswith("gr: step="):
        return None
    try:
        step_item, loss_item = line[4:].split()[:2]
        bits = int(loss_item.removeprefix("loss="), 16)
        return int(step_item.removeprefix("step=")), struct.unpack("<f", struct.pack("<I", bits))[0]
    except ValueError:
        return None


def stack_values(text: str) -> dict[str, int]:
    """The harness's closing 'gr: stack_step=... heap_used=...' numbers, as ``*_bytes``."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith("gr: stack_step="):
            for item in line[4:].split():
                key, _, value = item.partition("=")
                if value.isdigit():
                    values[f"{key}_bytes"] = int(value)
    return values
