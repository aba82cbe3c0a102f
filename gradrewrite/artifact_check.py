"""A built artifact checked against its reference graph: outputs on fresh seeded
inputs (offset from the per-pass checks' seeds), and for a dynamic batch at each batch
verified. Used by the compiler and by ``--backend auto`` for every candidate.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .errors import VerificationError
from .rewrite import dynamic_batch
from .rewrite.graph import Graph
from .rewrite.verify import verify


def verify_artifact(runner, reference: Graph, opts, batch: int | None = None, *,
                    reference_outputs=None) -> dict[str, Any]:
    """The artifact (numpy in/out) against the original graph, on fresh seeded inputs
    (offset from the per-pass checks' seeds); ``batch``: another size of a dynamic batch.
    ``reference_outputs``: the original's outputs recorded earlier (``RecordedOutputs``),
    used instead of running it again next to the artifact."""
    def run(*inputs: torch.Tensor) -> list[torch.Tensor]:
        return [torch.from_numpy(np.asarray(o)) for o in runner(*(t.numpy() for t in inputs))]

    try:
        return verify(run, reference_outputs or reference, reference, n_inputs=opts.verify_inputs,
                      seed=opts.seed + 1000, batch=batch).as_dict()
    except ValueError as exc:
        raise VerificationError(f"artifact outputs do not match the model's: {exc}",
                                "this is a backend bug; use --backend torch") from exc


def verify_other_batches(runner, reference: Graph, opts, first: dict[str, Any]) -> dict[str, Any]:
    """A dynamic-batch artifact checked at each of ``verify_batches``: the worst error
    over all of them, and one row per batch."""
    batches = dynamic_batch.verify_batches(reference.example_batch)
    rows = [{"batch": batches[0], **first}]
    rows += [{"batch": b, **verify_artifact(runner, reference, opts, batch=b)} for b in batches[1:]]
    worst = {k: max(r[k] for r in rows) for k in ("max_abs_error", "relative_error", "max_abs_reference")}
    keep = ("batch", "inputs_compared", "max_abs_error", "relative_error")
    return {**first, **worst, "inputs_compared": sum(r["inputs_compared"] for r in rows),
            "batches": [{k: r[k] for k in keep} for r in rows]}
