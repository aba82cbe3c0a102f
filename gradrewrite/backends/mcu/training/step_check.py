"""An int8 training-step artifact against the torch training step, in quantization steps.

The host build is first checked bit for bit against the integer reference
(``reference.check_int8_step``): that check decides whether the C code is right, and
names every parameter that differs. Against the torch step the device cannot agree
bit for bit, by design: its layers requantize in integers, a gradient passes an int8
output only strictly inside the quantizer's range (it keeps q, not the float), and its
updates round to the integer grid. A relative L2 error over a parameter is no measure
of that: a bias that is near zero after BN folding moves by a few thousand int32 steps
while its value is itself a few steps, so one rounding reads as 80 % error.

So the integer reference decides (a parameter that differs from it fails the
compile, named); against the torch step the loss, computed before the update, must
agree within the int8 tolerance, and every trained parameter is reported in its own
quantization steps (1 for an int8 weight, ``s_x * s_w`` per output channel for an
int32 bias, fp32 rounding for a float-stored one): the error of its value after one
step and the torch step's update, both as root mean square over the parameter.
Observed on healthy int8 steps (random-init MCUNet-like nets, random batches): error /
update 0.2-1.0, cosine of the two updates 0.4-0.96, mostly from gradients masked where
an int8 output saturates (a saturated logit passes no gradient on the device).
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from ....errors import VerificationError
from ....rewrite.graph import Graph
from ....rewrite.verify import compare_outputs
from ..inference.reference import INT8_REL_TOL

F32_EPS = float(np.finfo(np.float32).eps)


def _steps(entry: dict[str, Any], ref: np.ndarray) -> np.ndarray:
    """The parameter's quantization step, broadcastable to it."""
    if entry.get("to_param_scale") is not None:   # an int32 bias: s_x * s_w per output channel
        s = np.asarray(entry["to_param_scale"], np.float64)
        return s.reshape((-1,) + (1,) * (ref.ndim - 1)) if ref.ndim else s.reshape(())
    if entry["dtype"] in ("int8", "int32"):       # integers held as floats (an int8 weight's w_q)
        return np.ones(())
    return np.asarray(max(F32_EPS * float(np.abs(ref).max(initial=0.0)), np.finfo(np.float32).tiny))


def rms(v: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(v)))) if v.size else 0.0


def check_int8_artifact(runner: Callable, step: Graph, facts: dict[str, Any], *, n_inputs: int,
                        seed: int) -> dict[str, Any]:
    """The int8 step's artifact (``runner``: one step from the initial parameters) against
    the torch step on ``n_inputs`` seeded batches: the loss within INT8_REL_TOL, every
    parameter finite and measured in quantization steps (module docstring); the record
    of report.json, or a VerificationError."""
    trained = {p["path"]: p for p in facts["trained"] if not p.get("optimizer_state")}
    outputs = list(facts["step_outputs"])
    ts = step.meta["train_step"]
    before = {p: step.attr(ts["params"][p]["attr"]).detach().double().numpy() for p in outputs[1:] if p in trained}
    worst: dict[str, dict[str, float]] = {}
    loss_err = 0.0
    generic = (0.0, 0.0, 0.0)
    for i in range(n_inputs):
        inputs = step.random_inputs(seed + i)
        with torch.no_grad():
            ref = [np.asarray(o.detach().double().numpy()) for o in step(*inputs)]
        got = [np.asarray(o, np.float64) for o in runner(*(t.numpy() for t in inputs))]
        generic = tuple(max(a, b) for a, b in zip(generic, compare_outputs(
            [torch.from_numpy(g) for g in got], [torch.from_numpy(r) for r in ref])))
        loss_err = max(loss_err, abs(float(got[0]) - float(ref[0])) / max(abs(float(ref[0])), 1e-12))
        for path, g, r in zip(outputs[1:], got[1:], ref[1:]):
            if path not in before:
                continue
            s = _steps(trained[path], r)
            err, upd = np.abs(g - r) / s, np.abs(r - before[path]) / s
            row = {"max_error_steps": float(err.max(initial=0.0)), "rms_error_steps": rms(err),
                   "rms_update_steps": rms(upd)}
            old = worst.get(path)
            if old is None or not row["rms_error_steps"] <= old["rms_error_steps"]:
                worst[path] = {k: round(v, 4) for k, v in row.items()}
    bad = [p for p, r in worst.items() if not np.isfinite(r["rms_error_steps"])]
    if bad or not loss_err <= INT8_REL_TOL:
        detail = [f"{p}: not finite" for p in bad]
        if not loss_err <= INT8_REL_TOL:
            detail.insert(0, f"loss: relative error {loss_err:.3g} > {INT8_REL_TOL:g}")
        raise VerificationError("the mcu int8 training step disagrees with the rewritten training step ("
                                + "; ".join(detail) + ")",
                                "this is a code generator or kernel bug; compile with --backend torch meanwhile")
    if not (facts.get("int8_check") or {}).get("bit_exact"):
        raise VerificationError("the mcu int8 training step was not checked against its integer reference",
                                "this is a backend bug; report it")
    max_abs, rel, ref_max = generic
    return {"inputs_compared": n_inputs, "outputs": len(outputs), "max_abs_error": max_abs,
            "relative_error": rel, "max_abs_reference": ref_max, "seed": seed,
            "units": "quantization steps per parameter", "loss_relative_error": loss_err,
            "parameters": worst, "checked": True,
            "tolerance": {"loss_relative": INT8_REL_TOL,
                          "parameters": "bit for bit against the integer reference (integer_reference); against the "
                                        "torch step reported in quantization steps"}}
