"""The C API's packed bytes: ``model_run``'s inputs, one array after another in each
input's dtype, and the numpy dtypes of the outputs it writes.

A float input whose only readers quantize it to int8 is taken as int8 by the C API
(model.json ``inputs[i].quantize``); ``pack_inputs`` quantizes float arrays for it on
the host, as torch does. Inference runners and the training harness's data file
(``training/harness.py``) pack inputs the same way.
"""
from __future__ import annotations

from typing import Any

import numpy as np

NP_DTYPES = {"float32": np.float32, "int8": np.int8, "int32": np.int32, "int64": np.int64, "uint8": np.uint8}


def quantize_input(x: np.ndarray, quant: dict[str, Any]) -> np.ndarray:
    """A float input as the int8 tensor the C API takes: torch's own int8
    ``quantize_per_tensor`` (the node the code generator took out of the program)."""
    import torch
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers the op)

    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return torch.ops.quantized_decomposed.quantize_per_tensor(
        t, float(quant["scale"]), int(quant["zero_point"]), -128, 127, torch.int8).numpy()


def pack_inputs(inputs, specs: list[dict[str, Any]]) -> bytes:
    """The packed input bytes of ``model_run``: each array in its spec's dtype; an input
    the C API takes quantized (spec "quantize") is quantized here unless already int8."""
    parts = []
    for x, spec in zip(inputs, specs):
        x = np.asarray(x)
        q = spec.get("quantize")
        if q and x.dtype != np.int8:
            x = quantize_input(x, q)
        parts.append(np.ascontiguousarray(x, dtype=NP_DTYPES[spec["dtype"]]).tobytes())
    return b"".join(parts)
