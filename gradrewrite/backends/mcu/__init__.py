"""mcu backend: the rewritten graph as a self-contained C project (and Cortex-M firmware).

``compile`` writes ``OUT/mcu/``: ``model.h``, ``model.c``, ``weights.c`` (const
arrays: flash), ``kernels/``, built for the host and, for ``cortex-m4``/``cortex-m7``,
linked into ``firmware.elf``/``.bin`` within the RAM/flash budget. ``load`` returns a
runner over the host executable, or the firmware under QEMU for Cortex-M targets.

The package, by graph kind (rewrite/ -> backends/mcu, one way within it too):

- ``inference/``: lowering (``lowering/``, by op family), code generation, the
  reference for ``run --compare``, N:M packing, the runner;
- ``training/``: a training step (``model_train_step`` beside ``model_run``): the int8
  device form, lowering, code generation, the host harness, the integer reference and
  the ``run --train`` loop; it builds on ``inference/``;
- ``firmware/``: host and Cortex-M builds, QEMU runs and measurement;
- shared: ``program.py`` (the lowered program), ``targets.py``, ``packing.py`` (the C
  API's bytes), ``c_files.py`` (``kernels/``, ``templates/``), ``check.py``
  (``gradrewrite check``).

Options (``backends.options.McuOptions``): ``target`` (host, cortex-m4, cortex-m7),
``ram_kb``, ``flash_kb`` (the budget), ``sparse`` (pack N:M weights), ``stream`` (int8
depthwise convs over their dying input, pointwise expand + depthwise pairs computed one
channel at a time), ``patches`` and ``patch_overhead`` (the first CNN stage run patch by
patch, ``inference/patches.py``; a training step's frozen first stage too,
``training/patches.py``), ``measure`` (run Cortex-M images once under QEMU for stack and
instruction counts).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ...errors import BackendError
from ...rewrite.graph import Graph
from ..base import Backend, BackendArtifact, register_backend
from ..options import McuOptions, make_options
from .inference.reference import INT8_REL_TOL  # one tolerance for compile and `run --compare`
from .targets import get_target

PROJECT = "mcu"


@register_backend("mcu")
class McuBackend(Backend):
    def availability(self) -> str | None:
        if shutil.which("cc") is None and shutil.which("gcc") is None:
            return "no host C compiler (cc) found; install gcc"
        return None

    def compile(self, graph: Graph, out_dir: Path, *, options: McuOptions) -> BackendArtifact:
        options = make_options("mcu", options)
        target, ram_kb, flash_kb, measure = options.target, options.ram_kb, options.flash_kb, options.measure
        project = out_dir / PROJECT
        if graph.meta.get("train_step"):  # model_train_step beside model_run
            from .training.compile import compile_train
            facts = compile_train(graph, project, target=target, ram_kb=ram_kb, flash_kb=flash_kb, measure=measure,
                                  patches=options.patches, patch_overhead=options.patch_overhead)
            # report.json's memory_plan: the plan the arena was laid out by, and what the device measured
            plan = dict(facts["memory_plan"])
            if "firmware" in facts:
                from .training.memory import device_memory
                plan["device"] = device_memory(plan, facts, project)
            info: dict[str, Any] = {"mcu": facts, "memory_plan": plan}
            if facts.get("int8"):  # compile_train checked it bit for bit against the integer reference;
                # against the torch step it agrees to int8 resolution (check_artifact: quantization steps)
                info["rel_tol"] = INT8_REL_TOL
            if not get_target(target).is_host:
                info["no_wall_latency"] = ("the host build's time is not device time; see "
                                           "mcu.runtime.instructions_per_step (instructions per training step)")
        else:
            from .inference.compile import compile_inference
            facts = compile_inference(graph, project, target=target, ram_kb=ram_kb, flash_kb=flash_kb,
                                      sparse=options.sparse, stream=options.stream,
                                      patches=options.patches, patch_overhead=options.patch_overhead,
                                      measure=measure)
            info = {"mcu": facts}
            if not get_target(target).is_host:
                info["no_wall_latency"] = ("QEMU wall time is not device time; see "
                                           "mcu.runtime.instructions (instructions per inference)")
        files = sorted(str(p.relative_to(out_dir)) for p in project.rglob("*") if p.is_file())
        return BackendArtifact(files, f"mcu-{target}", info)

    def check_artifact(self, runner, graph: Graph, info: dict[str, Any], *, n_inputs: int,
                       seed: int) -> dict[str, Any] | None:
        """An int8 training step: per parameter in quantization steps (``training/step_check.py``)."""
        facts = info.get("mcu", {})
        if not (facts.get("train_step") and facts.get("int8")):
            return None
        from .training.step_check import check_int8_artifact
        return {**check_int8_artifact(runner, graph, facts, n_inputs=n_inputs, seed=seed),
                "integer_reference": facts.get("int8_check")}

    def plan_memory(self, graph: Graph, options: McuOptions) -> dict[str, Any] | None:
        """A training step's plan (``training/memory.py``): lowered, not written or built."""
        if not graph.meta.get("train_step"):
            return None
        from .training.memory import plan_train_memory
        options = make_options("mcu", options)
        return plan_train_memory(graph, options.patches, options.patch_overhead / 100)

    def load(self, out_dir: Path, artifact: dict[str, Any]):
        project = Path(out_dir) / PROJECT
        meta_path = project / "model.json"
        if not meta_path.is_file():
            raise BackendError(f"{str(out_dir)!r} has no mcu project (mcu/model.json)",
                               "compile the model with --backend mcu")
        meta = json.loads(meta_path.read_text())
        if meta.get("train_step"):
            from .training.host import make_train_runner
            return make_train_runner(project, meta)
        from .inference.runner import make_runner
        return make_runner(project, meta)
