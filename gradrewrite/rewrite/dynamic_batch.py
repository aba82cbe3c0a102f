"""A symbolic batch dimension (dim 0) for captured graphs.

One ``torch.export.Dim`` is shared by every dynamic input: a model's inputs (ids and
attention mask, say) share their batch, and torch must know that to trace them together.
torch.export specialises a size-1 example to the constant 1, so a batch-1 example is
traced at batch 2 (``trace_batch``). A model that fixes its batch anyway (a hard-coded
``reshape(2, -1)``) fails capture with the line that fixed it (``SpecialisationWatch``).
"""
from __future__ import annotations

import logging
import os
import re
import sys
import sysconfig
import traceback
from typing import Sequence

import torch

from ..errors import ConfigError, InputError

MIN_BATCH = 1
MAX_BATCH = 4096          # a bound for torch's range analysis, far above what fits at once
EXAMPLE_BATCH = 2         # the example batch of a ``Bx…`` --input spec (not 1: see above)


def batch_dim() -> torch.export.Dim:
    return torch.export.Dim("batch", min=MIN_BATCH, max=MAX_BATCH)


def dynamic_shapes(flags: Sequence[bool]) -> tuple | None:
    """torch.export ``dynamic_shapes`` for inputs whose dim 0 is dynamic (None: all static)."""
    if not any(flags):
        return None
    dim = batch_dim()
    return tuple({0: dim} if f else None for f in flags)


def trace_batch(examples: Sequence[torch.Tensor], flags: Sequence[bool], source: str) -> tuple[torch.Tensor, ...]:
    """The examples to trace with: every dynamic input at one shared batch of at least 2
    (a batch-1 example is repeated, so saved inputs keep their values)."""
    batches = {int(t.shape[0]) for t, f in zip(examples, flags) if f}
    if len(batches) > 1:
        raise InputError(f"{source}'s inputs have different batch sizes ({', '.join(map(str, sorted(batches)))}) "
                         "but a dynamic batch is one size shared by every input",
                         "give the inputs one batch size, or mark only the batched ones with --input Bx…")
    if batches != {1}:
        return tuple(examples)
    return tuple(torch.cat([t, t]) if f else t for t, f in zip(examples, flags))


def verify_batches(example: int) -> list[int]:
    """The batches an artifact is checked at: the traced one and batch 1 (the size
    models most often get wrong when they specialise)."""
    return [example, 1] if example != 1 else [1, 4]


def refuse(*, backend: str | None = None, train: bool = False, stream_bp: bool = False) -> None:
    """What a dynamic batch cannot go with, refused before the (slow) capture."""
    if backend == "mcu":
        raise ConfigError("--backend mcu plans one static arena for fixed shapes; it takes no dynamic batch",
                          "drop --dynamic-batch (and B from --input) to compile for one batch size")
    if train or stream_bp:
        what = "stream-bp" if stream_bp else "--train"
        raise ConfigError(f"{what} captures a training step for one batch size; it takes no dynamic batch",
                          "drop --dynamic-batch (and B from --input)")


class FixedBatchError(InputError):
    """The model pins its batch size, so torch.export cannot keep it symbolic."""

    HINT = ("drop --dynamic-batch (and B from --input), or size the tensor from the input "
            "(x.reshape(x.shape[0], -1), not x.reshape(2, -1))")

    @classmethod
    def from_export(cls, exc: BaseException, watch: "SpecialisationWatch", source: str) -> "FixedBatchError":
        if watch.value is not None:
            at = f" at {watch.where}" if watch.where else ""
            return cls(f"{source} fixes its batch size to {watch.value}{at}, so it cannot take a dynamic batch",
                       cls.HINT)
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        why = next((ln.lstrip("- ") for ln in lines if ln.startswith("- ")), lines[0] if lines else "")
        return cls(f"torch.export cannot keep the batch of {source} dynamic: {why}", cls.HINT)


# --------------------------------------------------------------------------- specialisation
_SHAPES_LOG = "torch.fx.experimental.symbolic_shapes"
_SKIP = (os.path.dirname(torch.__file__), os.path.dirname(os.path.dirname(__file__)))
_STDLIB = sysconfig.get_paths()["stdlib"]
_PACKAGES = (sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"])
_INTERPRETER_FILE = torch.fx.interpreter.__file__
_CAPTURE_FILE = os.path.join(os.path.dirname(__file__), "capture.py")


class SpecialisationWatch(logging.Handler):
    """Remembers where tracing first fixed a dynamic size to a constant.

    torch logs ``set_replacement s0 = 2`` at the moment a guard pins a symbol; the Python
    stack at that moment holds the model's line that caused it. torch's own error names
    only the symbol, so this is the way to point at the user's code."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.where: str | None = None
        self.value: int | None = None
        self._logger = logging.getLogger(_SHAPES_LOG)

    def emit(self, record: logging.LogRecord) -> None:
        if self.where is not None or not str(record.msg).startswith("set_replacement"):
            return
        args = record.args if isinstance(record.args, tuple) else ()
        # a backed size symbol (s0: the batch is the only one) pinned to an integer
        if len(args) < 2 or not str(args[0]).startswith("s") or not getattr(args[1], "is_Integer", False):
            return
        self.value = int(args[1])
        self.where = _user_frame()

    def __enter__(self) -> "SpecialisationWatch":
        lg = self._logger
        self._saved = (lg.level, lg.propagate, lg.handlers)
        # INFO for this one logger, and only this handler sees it: torch's chatter stays off the console
        lg.setLevel(logging.INFO)
        lg.propagate, lg.handlers = False, [self]
        return self

    def __exit__(self, *exc) -> None:
        lg = self._logger
        level, lg.propagate, lg.handlers = self._saved
        lg.setLevel(level)   # setLevel, not assignment: it clears logging's isEnabledFor cache


def _user_frame() -> str | None:
    """The innermost frame outside torch and gradrewrite: the model's code. A re-traced
    graph (a .pt2) runs in torch.fx's interpreter: then the node it was running."""
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_code.co_filename
        if name == _CAPTURE_FILE:   # back in capture(): the model's frames are all behind
            return None
        node = frame.f_locals.get("n") if name == _INTERPRETER_FILE else None
        if isinstance(node, torch.fx.Node):
            return _describe_node(node)
        stdlib = name.startswith(_STDLIB) and not name.startswith(_PACKAGES)
        if not (name.startswith(_SKIP) or stdlib or name.startswith("<")):
            code = (traceback.FrameSummary(name, frame.f_lineno, frame.f_code.co_name).line or "").strip()
            return f"{name}:{frame.f_lineno}" + (f" ({code})" if code else "")
        frame = frame.f_back
    return None


_TRACE_LINE = re.compile(r'File "([^"]+)", line (\d+), in \S+\n\s*(.*)')


def _describe_node(node: torch.fx.Node) -> str:
    """``aten.view (view) in layer head``, plus the model's source line when the node kept it."""
    from .graph import module_path, op_name

    text = f"{op_name(node)} ({node.name}) in layer {module_path(node) or '<root>'}"
    found = _TRACE_LINE.findall(node.meta.get("stack_trace") or "")
    if found:
        file, line, code = found[-1]
        text += f", {file}:{line}" + (f" ({code.strip()})" if code.strip() else "")
    return text
