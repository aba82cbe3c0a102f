"""The reference an mcu artifact is checked against (``gradrewrite run OUT --compare``).

At compile time the backend saves the rewritten graph next to the C project
(``save_reference`` -> ``mcu/reference.pt2``, a torch.export archive, i.e. what the
torch backend would run). ``compare`` reruns it on the same inputs and checks the
device's outputs:

- graphs with int8 layers (static QDQ): against ``int8.integer_reference`` (every
  int8 conv/linear chain in integer arithmetic, the rest as the torch graph), and
  they must be **bit-exact** — unless fp32 kernels whose libm rounding differs from
  torch's (softmax, gelu, layer norm: listed in model.json's ``int8_check``) sit
  between the int8 layers; then within ``INT8_REL_TOL``, as compile checks;
- fp32 graphs: against the torch graph, within fp32 rounding (relative L2 error
  ``<= FP32_REL_TOL``, the same measure ``gradrewrite compile`` verifies with).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ....errors import BackendError, VerificationError
from ....rewrite.graph import Graph
from ....rewrite.verify import compare_outputs
from ...base import reexport

REFERENCE = "reference.pt2"
FP32_REL_TOL = 1e-4
INT8_REL_TOL = 0.05  # int8 graphs with inexact fp32 kernels (softmax, gelu, ...) in between: as compile checks


def save_reference(graph: Graph, project_dir: str | Path) -> str:
    """Save the rewritten graph as ``project_dir/reference.pt2``; returns the file name."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (int8 graphs: registers the QDQ ops)

    torch.export.save(reexport(graph), str(Path(project_dir) / REFERENCE))
    return REFERENCE


def load_reference(project_dir: str | Path) -> Graph:
    from ....rewrite.capture import load_model

    path = Path(project_dir) / REFERENCE
    if not path.is_file():
        raise BackendError(f"{str(path)!r} is missing: this mcu artifact has no reference to compare with",
                           "compile it again with this version of gradrewrite")
    return load_model(path)


def reference_outputs(graph: Graph, inputs: Sequence[np.ndarray]) -> tuple[list[np.ndarray], bool]:
    """(reference outputs, whether the int8 integer reference was used)."""
    from ....rewrite import int8_layers as int8

    tensors = [torch.from_numpy(np.array(x)) for x in inputs]  # a writable copy
    is_int8 = bool(int8.find(graph))
    with torch.no_grad():
        if is_int8:
            outs = int8.integer_reference(graph, *tensors)
        else:
            from torch.utils import _pytree as pytree
            outs = [t for t in pytree.tree_leaves(graph.gm(*tensors)) if isinstance(t, torch.Tensor)]
    return [o.detach().cpu().numpy() for o in outs], is_int8


def _inexact_fp32_kernels(project_dir: str | Path) -> list[str]:
    """fp32 kernels between int8 layers that libm rounding keeps from being bit-exact
    (the code generator's int8 check lists them in model.json)."""
    try:
        facts = json.loads((Path(project_dir) / "model.json").read_text())
    except (OSError, ValueError):
        return []
    return list((facts.get("int8_check") or {}).get("inexact_fp32_kernels") or [])


def compare(project_dir: str | Path, inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray]) -> dict[str, Any]:
    """Check the artifact's ``outputs`` for ``inputs``; raises VerificationError on a mismatch."""
    ref, is_int8 = reference_outputs(load_reference(project_dir), inputs)
    try:
        max_abs, rel, ref_max = compare_outputs([torch.from_numpy(np.array(o)) for o in outputs],
                                                [torch.from_numpy(r) for r in ref])
    except ValueError as exc:
        raise VerificationError(f"the artifact's outputs do not match the reference's: {exc}",
                                "compile it again; if it persists, report it") from exc
    inexact = _inexact_fp32_kernels(project_dir)
    if is_int8:
        mismatched = sum(int(np.count_nonzero(np.asarray(o) != r)) for o, r in zip(outputs, ref))
        total = sum(r.size for r in ref)
        if inexact:
            result = {"mode": f"int8 with fp32 {', '.join(inexact)} between the int8 layers, within "
                              f"{INT8_REL_TOL:g} of the integer reference", "ok": rel <= INT8_REL_TOL,
                      "tolerance": INT8_REL_TOL}
        else:
            result = {"mode": "int8, bit-exact against the integer reference", "ok": mismatched == 0}
        result.update(mismatched_elements=mismatched, elements=total)
    else:
        mismatched = None
        result = {"mode": "fp32, within rounding of the torch reference", "ok": rel <= FP32_REL_TOL,
                  "tolerance": FP32_REL_TOL}
    result.update(max_abs_error=max_abs, relative_error=rel, max_abs_reference=ref_max)
    if not result["ok"]:
        if is_int8 and not inexact:
            detail = f"{mismatched} of {result['elements']} output values differ from the integer reference"
        else:
            detail = f"relative error {rel:.3g} > {result['tolerance']:g}"
        raise VerificationError(f"the mcu artifact disagrees with its reference: {detail} "
                                f"(max abs error {max_abs:.3g})",
                                "this is a code generator or kernel bug; report it with the model and input")
    return result
