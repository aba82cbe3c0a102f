"""Padding-aware calibration statistics for weight-only quantization.

Calibration batches of text are padded to one length; the padded positions still run
through every linear layer but never reach the output that matters (attention masks
them out, pooling and losses skip them). Their activations are not the model's
distribution, yet a plain ``X^T X`` counts them like real tokens and they pull the
Hessians and channel statistics away from what the real tokens need (benchmarks/
quantization.py measures the difference on MiniLM).

``padding_mask=auto`` takes the model input named ``attention_mask`` (or ending in
``_mask`` / ``mask``) when it is a 2-D 0/1 tensor ``[batch, tokens]``; ``off`` keeps every
row; any other value names the input. Rows of a layer input ``[batch, tokens, K]`` (or
``[batch*tokens, K]``) whose mask is 0 are left out of the Hessians (GPTQ), the channel
statistics (AWQ, the hessian outlier criterion) and the error report. Inputs of any
other shape (after pooling, say) keep all their rows.
"""
from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch

from ...errors import ConfigError
from ...rewrite.graph import Graph

AUTO_NAMES = ("attention_mask", "padding_mask", "mask")


def resolve(graph: Graph, option: str) -> tuple[int | None, str]:
    """The index of the padding-mask input (or None) and why, for the report."""
    names = [s.name for s in graph.inputs]
    if option == "off":
        return None, "padding_mask=off: every calibration row counts"
    if option != "auto":
        if option not in names:
            raise ConfigError(f"padding_mask={option!r} is not a model input",
                              f"use auto, off or one of: {', '.join(names)}")
        spec = graph.inputs[names.index(option)]
        if len(spec.shape) != 2:
            raise ConfigError(f"padding_mask input {option!r} has shape {list(spec.shape)}, not "
                              "[batch, tokens]", "name a 2-D 0/1 mask input, or use padding_mask=off")
        return names.index(option), f"input {option!r} (chosen by padding_mask)"
    for i, spec in enumerate(graph.inputs):
        low = spec.name.lower()
        if len(spec.shape) == 2 and len(graph.inputs) > 1 and \
                any(low == n or low.endswith("_" + n) for n in AUTO_NAMES):
            return i, f"input {spec.name!r} (padding_mask=auto: a 2-D input named like a mask)"
    return None, "no input named like a padding mask: every calibration row counts"


class PaddingRows:
    """Tracks the mask of the sample being run and keeps the real-token rows of a value."""

    def __init__(self, index: int | None):
        self.index = index
        self.current: torch.Tensor | None = None
        self.kept = 0
        self.seen = 0

    def track(self, samples: Sequence[tuple]) -> "_Tracked":
        return _Tracked(self, samples)

    def _bind(self, sample: tuple) -> None:
        if self.index is None:
            return
        m = sample[self.index]
        ok = isinstance(m, torch.Tensor) and m.dim() == 2 and bool(((m == 0) | (m == 1)).all())
        self.current = (m != 0) if ok else None

    def rows(self, v: torch.Tensor) -> torch.Tensor:
        """``v`` as [rows, K] with the padded positions' rows removed where shapes line up."""
        flat = v.reshape(-1, v.shape[-1])
        m = self.current
        if m is not None and m.numel() and not bool(m.all()):
            if v.dim() >= 3 and tuple(v.shape[:2]) == tuple(m.shape):
                flat = v[m].reshape(-1, v.shape[-1])
            elif v.dim() == 2 and v.shape[0] == m.numel():
                flat = v[m.reshape(-1)]
        self.seen += v.numel() // max(1, v.shape[-1])
        self.kept += flat.shape[0]
        return flat

    def summary(self, reason: str) -> dict[str, Any]:
        out: dict[str, Any] = {"input_used": None if self.index is None else reason, "reason": reason}
        if self.seen:
            out["rows_kept_fraction"] = round(self.kept / self.seen, 4)
        return out


class _Tracked(Sequence):
    """The samples, binding each one's mask as it is iterated (``len`` for progress bars)."""

    def __init__(self, owner: PaddingRows, samples: Sequence[tuple]):
        self.owner, self.samples = owner, samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]

    def __iter__(self) -> Iterator[tuple]:
        for s in self.samples:
            self.owner._bind(s)
            yield s
        self.owner.current = None


__all__ = ["resolve", "PaddingRows", "AUTO_NAMES"]
