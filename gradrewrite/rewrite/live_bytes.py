"""Deterministic peak of live tensor bytes: what a computation holds at once,
independent of the allocator and of other processes (used by compile reports and the
benchmarks, where RSS would be too noisy to compare plans)."""
from __future__ import annotations

import weakref
from typing import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveBytes(TorchDispatchMode):
    """Peak of live tensor storage bytes inside the mode; ``initial`` tensors (weights,
    inputs) already count as live. Storages are keyed by address and released by a
    finalizer, so views and in-place results are not counted twice."""

    def __init__(self, initial: Iterable[torch.Tensor] = ()):
        super().__init__()
        self.live = 0
        self.sizes: dict[int, int] = {}
        for t in initial:
            self._track(t)
        self.peak = self.live

    def _free(self, key: int) -> None:
        self.live -= self.sizes.pop(key, 0)

    def _track(self, t: torch.Tensor) -> None:
        if t.is_meta:
            return
        st = t.untyped_storage()
        key = st.data_ptr()
        if key and key not in self.sizes and st.nbytes():
            self.sizes[key] = st.nbytes()
            self.live += st.nbytes()
            weakref.finalize(st, self._free, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        self.peak = max(self.peak, self.live)
        return out
