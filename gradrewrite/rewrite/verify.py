"""Numerical verification of a graph against a reference on seeded random inputs."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch

from .graph import Graph

Runner = Callable[..., Sequence[torch.Tensor]]


@dataclass
class Verification:
    inputs_compared: int
    outputs: int
    max_abs_error: float
    relative_error: float  # max over outputs of ||got - ref||_2 / ||ref||_2
    max_abs_reference: float
    seed: int

    def as_dict(self) -> dict:
        return asdict(self)

    def within(self, rel_tol: float) -> bool:
        return self.relative_error <= rel_tol


def compare_outputs(got: Sequence[torch.Tensor], ref: Sequence[torch.Tensor]) -> tuple[float, float, float]:
    """(max abs error, relative L2 error, max |ref|) over all outputs."""
    if len(got) != len(ref):
        raise ValueError(f"{len(got)} outputs, reference has {len(ref)}")
    max_abs = rel = ref_max = 0.0
    for g, r in zip(got, ref):
        g = torch.as_tensor(g).detach().double().cpu()
        r = torch.as_tensor(r).detach().double().cpu()
        if g.shape != r.shape:
            raise ValueError(f"output shape {tuple(g.shape)} differs from reference {tuple(r.shape)}")
        if r.numel() == 0:
            continue
        diff = (g - r).abs()
        max_abs = max(max_abs, float(diff.max()))
        ref_max = max(ref_max, float(r.abs().max()))
        denom = float(r.norm())
        rel = max(rel, float(diff.norm()) / denom if denom > 0 else float(diff.norm()))
    return max_abs, rel, ref_max


def verify(run: Runner, reference: Runner, graph: Graph, *, n_inputs: int = 3,
           seed: int = 0, batch: int | None = None) -> Verification:
    """Run ``run`` and ``reference`` on ``n_inputs`` seeded inputs drawn from ``graph``'s
    input specs (``batch``: dim 0 of its dynamic-batch inputs) and report the worst errors."""
    worst = (0.0, 0.0, 0.0)
    n_out = 0
    for i in range(n_inputs):
        inputs = graph.random_inputs(seed + i, batch)
        ref = list(reference(*inputs))
        got = list(run(*inputs))
        n_out = len(ref)
        err = compare_outputs(got, ref)
        worst = tuple(max(a, b) for a, b in zip(worst, err))
    max_abs, rel, ref_max = worst
    if any(math.isnan(v) for v in worst):
        max_abs = rel = float("inf")
    return Verification(n_inputs, n_out, max_abs, rel, ref_max, seed)
