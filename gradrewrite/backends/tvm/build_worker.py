"""What MetaSchedule's candidate-build worker process runs (see ``tuning.candidate_builder``).

Only TVM and the standard library are imported here: the function is shipped to the
worker by value (``cloudpickle.register_pickle_by_value``), so the worker does not need to
import gradrewrite (it may not be on that interpreter's path).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile


def build_candidate(mod_json: str, target_json: str) -> str:
    """One scheduled candidate -> the path of its exported library."""
    import tvm
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock
    from tvm.tirx import build as tvm_build

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(tvm.ir.load_json(mod_json))
    rt_mod = tvm_build(mod, target=tvm.target.Target(json.loads(target_json)))
    tmp = tempfile.mkdtemp(prefix="gradrewrite-ms-")
    try:
        path = os.path.join(tmp, "tvm_tmp_mod.tar")
        rt_mod.export_library(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
