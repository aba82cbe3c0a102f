"""What the training lowering modules share: the training handler table (consulted
before the inference ``HANDLERS``), the helper that emits a ``gr_train.c`` kernel call,
and the two parts of a split (partially trained) convolution weight."""
from __future__ import annotations

from typing import Any

import torch

from ...inference.lowering.base import Unsupported, registrar
from ...program import Val
from .buffers import SplitBuf

aten = torch.ops.aten
TRAIN_FILE = "gr_train.c"
TRAIN_HANDLERS: dict[Any, Any] = {}   # ATen (or device-form) target -> handler(train lowerer, node)
train_handles = registrar(TRAIN_HANDLERS)


def emit(lw, kernel: str, code: str, reads: list[Val], writes: list[Val], macs: int = 0) -> None:
    """One ``gr_train.c`` kernel call."""
    lw.emit(kernel, TRAIN_FILE, code, reads, writes, macs)
    lw.kernel_files.add("gr_train.h")


def split_parts(split: SplitBuf, c: dict, cin: int):
    """(first output channel, weight part, first input channel, input channels, groups) per part."""
    dw = c["groups"] > 1
    if dw and not (c["groups"] == cin == split.rows + split.rest.shape[0]):
        raise Unsupported("a partially trained grouped (not depthwise) convolution")
    for oc0, part in ((0, split.trained), (split.rows, split.rest)):
        k = part.shape[0]
        yield oc0, part, (oc0 if dw else 0), (k if dw else cin), (k if dw else 1)
