"""The mcu backend's inference path: lower the graph (``lowering/``), plan the arena and
write ``OUT/mcu/`` (``codegen.py``), save the reference for ``run --compare``
(``reference.py``), build the host executable, check int8 programs against the integer
reference, and for Cortex-M targets link ``firmware.elf`` within the budget and
measure one inference under QEMU."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ....errors import BackendError, VerificationError
from ....rewrite.graph import Graph
from ..firmware.build import build_firmware, build_host
from ..firmware.qemu import measure as measure_firmware
from ..packing import pack_inputs
from ..targets import DEFAULT_FLASH_KB, DEFAULT_RAM_KB, get_target
from .codegen import write_project
from .lowering import Unsupported, lower
from .patches import apply as patch_stage
from .reference import INT8_REL_TOL, integer_reference, save_reference
from .runner import make_runner


def compile_inference(graph: Graph, project: Path, *, target: str = "host", ram_kb: int = DEFAULT_RAM_KB,
                      flash_kb: int = DEFAULT_FLASH_KB, sparse: bool = True, stream: bool = True,
                      patches: str = "auto", patch_overhead: int = 20, measure: bool = True) -> dict[str, Any]:
    """Write, build and check the C project of inference graph ``graph`` in ``project``;
    returns its facts (also written to ``project/model.json``)."""
    try:
        program = lower(graph, sparse=sparse, stream=stream)
    except Unsupported as exc:
        raise BackendError(f"the mcu backend cannot generate {exc}",
                           f"run `gradrewrite check MODEL --target {target}` to list every "
                           "unsupported op, then rewrite them with a pass") from exc
    program, patch_report = patch_stage(program, patches, patch_overhead / 100)
    facts = write_project(program, project, source=graph.source)
    facts["patches"] = {k: v for k, v in patch_report.items() if k != "candidates"}
    facts["target"] = target
    facts["reference"] = save_reference(graph, project)   # for `gradrewrite run --compare`
    build_host(project)
    if program.notes.get("int8_layers"):
        facts["int8_check"] = check_int8(graph, project, facts)
    if not get_target(target).is_host:
        info = build_firmware(project, target, ram_kb=ram_kb, flash_kb=flash_kb)
        facts["firmware"] = info.as_dict()
        if measure:  # stack painting + exact instruction counts
            sample = pack_inputs([t.numpy() for t in graph.random_inputs(7)], facts["inputs"])
            facts["runtime"] = measure_firmware(project, target, sample, ops=facts["ops"])
    (project / "model.json").write_text(json.dumps(facts, indent=2, default=str) + "\n")
    return facts


# fp32 kernels whose results equal ATen's CPU kernels bit for bit: one IEEE operation
# per element, pure data movement, or the same summation order (adaptive average
# pooling: row-major window sum, then one division). Between int8 layers only these
# keep a program bit-exact against the integer reference; anything else (layer norm,
# softmax, gelu, fp32 matmuls) rounds differently, and a value next to a rounding
# boundary of the following quantize can move one step.
EXACT_FP32_KERNELS = frozenset({
    "gr_quantize_f32_i8", "gr_dequantize_i8_f32", "gr_copy_nd", "gr_embedding_f32",
    "gr_max_pool2d_f32", "gr_binary_f32", "gr_binary_scalar_f32", "gr_adaptive_avg_pool2d_f32", "gr_pad_f32",
    "gr_patch_read",   # patches.py: the input window by window
    "gr_fc_s8_f32", "gr_conv2d_s8_f32",   # int8 layers with a float output: one multiply per value
})


def check_int8(graph: Graph, project: Path, facts: dict[str, Any], n_inputs: int = 2) -> dict[str, Any]:
    """int8 programs against the integer reference (the compiler's own check only
    measures them against the float model), on the host build: bit for bit when every
    fp32 kernel between the int8 layers is exact, else within INT8_REL_TOL (a kernel
    bug gives O(1) errors, rounding flips give far less)."""
    inexact = sorted({op["kernel"] for op in facts["ops"] if not op["kernel"].endswith("_s8")
                      and op["kernel"] not in EXACT_FP32_KERNELS
                      and not (op["kernel"] == "gr_unary_f32"
                               and any(a in op["op"] for a in ("relu", "hardtanh", "clamp")))})
    run = make_runner(project, facts, target="host")
    mismatched, total, worst = 0, 0, 0.0
    for seed in range(n_inputs):
        inputs = graph.random_inputs(2000 + seed)
        got = run(*(t.numpy() for t in inputs))
        ref = [t.numpy() for t in integer_reference(graph, *inputs)]
        for g, r in zip(got, ref):
            mismatched += int(np.count_nonzero(g != r))
            total += r.size
            diff = np.linalg.norm((g.astype(np.float64) - r.astype(np.float64)).ravel())
            worst = max(worst, float(diff / max(np.linalg.norm(r.astype(np.float64).ravel()), 1e-12)))
    result = {"inputs": n_inputs, "bit_exact_expected": not inexact, "bit_exact": mismatched == 0,
              "mismatched_values": mismatched, "values": total, "relative_error": worst,
              "inexact_fp32_kernels": inexact}
    if (not inexact and mismatched) or worst > INT8_REL_TOL:
        detail = (f"differs from the integer reference in {mismatched} of {total} output values"
                  if not inexact else f"is off the integer reference by relative error {worst:.3g} > {INT8_REL_TOL:g}")
        raise VerificationError(f"the int8 C code {detail}",
                                "this is a code generator or kernel bug; compile with --backend torch meanwhile")
    return result
