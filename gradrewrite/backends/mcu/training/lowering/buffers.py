"""The buffer kinds of a training step and the lowered step itself (``TrainProgram``).

Besides the inference kinds (``program.Buf``: arena, const, input):

- ``TrainedBuf``: a trained parameter (or momentum buffer), a non-const array (SRAM)
  the forward reads and the update writes in place;
- ``SplitBuf``: a partially trained parameter, its first rows in SRAM and the rest in
  flash; kernels read the two parts, never the whole;
- ``LabelBuf``: the labels, ``model_train_step``'s second input pointer;
- ``DqBuf`` / ``ScaledS8`` (int8 steps): an int8 activation or weight that int8-aware
  kernels read as integers with their scales, with no float copy.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .....rewrite.graph import Graph
from ...inference.lowering.base import Unsupported
from ...program import Buf, Program, Val


@dataclass(eq=False)
class TrainedBuf(Buf):
    """A trained parameter: a non-const array in weights.c (SRAM), updated in place."""

    path: str = ""
    shape: tuple[int, ...] = ()         # the whole parameter's shape
    rows: int | None = None             # partial channels: only the first rows live here
    frozen_rows: Buf | None = None      # ... and the rest in this const (flash) array
    # int8 steps: the torch parameter = stored value * to_param_scale[row] (int32 biases
    # of int8 layers are stored in units of s_x * s_w); None: stored as the parameter
    to_param_scale: np.ndarray | None = None
    state: bool = False                 # optimizer state (a momentum buffer), not a parameter


@dataclass(eq=False)
class SplitBuf(Buf):
    """A partially trained parameter: its first ``rows`` filters in SRAM (``trained``), the
    rest in flash (``rest``). No kernel reads it whole: each reads the two parts."""

    trained: Val | None = None
    rest: Val | None = None
    rows: int = 0

    def expr(self) -> str:
        raise Unsupported(f"{self.name} is split into trained (SRAM) and frozen (flash) filters; "
                          "this op reads it whole")


@dataclass(eq=False)
class LabelBuf(Buf):
    """The labels: the caller's second pointer of ``model_train_step``."""

    def expr(self) -> str:
        return f"(label_bytes + {self.offset})"


@dataclass
class TrainProgram:
    program: Program             # every step of one training step; outputs = [loss]
    forward_steps: int           # steps[:forward_steps] compute the logits (model_run)
    logits: Val
    trained: list[TrainedBuf]    # in the graph's parameter order
    frozen: list[str] = field(default_factory=list)
    lr: float = 0.0              # the graph's learning rate (model_train_step takes its own)
    int8: bool = False           # an int8 step (QAS integer updates)
    rounding: str = "nearest"    # int8 updates: nearest | stochastic (xorshift32 from seed)
    seed: int = 0
    graph: Graph | None = None   # the graph lowered (an int8 step's device form)


@dataclass(eq=False)
class DqBuf(Buf):
    q: Val | None = None
    scale: float = 1.0
    zp: int = 0

    def expr(self) -> str:
        raise Unsupported(f"{self.name} is an int8 activation read without a float copy")


@dataclass(eq=False)
class MaskedBcast(Buf):
    """``masked_grad(expand(d), bits)`` not yet stored: a per-channel gradient ``d`` (an
    [n, C] view) broadcast over the plane and masked. The convolution backward it feeds
    reads it in channel chunks (``int8.conv_bwd_bcast``); any other reader gets the
    whole tensor made right before it (``TrainLowerer.val``), as the unfused lowering would."""
    d: Val | None = None
    bits: Val | None = None

    def expr(self) -> str:
        raise Unsupported(f"{self.name} is a masked broadcast gradient read without being stored")


@dataclass(eq=False)
class ScaledS8(Buf):
    parts: tuple = ()            # ((first output channel, int8 Val of its filters), ...)
    scale: Buf | None = None     # f32 per output channel (flash)
    channels: int = 0

    def expr(self) -> str:
        raise Unsupported(f"{self.name} is an int8 weight read as float")
