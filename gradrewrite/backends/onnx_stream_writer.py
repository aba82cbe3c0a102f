"""Write an ONNX model with its weights as external data, streamed tensor by tensor.

``onnx_ir`` (what ``ONNXProgram.save`` uses) takes each tensor's ``tobytes()``: a private
copy of the tensor (for an LLM's embedding table, half a gigabyte) on top of the
weights themselves. Here each initializer's bytes go to ``<model>.data`` straight from
the tensor's own memory (``numpy`` view -> ``memoryview``, no copy), the initializer is
replaced by an ``ExternalTensor`` reference, and the graph proto, weightless, is saved
last. Large tensors start at page-aligned offsets (ONNX Runtime can map them).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

ALIGNMENT = 4096
SMALL_BYTES = 1024   # tensors under this stay inside the proto


def save_with_external_data(model, path: Path, *, on_written=None) -> dict[str, Any]:
    """Save ``model`` (an ``onnx_ir.Model``) at ``path`` with its initializers in
    ``path.name + ".data"``; ``on_written(name)`` after each tensor. Returns counts."""
    import onnx_ir as ir

    data_name = path.name + ".data"
    written = kept = 0
    with open(path.parent / data_name, "wb") as f:
        for value in list(model.graph.initializers.values()):
            tensor = value.const_value
            if tensor is None or isinstance(tensor, ir.ExternalTensor) or tensor.nbytes < SMALL_BYTES:
                kept += 1
                continue
            array = np.ascontiguousarray(tensor.numpy())
            raw = memoryview(array).cast("B") if array.dtype != object else tensor.tobytes()
            if len(raw) != tensor.nbytes:   # sub-byte or odd dtypes: the tensor's own encoding
                raw = tensor.tobytes()
            offset = f.tell()
            if len(raw) >= ALIGNMENT and offset % ALIGNMENT:
                f.write(b"\0" * (ALIGNMENT - offset % ALIGNMENT))
                offset = f.tell()
            f.write(raw)
            value.const_value = ir.ExternalTensor(data_name, offset, len(raw), tensor.dtype, shape=tensor.shape,
                                                  name=tensor.name or value.name, base_dir=path.parent)
            written += 1
            del array, raw
            if on_written is not None:
                on_written(value.name)
    ir.save(model, str(path))
    return {"external_tensors": written, "tensors_in_proto": kept}
