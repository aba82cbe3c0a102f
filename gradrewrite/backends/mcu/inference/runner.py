"""Run a built inference project: ``make_runner`` feeds packed input bytes to the host
executable, or to the firmware under QEMU for Cortex-M targets, and decodes the
output bytes (``model.json`` describes both)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ....errors import BackendError
from ..firmware.build import ELF, HOST_EXE, run_host
from ..firmware.qemu import run_firmware
from ..packing import NP_DTYPES, pack_inputs
from ..targets import get_target


def make_runner(project: Path, meta: dict[str, Any], *, target: str | None = None):
    """A runner ``(*arrays) -> [arrays]`` over the built project: the host executable, or
    the firmware under QEMU (``target`` overrides the compiled one, e.g. "host")."""
    target = target or meta.get("target", "host")
    ins, outs = meta["inputs"], meta["outputs"]

    def run(*inputs: np.ndarray) -> list[np.ndarray]:
        if len(inputs) != len(ins):
            raise BackendError(f"the model takes {len(ins)} inputs, got {len(inputs)}",
                               "pass one --input per model input")
        data = pack_inputs(inputs, ins)
        if get_target(target).is_host:
            raw = run_host(project / HOST_EXE, data)
        else:
            raw, _ = run_firmware(project / ELF, data, target)
        expected = sum(o["bytes"] for o in outs)
        if len(raw) != expected:
            raise BackendError(f"the model wrote {len(raw)} output bytes, expected {expected}",
                               "this is a code generator bug; report it")
        result, offset = [], 0
        for o in outs:
            arr = np.frombuffer(raw, dtype=NP_DTYPES[o["dtype"]], count=int(np.prod(o["shape"], dtype=np.int64)),
                                offset=offset).reshape(o["shape"])
            result.append(arr.copy())
            offset += o["bytes"]
        return result

    return run
