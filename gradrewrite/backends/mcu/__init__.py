"""mcu backend: the rewritten graph as a self-contained C project (and Cortex-M firmware).

``compile`` lowers the graph to kernel calls (``lower.py``), plans every activation
into one static arena and writes ``OUT/mcu/`` (``codegen.py``): ``model.h``,
``model.c``, ``weights.c`` (const arrays: flash), ``kernels/``. It always builds the
project for the host (``firmware.build_host``), and for ``cortex-m4``/``cortex-m7``
also links ``firmware.elf``/``.bin`` within the RAM/flash budget. ``load`` returns a
runner that feeds packed input bytes to the host executable, or to the firmware
under QEMU for Cortex-M targets.

Options: ``target`` (host, cortex-m4, cortex-m7; default host), ``ram_kb``,
``flash_kb`` (the budget, default 320 / 1024), ``sparse`` (pack N:M weights, default
True), ``stream`` (int8 depthwise convs over their dying input, pointwise expand +
depthwise pairs computed one channel at a time; default True).

A float input whose only readers quantize it to int8 (one scale and zero point) is
taken as int8 by the C API (model.json ``inputs[i].quantize``); ``make_runner`` and
``pack_inputs`` quantize float arrays for it on the host, as torch does.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import BackendError, VerificationError
from ...rewrite.graph import Graph
from ..base import Backend, BackendArtifact, register_backend
from .reference import INT8_REL_TOL  # one tolerance for compile and `run --compare`
from .targets import DEFAULT_FLASH_KB, DEFAULT_RAM_KB, TARGETS, get_target

PROJECT = "mcu"
NP_DTYPES = {"float32": np.float32, "int8": np.int8, "int32": np.int32, "int64": np.int64, "uint8": np.uint8}


@register_backend("mcu")
class McuBackend(Backend):
    def availability(self) -> str | None:
        if shutil.which("cc") is None and shutil.which("gcc") is None:
            return "no host C compiler (cc) found; install gcc"
        return None

    def compile(self, graph: Graph, out_dir: Path, *, options: dict[str, Any]) -> BackendArtifact:
        from . import firmware
        from .codegen import write_project
        from .lower import Unsupported, lower
        from .reference import save_reference

        target = options.get("target") or "host"
        if target not in TARGETS:
            get_target(target)  # raises with the valid names
        ram_kb = options.get("ram_kb") or DEFAULT_RAM_KB
        flash_kb = options.get("flash_kb") or DEFAULT_FLASH_KB
        if graph.meta.get("train_step"):  # model_train_step beside model_run (train_host.py)
            from .train_host import compile_train
            facts = compile_train(graph, out_dir / PROJECT, target=target, ram_kb=ram_kb, flash_kb=flash_kb,
                                  measure=options.get("measure", True))
            info: dict[str, Any] = {"mcu": facts}
            if facts.get("int8"):  # compile_train checked it bit for bit against the integer reference;
                # against the torch step, whose forward is fake-quantized floats, it agrees to int8 resolution
                info["rel_tol"] = INT8_REL_TOL
            if not get_target(target).is_host:
                info["no_wall_latency"] = ("the host build's time is not device time; see "
                                           "mcu.runtime.instructions_per_step (instructions per training step)")
            files = sorted(str(p.relative_to(out_dir)) for p in (out_dir / PROJECT).rglob("*") if p.is_file())
            return BackendArtifact(files, f"mcu-{target}", info)
        try:
            program = lower(graph, sparse=options.get("sparse", True), stream=options.get("stream", True))
        except Unsupported as exc:
            raise BackendError(f"the mcu backend cannot generate {exc}",
                               f"run `gradrewrite check MODEL --target {target}` to list every "
                               "unsupported op, then rewrite them with a pass") from exc
        project = out_dir / PROJECT
        facts = write_project(program, project, source=graph.source)
        facts["target"] = target
        facts["reference"] = save_reference(graph, project)   # for `gradrewrite run --compare`
        firmware.build_host(project)
        if program.notes.get("int8_layers"):
            facts["int8_check"] = _check_int8(graph, project, facts)
        if not get_target(target).is_host:
            info = firmware.build_firmware(project, target, ram_kb=ram_kb, flash_kb=flash_kb)
            facts["firmware"] = info.as_dict()
            if options.get("measure", True):  # stack painting + exact instruction counts
                from .qemu import measure
                sample = pack_inputs([t.numpy() for t in graph.random_inputs(7)], facts["inputs"])
                facts["runtime"] = measure(project, target, sample, ops=facts["ops"])
        (project / "model.json").write_text(json.dumps(facts, indent=2, default=str) + "\n")
        files = sorted(str(p.relative_to(out_dir)) for p in project.rglob("*") if p.is_file())
        info: dict[str, Any] = {"mcu": facts}
        if not get_target(target).is_host:
            info["no_wall_latency"] = ("QEMU wall time is not device time; see "
                                       "mcu.runtime.instructions (instructions per inference)")
        return BackendArtifact(files, f"mcu-{target}", info)

    def load(self, out_dir: Path, artifact: dict[str, Any]):
        project = Path(out_dir) / PROJECT
        meta_path = project / "model.json"
        if not meta_path.is_file():
            raise BackendError(f"{str(out_dir)!r} has no mcu project (mcu/model.json)",
                               "compile the model with --backend mcu")
        meta = json.loads(meta_path.read_text())
        if meta.get("train_step"):
            from .train_host import make_train_runner
            return make_train_runner(project, meta)
        return make_runner(project, meta)


# fp32 kernels whose results equal ATen's CPU kernels bit for bit: one IEEE operation
# per element, pure data movement, or the same summation order (adaptive average
# pooling: row-major window sum, then one division). Between int8 layers only these
# keep a program bit-exact against the integer reference; anything else (layer norm,
# softmax, gelu, fp32 matmuls) rounds differently, and a value next to a rounding
# boundary of the following quantize can move one step.
EXACT_FP32_KERNELS = frozenset({
    "gr_quantize_f32_i8", "gr_dequantize_i8_f32", "gr_copy_nd", "gr_embedding_f32",
    "gr_max_pool2d_f32", "gr_binary_f32", "gr_binary_scalar_f32", "gr_adaptive_avg_pool2d_f32",
})


def _check_int8(graph: Graph, project: Path, facts: dict[str, Any], n_inputs: int = 2) -> dict[str, Any]:
    """int8 programs against the integer reference (the compiler's own check only
    measures them against the float model), on the host build: bit for bit when every
    fp32 kernel between the int8 layers is exact, else within INT8_REL_TOL (a kernel
    bug gives O(1) errors, rounding flips give far less)."""
    from ...rewrite import int8_layers as int8

    inexact = sorted({op["kernel"] for op in facts["ops"] if not op["kernel"].endswith("_s8")
                      and op["kernel"] not in EXACT_FP32_KERNELS
                      and not (op["kernel"] == "gr_unary_f32"
                               and any(a in op["op"] for a in ("relu", "hardtanh", "clamp")))})
    run = make_runner(project, facts, target="host")
    mismatched, total, worst = 0, 0, 0.0
    for seed in range(n_inputs):
        inputs = graph.random_inputs(2000 + seed)
        got = run(*(t.numpy() for t in inputs))
        ref = [t.numpy() for t in int8.integer_reference(graph, *inputs)]
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


def quantize_input(x: np.ndarray, quant: dict[str, Any]) -> np.ndarray:
    """A float input as the int8 tensor the C API takes: torch's own int8
    ``quantize_per_tensor`` (the node the code generator took out of the program)."""
    import torch
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers the op)

    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return torch.ops.quantized_decomposed.quantize_per_tensor(
        t, float(quant["scale"]), int(quant["zero_point"]), -128, 127, torch.int8).numpy()


def pack_inputs(inputs, specs: list[dict[str, Any]]) -> bytes:
    """The packed input bytes of ``model_run``: each array in its spec's dtype; an input
    the C API takes quantized (spec "quantize") is quantized here unless already int8."""
    parts = []
    for x, spec in zip(inputs, specs):
        x = np.asarray(x)
        q = spec.get("quantize")
        if q and x.dtype != np.int8:
            x = quantize_input(x, q)
        parts.append(np.ascontiguousarray(x, dtype=NP_DTYPES[spec["dtype"]]).tobytes())
    return b"".join(parts)


def make_runner(project: Path, meta: dict[str, Any], *, target: str | None = None):
    """A runner ``(*arrays) -> [arrays]`` over the built project: the host executable, or
    the firmware under QEMU (``target`` overrides the compiled one, e.g. "host")."""
    from . import firmware

    target = target or meta.get("target", "host")
    ins, outs = meta["inputs"], meta["outputs"]

    def run(*inputs: np.ndarray) -> list[np.ndarray]:
        if len(inputs) != len(ins):
            raise BackendError(f"the model takes {len(ins)} inputs, got {len(inputs)}",
                               "pass one --input per model input")
        data = pack_inputs(inputs, ins)
        if get_target(target).is_host:
            raw = firmware.run_host(project / firmware.HOST_EXE, data)
        else:
            from .qemu import run_firmware
            raw, _ = run_firmware(project / firmware.ELF, data, target)
        expected = sum(o["bytes"] for o in outs)
        if len(raw) != expected:
            raise BackendError(f"the model wrote {len(raw)} output bytes, expected {expected}",
                               "this is a code generator bug; report it")
        result, offset = [], 0
        for o in outs:
            arr = np.frombuffer(raw, dtype=NP_DTYPES[o["dtype"]], count=int(np.prod(o["shape"], dtype=np.int64)),
                                offset=offset).reshape(o["shape"])
            result.append(arr.copy())
            offset += o["bytes"]
        return result

    return run
