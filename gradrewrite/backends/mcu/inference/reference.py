"""The reference an mcu artifact is checked against (``gradrewrite run OUT --compare``).

At compile time the backend saves the rewritten graph next to the C project
(``save_reference`` -> ``mcu/reference.pt2``, a torch.export archive, i.e. what the
torch backend would run). ``compare`` reruns it on the same inputs and checks the
device's outputs:

- graphs with int8 layers (static QDQ): against ``integer_reference`` (every int8
  conv/linear chain and every op ``lowering.int8_elementwise`` plans between them in
  integer arithmetic, the rest as the torch graph), and
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
from ....rewrite import int8_layers as int8
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

    tensors = [torch.from_numpy(np.array(x)) for x in inputs]  # a writable copy
    is_int8 = bool(int8.find(graph, float_outputs=True))
    with torch.no_grad():
        if is_int8:
            outs = integer_reference(graph, *tensors)
        else:
            from torch.utils import _pytree as pytree
            outs = [t for t in pytree.tree_leaves(graph.gm(*tensors)) if isinstance(t, torch.Tensor)]
    return [o.detach().cpu().numpy() for o in outs], is_int8


def _rq(acc: np.ndarray, mult, shift) -> np.ndarray:
    """The kernels' requantization (rounding half up) in int64."""
    return int8.requantize(np.asarray(acc, np.int64), np.asarray(mult, np.int64), np.asarray(shift, np.int64))


def _sat(v: np.ndarray, lo: int = -128, hi: int = 127) -> np.ndarray:
    return np.clip(v, lo, hi).astype(np.int8)


def _rescaled(x: np.ndarray, in_q, out_q, r) -> np.ndarray:
    """``x`` at ``out_q``: a copy when the parameters match, else one requantization."""
    if r is None:
        return x.astype(np.int8)
    return _sat(_rq(x.astype(np.int64) - in_q[1], r[0], r[1]) + out_q[1])


def run_int8_elem(qe, *xs: torch.Tensor) -> torch.Tensor:
    """What the C kernel of planned int8 op ``qe`` (``lowering.int8_elementwise``) computes."""
    p, (so, zo) = qe.p, qe.out_q
    v = [x.numpy().astype(np.int64) for x in xs]
    shape = tuple(int(d) for d in qe.node.meta["val"].shape)
    if qe.kind == "add":   # TFLite's int8 add (gr_add_lut_s8)
        m, e = p["mult"], p["shift"]
        a = _rq((v[0] - qe.in_q[0][1]) << int8.ADD_SHIFT, m[1], e[1])
        b = _rq((v[1] - qe.in_q[1][1]) << int8.ADD_SHIFT, m[2], e[2])
        y = _sat(_rq(a + b, m[0], e[0]) + zo)
    elif qe.kind == "mul":
        ai = p["a"]
        a = (v[ai] - qe.in_q[ai][1]).reshape(p["outer"], p["inner"])
        b = (v[1 - ai] - qe.in_q[1 - ai][1]).reshape(p["outer"], p["b_inner"])
        y = _sat(_rq(a * b, p["mult"], p["shift"]) + zo)
    elif qe.kind == "lut":
        y = p["table"][v[0] + 128]
    elif qe.kind == "view":
        y = v[0]
    elif qe.kind == "avg":
        y = _avg_pool(v[0] - qe.in_q[0][1], p, zo)
    elif qe.kind == "cat":
        parts = [_rescaled(x, q, qe.out_q, r) for x, q, r in zip(v, qe.in_q, p["rescale"])]
        y = np.concatenate(parts, axis=p["dim"])
    else:   # pad
        top, bottom, left, right = p["pads"]
        x = _rescaled(v[0], qe.in_q[0], qe.out_q, p["rescale"])
        width = [(0, 0)] * (x.ndim - 2) + [(top, bottom), (left, right)]
        y = np.pad(x, width, constant_values=p["value"])
    return torch.from_numpy(np.ascontiguousarray(y).reshape(shape).astype(np.int8))


def _avg_pool(x: np.ndarray, p: dict, zo: int) -> np.ndarray:
    """Window sums of ``x - in_zp`` requantized by the table entry of each window's divisor
    (torch's divisor rule: the window clipped to the padded input, or to the input
    without count_include_pad, unless a divisor is given)."""
    n, c, h, w = x.shape
    oh, ow = p["oh"], p["ow"]
    y = np.empty((n, c, oh, ow), np.int64)

    def edges(o, s, k, pad, size):
        start = o * s - pad
        end = min(start + k, size + pad)
        return max(start, 0), min(end, size), end - start

    for i in range(oh):
        y0, y1, ph = edges(i, p["s"][0], p["k"][0], p["pad"][0], h)
        for j in range(ow):
            x0, x1, pw = edges(j, p["s"][1], p["k"][1], p["pad"][1], w)
            acc = x[:, :, y0:y1, x0:x1].sum(axis=(2, 3))
            d = p["div"] or (ph * pw if p["cip"] else (y1 - y0) * (x1 - x0))
            y[:, :, i, j] = _rq(acc, p["mult"][d], p["shift"][d]) + zo if d > 0 else zo
    return _sat(y)


def integer_reference(graph: Graph, *inputs: torch.Tensor) -> list[torch.Tensor]:
    """``int8.integer_reference`` plus the int8 ops the mcu backend plans between the
    int8 layers: each computed from its int8 inputs as its C kernel does, and a quantize
    of such an op's result is that result."""
    import torch.fx as fx
    from torch.utils import _pytree as pytree

    from .lowering.int8_elementwise import plan

    layers = int8.find(graph, float_outputs=True)
    qplan = plan(graph, layers)

    class _Interp(fx.Interpreter):
        def run_node(self, n):
            if n in layers:
                return int8.run_layer(layers[n], *(self.env[x] for x in layers[n].inputs))
            if n in qplan.elems:
                qe = qplan.elems[n]
                return run_int8_elem(qe, *(self.env[x] for x in qe.srcs))
            if n in qplan.aliases:
                return self.env[qplan.aliases[n]]
            return super().run_node(n)

    with torch.no_grad():
        out = _Interp(graph.gm, garbage_collect_values=False).run(*inputs)
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


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
