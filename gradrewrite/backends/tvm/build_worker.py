"""What the worker process runs for tuning: candidate builds (``tuning.candidate_builder``)
and kernel checks (``kernel_check``).

Only TVM, numpy and the standard library are imported here: the functions are shipped to
the worker by value (``cloudpickle.register_pickle_by_value``), so the worker does not need
to import gradrewrite (it may not be on that interpreter's path).

The worker ignores SIGINT: a terminal's Ctrl-C reaches the whole process group, and the
parent, which owns the worker, decides (it kills it). A worker dying on its own first
would only turn into a spurious failed build.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys
import tempfile
import types


def build_candidate(mod_json: str, target_json: str, root: str | None = None) -> str:
    """One scheduled candidate -> the path of its exported library (in a new folder under
    ``root``, which the parent removes when it is done with the builder)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import tvm
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock
    from tvm.tirx import build as tvm_build

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(tvm.ir.load_json(mod_json))
    rt_mod = tvm_build(mod, target=tvm.target.Target(json.loads(target_json)))
    tmp = tempfile.mkdtemp(prefix="gradrewrite-ms-", dir=root)
    try:
        path = os.path.join(tmp, "tvm_tmp_mod.tar")
        rt_mod.export_library(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _reference_outputs() -> dict:
    """Reference outputs kept for the worker's life, in a module of their own: this file's
    globals do not last (each call arrives as a fresh by-value copy of its functions)."""
    holder = sys.modules.get("_gradrewrite_check_references")
    if holder is None:
        holder = sys.modules["_gradrewrite_check_references"] = types.ModuleType("_gradrewrite_check_references")
        holder.outputs = {}
    return holder.outputs


def check_candidate(reference_json: str, scheduled_json: str, target_json: str, seed: int) -> list:
    """Run ``reference`` (the untuned task, built for the CPU) and ``scheduled`` (the tuned
    one, for the target) on the same random arguments; ``[name, relative L2 error]`` per
    argument. Outputs are filled with the same random data beforehand, not zeros: a kernel
    that leaves part of its output unwritten must not pass by luck. Integer arguments
    compare exactly (error 0 or 1); a NaN where the other has none is error inf."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import numpy as np
    import tvm
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo
    from tvm.tirx import build as tvm_build

    target = tvm.target.Target(json.loads(target_json))
    on_gpu = "gpu" in [str(k) for k in target.keys]
    cpu_target = (target.host or tvm.target.Target({"kind": "llvm"})) if on_gpu else target
    ref_mod, cand_mod = tvm.ir.load_json(reference_json), tvm.ir.load_json(scheduled_json)
    rng = np.random.default_rng(seed)
    args = []
    for info in ArgInfo.from_prim_func(ref_mod["main"]):
        shape, dtype = [int(d) for d in info.shape], str(info.dtype)
        if dtype.startswith("float"):
            args.append(rng.standard_normal(shape).astype(dtype))
        else:  # small non-negative ints: valid as gather indices, and they exercise integer maths
            args.append(rng.integers(0, 3, size=shape).astype(dtype))

    def run(mod, tgt):
        kind = str(tgt.kind.name)
        dev = tvm.device("cpu" if kind in ("llvm", "c") else kind, 0)
        tensors = [tvm.runtime.tensor(a, dev) for a in args]
        tvm_build(mod, target=tgt)["main"](*tensors)
        return [t.numpy() for t in tensors]

    # A task's candidates are checked against the same reference: built and run once
    cache = _reference_outputs()
    key = hashlib.sha256(f"{reference_json}|{cpu_target}|{seed}".encode()).hexdigest()
    if key not in cache:
        if len(cache) >= 64:
            cache.clear()
        cache[key] = run(ref_mod, cpu_target)
    outs = [cache[key], run(cand_mod, target)]
    names = [p.name for p in ref_mod["main"].params]
    errors = []
    for name, ref, got in zip(names, *outs):
        if ref.dtype.kind != "f":
            errors.append([name, 0.0 if np.array_equal(ref, got) else 1.0])
            continue
        ref64, got64 = ref.astype("float64"), got.astype("float64")
        if not np.array_equal(np.isnan(ref64), np.isnan(got64)):
            errors.append([name, float("inf")])
            continue
        ref64, got64 = np.nan_to_num(ref64), np.nan_to_num(got64)
        scale = max(float(np.linalg.norm(ref64)), 1e-30)
        errors.append([name, float(np.linalg.norm(ref64 - got64)) / scale])
    return errors
