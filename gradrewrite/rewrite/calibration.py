"""Calibration data: user samples for passes that observe real activations.

``PassContext.calibration`` holds an iterable of samples; a sample is a tuple of
tensors (one per model input, in order), a dict keyed by input name, or a single
tensor for a one-input model. ``--calib FILE`` reads a ``.npz`` (arrays are the model
inputs in order, or keyed by input name; the first axis indexes samples) or a ``.pt``
file (``torch.save`` of a tensor, a tuple/list of tensors or a dict, loaded with
``weights_only=True``). Each sample must match the shapes the model was captured with;
an array whose rows are single examples of a batch-1 input is split into batches.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from ..errors import InputError
from .graph import InputSpec


def load_calibration(path: str | Path, inputs: Sequence[InputSpec]) -> list[tuple[torch.Tensor, ...]]:
    """Read ``--calib FILE`` into samples matching ``inputs``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"calibration file {str(path)!r} does not exist", "check the --calib path")
    if path.suffix == ".npz":
        try:
            data = np.load(path, allow_pickle=False)
            arrays = {k: torch.from_numpy(np.ascontiguousarray(data[k])) for k in data.files}
        except Exception as exc:
            raise InputError(f"cannot read {str(path)!r} as .npz: {str(exc).splitlines()[0]}",
                             "save it with numpy.savez (no pickled objects)") from exc
    elif path.suffix in (".pt", ".pth"):
        try:
            obj = torch.load(path, weights_only=True, map_location="cpu")
        except Exception as exc:
            raise InputError(f"cannot read {str(path)!r} with torch.load(weights_only=True): "
                             f"{str(exc).strip().splitlines()[0]}",
                             "save a tensor, a tuple of tensors or a dict of tensors") from exc
        if isinstance(obj, torch.Tensor):
            obj = (obj,)
        if isinstance(obj, dict):
            arrays = dict(obj)
        elif isinstance(obj, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in obj):
            arrays = {f"arr_{i}": t for i, t in enumerate(obj)}
        else:
            raise InputError(f"{str(path)!r} holds {type(obj).__name__}, not tensors",
                             "save a tensor, a tuple of tensors or a dict of tensors")
    else:
        raise InputError(f"calibration file {str(path)!r} must be .npz or .pt",
                         "save the inputs with numpy.savez or torch.save")
    columns = _order(arrays, inputs, path)
    return stack_samples(columns, inputs, str(path))


def _order(arrays: dict[str, torch.Tensor], inputs: Sequence[InputSpec], where: Path) -> list[torch.Tensor]:
    names = [s.name for s in inputs]
    if set(names) <= set(arrays):
        return [arrays[n] for n in names]
    if len(arrays) != len(inputs):
        raise InputError(f"{str(where)!r} holds {len(arrays)} array(s), the model takes "
                         f"{len(inputs)} input(s) ({', '.join(names)})",
                         "store one array per model input, in order or keyed by input name")
    return list(arrays.values())


def stack_samples(columns: Sequence[torch.Tensor], inputs: Sequence[InputSpec],
                  where: str = "calibration data") -> list[tuple[torch.Tensor, ...]]:
    """Per-input arrays whose first axis indexes samples -> a list of input tuples."""
    per_input = []
    for arr, spec in zip(columns, inputs):
        arr = torch.as_tensor(arr)
        shape = tuple(spec.shape)
        if tuple(arr.shape[1:]) == shape:
            chunks = list(arr.unbind(0))
        elif arr.dim() == len(shape) and tuple(arr.shape[1:]) == shape[1:] \
                and arr.shape[0] % shape[0] == 0 and arr.shape[0] > 0:
            chunks = list(arr.split(shape[0]))
        else:
            raise InputError(f"{where}: array for input {spec.name!r} has shape "
                             f"{'x'.join(map(str, arr.shape))}; expected N x "
                             f"{'x'.join(map(str, shape))} (N samples)",
                             "the first axis indexes samples, the rest is the model's input shape")
        per_input.append([_cast(c, spec, where) for c in chunks])
    counts = {len(c) for c in per_input}
    if len(counts) != 1 or 0 in counts:
        raise InputError(f"{where}: the inputs hold different numbers of samples ({sorted(counts)})",
                         "give every input the same number of samples (at least one)")
    return [tuple(c[i] for c in per_input) for i in range(counts.pop())]


def _cast(t: torch.Tensor, spec: InputSpec, where: str) -> torch.Tensor:
    if t.dtype == spec.dtype:
        return t.contiguous()
    if t.dtype.is_floating_point != spec.dtype.is_floating_point:
        raise InputError(f"{where}: input {spec.name!r} is {str(t.dtype).removeprefix('torch.')}, "
                         f"the model takes {str(spec.dtype).removeprefix('torch.')}",
                         "store the samples in the model's input dtype")
    return t.to(spec.dtype).contiguous()


def normalise(samples: Any, inputs: Sequence[InputSpec]) -> list[tuple[torch.Tensor, ...]]:
    """Any accepted form of calibration data -> a list of input tuples (shapes checked)."""
    if samples is None:
        return []
    if isinstance(samples, (str, Path)):
        return load_calibration(samples, inputs)
    if isinstance(samples, torch.Tensor) and len(inputs) == 1:
        return stack_samples([samples], inputs)
    out = []
    for i, item in enumerate(samples if isinstance(samples, Iterable) else [samples]):
        if isinstance(item, (torch.Tensor, np.ndarray)):
            item = (item,)
        if isinstance(item, dict):
            missing = [s.name for s in inputs if s.name not in item]
            if missing:
                raise InputError(f"calibration sample {i} lacks input(s) {', '.join(missing)}",
                                 "key each sample by the model's input names")
            item = tuple(item[s.name] for s in inputs)
        item = tuple(torch.as_tensor(t) for t in item)
        if len(item) != len(inputs):
            raise InputError(f"calibration sample {i} has {len(item)} tensor(s), the model takes "
                             f"{len(inputs)}", "give one tensor per model input")
        for t, spec in zip(item, inputs):
            if tuple(t.shape) != tuple(spec.shape):
                raise InputError(f"calibration sample {i}: input {spec.name!r} has shape "
                                 f"{'x'.join(map(str, t.shape))}, the model was captured with "
                                 f"{'x'.join(map(str, spec.shape))}",
                                 "give samples of the captured shapes")
        out.append(tuple(_cast(t, s, f"calibration sample {i}") for t, s in zip(item, inputs)))
    return out


class ConsoleProgress:
    """``PassContext.progress`` for the CLI: one rich progress bar per task on stderr."""

    def __init__(self, console):
        self.console = console
        self._bar = None
        self._task = None
        self._desc = None

    def __call__(self, description: str, done: int, total: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        if self._bar is None or description != self._desc:
            self.close()
            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=self.console, transient=True)
            self._bar.start()
            self._task = self._bar.add_task(description, total=total)
            self._desc = description
        self._bar.update(self._task, completed=done, total=total)
        if done >= total:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self.console.log(f"{self._desc}: done")
        self._bar, self._desc = None, None


def progress(ctx_progress: Callable[..., Any] | None, description: str, items: Sequence[Any]):
    """Iterate ``items`` reporting ``(description, done, total)`` to the context's hook."""
    total = len(items)
    for i, item in enumerate(items):
        if ctx_progress is not None:
            ctx_progress(description, i, total)
        yield item
    if ctx_progress is not None:
        ctx_progress(description, total, total)


__all__ = ["load_calibration", "normalise", "stack_samples", "ConsoleProgress", "progress"]
