"""capture -> passes -> backend -> artifact directory.

``compile_graph`` writes OUT atomically: everything is built in a temporary sibling
directory that is renamed into place only when the build and its verification
succeeded, so a failure never leaves half an OUT behind.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import shutil
import statistics
import time
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from . import auto_select
from .backends.base import as_numpy, get_backend
from .errors import ConfigError, GradrewriteError, VerificationError
from .backends.options import as_config, make_options
from .artifact_check import verify_artifact, verify_other_batches
from .outputs import check_out_free, make_build_dir, replace_dir, write_json
from .training import Train
from .training import stream_bp_step
from . import training
from .rewrite import dynamic_batch
from .rewrite.graph import Graph
from .rewrite.mapped_safetensors import release_pages
from .rewrite.peak_rss import PeakRss, fp32_weight_bytes
from .rewrite.recorded_outputs import RecordedOutputs
from .rewrite.pass_manager import DumpGraphs, Instrument, PassManager, VerifyEachPass, console_feedback
from .rewrite.pipeline import PassSpec, build_passes, load_recipe, parse_pipeline
from .rewrite.registry import PassContext

FORMAT_VERSION = 1


@dataclass
class CompileOptions:
    passes: str | Sequence[PassSpec] | None = None
    recipe: str | Path | None = None
    backend: str = "torch"
    seed: int = 0
    verify_inputs: int = 3
    rel_tol: float = 1e-4  # fp32 rounding for exact pipelines; lossy passes report only
    verify_each_pass: bool = True
    dump_graphs: bool = False
    latency_runs: int = 20
    # a dict, or the backend's dataclass (backends/options.py); for auto, a dict per backend
    backend_options: Any = field(default_factory=dict)
    force: bool = False
    calibration: Any = None  # samples for passes that observe data (see rewrite/calibration.py)
    train: Train | None = None  # compile a training step instead of the inference graph


def pipeline_specs(passes: str | Sequence[PassSpec] | None, recipe: str | Path | None) -> list[PassSpec]:
    if passes and recipe:
        raise ConfigError("give either --passes or --recipe, not both", "drop one of them")
    if recipe:
        return load_recipe(recipe)
    if isinstance(passes, str):
        return parse_pipeline(passes)
    return list(passes or [])


def run_pipeline(graph: Graph, passes: str | Sequence[PassSpec] | None = None, *,
                 recipe: str | Path | None = None, seed: int = 0, verify: bool = True,
                 instruments: Sequence[Instrument] = (), ctx: PassContext | None = None):
    """Run a pipeline on ``graph`` in place (clone first to keep the original)."""
    specs = pipeline_specs(passes, recipe)
    pm = PassManager(build_passes(specs),
                     ([VerifyEachPass(seed=seed)] if verify else []) + list(instruments))
    return pm.run(graph, ctx or PassContext(seed=seed))


def typed_backend_options(backend: str, options: Any) -> Any:
    """The backend's options validated into its dataclass (auto: one per candidate)."""
    if backend == auto_select.AUTO:
        return {name: make_options(name, given) for name, given in auto_select.split_options(options).items()}
    return make_options(backend, options)


def compile_graph(graph: Graph, out: str | Path, options: CompileOptions | None = None, *,
                  model_file: str | Path | None = None, console=None) -> "Artifact":
    """Rewrite ``graph`` with the pipeline, lower it with the backend, write OUT.

    With ``options.train`` the target is a training step (see ``training``): the
    pipeline's inference passes run first, then the step is captured and the rest of
    the pipeline rewrites it; everything else (OUT, report, manifest, verification
    that fits the kind, ``run``) is the same road as for an inference graph."""
    opts = options or CompileOptions()
    out = Path(out)
    check_out_free(out, opts.force)
    if graph.dynamic_batch:
        dynamic_batch.refuse(backend=opts.backend, train=opts.train is not None)
    specs = pipeline_specs(opts.passes, opts.recipe)
    requested = build_passes(specs)           # typos fail before any work
    opts = replace(opts, backend_options=typed_backend_options(opts.backend, opts.backend_options))
    auto = opts.backend == auto_select.AUTO
    backend = None if auto else get_backend(opts.backend)
    if backend is not None:
        backend.check_request(opts.backend_options, requested)
    stream_bp = opts.train is not None and opts.train.is_stream_bp(specs)
    if opts.train is not None:
        if auto:
            raise ConfigError("--backend auto compares inference artifacts; a training step names its backend",
                              "pick --backend torch, ort, tvm or mcu")
        if stream_bp:
            stream_bp_step.check_request(specs, opts.train, opts.backend)
            stream_bp_step.token_input(graph)

    tmp = make_build_dir(out)
    try:
        memory = PeakRss()
        log = console.log if console is not None else (lambda *a, **k: None)
        pipeline = specs  # the whole pipeline, for the manifest (prepare runs its inference part)
        graph, specs = training.prepare(graph, specs, opts.train, backend=opts.backend, seed=opts.seed,
                                        calibration=opts.calibration, console=console)
        passes = build_passes(specs)
        original = graph.clone()  # shares the weights when they are memory-mapped (bounded memory)
        reference_outputs = None
        if "mapped_weights" in original.meta and not auto and not graph.meta.get("train_step"):
            # bounded memory: the original's outputs for the artifact check now, so the float
            # model and the backend's runtime are never resident at the same time
            reference_outputs = RecordedOutputs(original, opts.verify_inputs, opts.seed + 1000)
            release_pages(original)
        memory.mark("reference")
        instruments: list[Instrument] = []
        if opts.verify_each_pass:
            instruments.append(VerifyEachPass(n_inputs=2, seed=opts.seed, rel_tol=opts.rel_tol))
        if opts.dump_graphs:
            instruments.append(DumpGraphs(tmp / "graphs"))
        shown, progress = console_feedback(console, opts.calibration)
        instruments += shown
        planner = None if backend is None else (  # the target's own memory plan (sparse-update's budget)
            lambda g, b=backend: b.plan_memory(g, opts.backend_options))
        result = PassManager(passes, instruments).run(
            graph, PassContext(seed=opts.seed, calibration=opts.calibration, progress=progress,
                               memory_planner=planner))

        if graph.meta.get("pending_training"):
            kind = graph.meta["pending_training"]
            raise ConfigError(f"the graph still holds {kind} training rewrites, which no backend lowers",
                              f"train it first, then end the pipeline with the pass that bakes them "
                              f"(e.g. {'nm-finalize' if kind == 'nm-sparsity' else 'its finalize pass'})")
        exact = all(getattr(p, "exact", True) for p in passes)
        memory.mark("passes")
        release_pages(graph)
        if stream_bp:  # the chunked step is written and checked against autograd here
            _finish_stream_bp(graph, original, tmp, out, opts, specs, result, model_file, log)
            return Artifact(out)
        t0 = time.perf_counter()
        auto_table = None
        if auto:  # build, verify and time every backend; the winner's files end up in tmp
            chosen = auto_select.select(graph, original, tmp, opts, exact=exact, log=log)
            backend, artifact, auto_table = chosen.backend, chosen.artifact, chosen.table
        else:
            log(f"lowering with backend [bold]{backend.name}[/] …")
            artifact = backend.compile(graph, tmp, options=opts.backend_options)
        build_seconds = time.perf_counter() - t0
        memory.mark("lowering")
        release_pages(graph)

        # Files passes left for deployment (e.g. N:M masks) ship with every backend.
        for name, data in graph.meta.get("export_files", {}).items():
            (tmp / name).write_bytes(data)
            artifact.files.append(name)
        if auto:
            runner, verification = chosen.runner, chosen.verification
        else:
            runner = backend.load(tmp, {"files": artifact.files, **artifact.info})
            # a training step's passes change what it returns (the trained parameters):
            # its artifact is checked against the rewritten step itself
            verification = backend.check_artifact(runner, graph, artifact.info, n_inputs=opts.verify_inputs,
                                                  seed=opts.seed + 1000)
            if verification is None:
                verification = verify_artifact(runner, graph if graph.meta.get("train_step") else original,
                                                opts, reference_outputs=reference_outputs)
        if original.dynamic_batch:  # the traced batch is checked; other batches must agree too
            verification = verify_other_batches(runner, original, opts, verification)
        # a training step is compared with the rewritten step, so lossy passes do not
        # excuse the backend: its lowering must be exact
        exact = exact or bool(graph.meta.get("train_step"))
        # a backend may widen the tolerance for what it computes at lower precision by
        # design (the mcu int8 training step, itself checked bit for bit elsewhere)
        rel_tol = max(opts.rel_tol, artifact.info.get("rel_tol", 0.0))
        own_check = "units" in verification  # the backend checked it in its own units (check_artifact)
        if exact and not own_check and verification["relative_error"] > rel_tol:
            raise VerificationError(
                f"the {backend.name} artifact disagrees with the "
                f"{'rewritten training step' if graph.meta.get('train_step') else 'original model'}: "
                f"relative error "
                f"{verification['relative_error']:.3g} > {rel_tol:g}",
                "check the backend's op support; --backend torch gives the reference")
        # an emulator's wall time says nothing about the device: such backends report
        # their own measure (the mcu backend: instructions per inference under QEMU)
        skip = artifact.info.get("no_wall_latency")
        latency = {"skipped": skip} if skip else _latency(runner, original, opts.latency_runs)
        memory.mark("verification")

        (tmp / "graph_before.txt").write_text(original.text())
        (tmp / "graph_after.txt").write_text(graph.text())
        report = {
            "format_version": FORMAT_VERSION,
            "source": graph.source,
            "backend": backend.name,
            "target": artifact.target,
            "inputs": _inputs_report(graph),
            "passes": result.reports(),
            "nodes": {"before": original.node_count(), "after": graph.node_count()},
            "ops": {"before": original.op_histogram(), "after": graph.op_histogram()},
            "parameters": {"before": original.parameter_count(), "after": graph.parameter_count()},
            "verification": verification if own_check else {**verification, "checked": exact,
                                                             "tolerance": rel_tol if exact else None},
            "latency_ms": latency,
            "build_seconds": round(build_seconds, 3),
            "artifact": {"files": artifact.files, **artifact.info},
            "sizes": {f: (tmp / f).stat().st_size for f in artifact.files},
            "export_metadata": graph.meta.get("export_metadata", {}),
            "memory": {**memory.report(fp32_weight_bytes(original.gm)),
                       "weights": ("memory-mapped, shared with the reference graph" if reference_outputs is not None
                                   else "in memory")},
        }
        if original.dynamic_batch:
            report["dynamic_batch"] = {"min": dynamic_batch.MIN_BATCH, "max": dynamic_batch.MAX_BATCH,
                                       "example": original.example_batch,
                                       "verified": [b["batch"] for b in verification["batches"]]}
        if auto_table is not None:
            report["auto"] = auto_table
        if "mcu" in report["artifact"]:  # the mcu backend's arena/flash facts: their own section
            report["mcu"] = report["artifact"].pop("mcu")
        backend_plan = report["artifact"].pop("memory_plan", None)  # the backend's own, as compiled
        if graph.meta.get("train_step"):  # the training step's static memory plan
            from .rewrite.memory_plan import memory_report
            report["train_step"] = {k: graph.meta["train_step"][k]
                                    for k in ("optimizer", "loss_fn", "outputs", "captured_after")
                                    if k in graph.meta["train_step"]}
            report["memory_plan"] = backend_plan or {"planner": "graph", **memory_report(graph)}
        write_json(tmp / "report.json", report)
        write_json(tmp / "manifest.json", _manifest(tmp, opts, pipeline, model_file, graph))
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Artifact(out)


def _finish_stream_bp(graph: Graph, original: Graph, tmp: Path, out: Path, opts: CompileOptions, specs,
                      result, model_file, log) -> None:
    """A StreamBP step's files, report and manifest; its check is gradients against autograd."""
    t0 = time.perf_counter()
    step = stream_bp_step.write_step(graph, tmp, result.reports()[-1]["report"], log)
    report = {
        "format_version": FORMAT_VERSION,
        "source": graph.source,
        "backend": "torch",
        "target": "torch-eager-cpu",
        "inputs": _inputs_report(graph),
        "passes": result.reports(),
        "nodes": {"before": original.node_count(), "after": graph.node_count()},
        "parameters": {"before": original.parameter_count(), "after": graph.parameter_count()},
        "verification": step["verification"],
        "latency_ms": {"skipped": "a training step: see benchmarks/stream_bp.py for step times"},
        "build_seconds": round(time.perf_counter() - t0, 3),
        "artifact": {"files": step["files"], "format": step["format"]},
        "sizes": {f: (tmp / f).stat().st_size for f in step["files"]},
        "stream_bp": step["stream_bp"],
    }
    write_json(tmp / "report.json", report)
    write_json(tmp / "manifest.json", _manifest(tmp, opts, specs, model_file, graph))
    replace_dir(tmp, out)


def _inputs_report(graph: Graph) -> list[dict[str, Any]]:
    return [{"name": s.name, "shape": ["B", *s.shape[1:]] if s.dynamic_batch else list(s.shape),
             "dtype": str(s.dtype).removeprefix("torch."), "high": s.high} for s in graph.inputs]


# the compile's timing is a quick look, not a benchmark: a large model (a second or
# more per run) gets a few runs within a budget, not latency_runs of them
LATENCY_BUDGET_S = 5.0
LATENCY_MIN_RUNS = 3
LATENCY_SLOW_RUN_S = 0.5


def _latency(runner, graph: Graph, runs: int) -> dict[str, Any] | None:
    if runs <= 0:
        return None
    inputs = [t.numpy() for t in graph.random_inputs(7)]
    t0 = time.perf_counter()
    runner(*inputs)
    if time.perf_counter() - t0 < LATENCY_SLOW_RUN_S:   # a slow model needs no more warming up
        for _ in range(2):
            runner(*inputs)
    times: list[float] = []
    while len(times) < runs and (len(times) < LATENCY_MIN_RUNS or sum(times) < LATENCY_BUDGET_S * 1e3):
        t0 = time.perf_counter()
        runner(*inputs)
        times.append((time.perf_counter() - t0) * 1e3)
    return {"median": round(statistics.median(times), 4), "min": round(min(times), 4),
            "runs": len(times), "threads": torch.get_num_threads(),
            "note": "quick in-process timing at compile time; use benchmarks/ for comparisons"}


def _manifest(tmp: Path, opts: CompileOptions, specs: list[PassSpec], model_file, graph: Graph) -> dict:
    config = {"passes": [{"name": s.name, "options": s.options} for s in specs],
              "backend": opts.backend,
              # callables (progress hooks) are not configuration
              "backend_options": as_config(opts.backend_options),
              "inputs": [s.describe() for s in graph.inputs], "seed": opts.seed}
    if opts.train is not None:  # a training step: its loss, optimizer and lr are configuration too
        config["train"] = dataclasses.asdict(opts.train)
    versions = {}
    for pkg in ("gradrewrite", "torch", "onnx", "onnxruntime", "onnxruntime-gpu", "onnxscript",
                "apache-tvm", "openvino", "numpy"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    versions["python"] = platform.python_version()
    return {
        "format_version": FORMAT_VERSION,
        "created_unix": int(time.time()),
        "versions": versions,
        "seed": opts.seed,
        "config": config,
        "config_hash": _sha256(json.dumps(config, sort_keys=True, default=str).encode()),
        "inputs": ({str(model_file): _file_hash(Path(model_file))}
                   if model_file and Path(model_file).is_file() else {}),
        "outputs": {str(p.relative_to(tmp)): _file_hash(p)
                    for p in sorted(tmp.rglob("*")) if p.is_file() and p.name != "manifest.json"},
    }


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Artifact:
    """A compiled artifact directory: call it like the model, read its report."""

    def __init__(self, path: str | Path, *, trust_pickle: bool = False):
        self.path = Path(path)
        self.trust_pickle = trust_pickle  # the .pt2 inside is read without running code unless set
        report_path = self.path / "report.json"
        if not report_path.is_file():
            raise GradrewriteError(f"{str(self.path)!r} is not a gradrewrite artifact (no report.json)",
                                   "pass a directory written by `gradrewrite compile`")
        try:
            self.report = json.loads(report_path.read_text())
            self.manifest = json.loads((self.path / "manifest.json").read_text())
        except (json.JSONDecodeError, FileNotFoundError) as exc:
            raise GradrewriteError(f"artifact {str(self.path)!r} is damaged: {exc}",
                                   "compile it again") from exc
        self._runner = None

    @property
    def backend(self) -> str:
        return self.report["backend"]

    def _run(self):
        if self._runner is None:
            for name, digest in self.manifest.get("outputs", {}).items():
                if name not in self.report["artifact"]["files"]:
                    continue
                if not (self.path / name).is_file():
                    raise GradrewriteError(f"artifact file {name!r} is missing from {str(self.path)!r}",
                                           "compile it again (or restore the file)")
                if _file_hash(self.path / name) != digest:
                    raise GradrewriteError(f"artifact file {name!r} changed since it was compiled",
                                           "compile it again")
            if "stream_bp" in self.report:  # a StreamBP step runs through its own runner
                self._runner = stream_bp_step.load_step(self.path, self.report, self.trust_pickle)
            else:
                self._runner = get_backend(self.backend).load(
                    self.path, {**self.report["artifact"], "trust_pickle": self.trust_pickle})
        return self._runner

    def check_inputs(self, inputs: Sequence[np.ndarray]) -> None:
        specs = self.report["inputs"]
        if len(inputs) != len(specs):
            raise GradrewriteError(f"the model takes {len(specs)} input(s), got {len(inputs)}",
                                   "pass one --input per model input: "
                                   + ", ".join(f"{s['name']} {'x'.join(map(str, s['shape']))}:{s['dtype']}" for s in specs))
        batches = {}  # a dynamic dim 0 ("B" in the report) takes any batch, one shared by every input
        for arr, spec in zip(inputs, specs):
            want = spec["shape"]
            dims_ok = arr.ndim == len(want) and all(w == "B" or a == w for a, w in zip(arr.shape, want))
            if not dims_ok or str(arr.dtype) != spec["dtype"]:
                only_batch = (not dims_ok and str(arr.dtype) == spec["dtype"] and arr.ndim == len(want)
                              and list(arr.shape[1:]) == want[1:])
                raise GradrewriteError(
                    f"input {spec['name']!r} is {'x'.join(map(str, arr.shape))}:{arr.dtype}, the artifact was "
                    f"compiled for {'x'.join(map(str, want))}:{spec['dtype']}"
                    + (" (B: any batch)" if want[:1] == ["B"] else ""),
                    "pass an array of that shape and dtype, or compile again with --input"
                    + (" (--dynamic-batch takes any batch size)" if only_batch and want[:1] != ["B"] else ""))
            if want[:1] == ["B"]:
                batches[spec["name"]] = int(arr.shape[0])
        if batches:
            self._check_batch(batches)

    def _check_batch(self, batches: dict[str, int]) -> None:
        if len(set(batches.values())) > 1:
            sizes = ", ".join(f"{k} {v}" for k, v in batches.items())
            raise GradrewriteError(f"the inputs' batch sizes differ ({sizes}); the artifact's dynamic batch is "
                                   "one size shared by every input",
                                   "pass every input with the same first dimension")
        batch, limits = next(iter(batches.values())), self.report.get("dynamic_batch", {})
        low, high = limits.get("min", dynamic_batch.MIN_BATCH), limits.get("max", dynamic_batch.MAX_BATCH)
        if not low <= batch <= high:
            raise GradrewriteError(f"batch {batch} is outside the artifact's dynamic batch range {low}..{high}",
                                   f"split the inputs into batches of at most {high}" if batch > high
                                   else "pass at least one sample")

    def __call__(self, *inputs: Any, labels: Any = None) -> list[np.ndarray]:
        arrays = [x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x) for x in inputs]
        self.check_inputs(arrays)
        if labels is None:
            return as_numpy(self._run()(*arrays))
        if "stream_bp" not in self.report:
            raise ConfigError("--labels applies to stream-bp training artifacts only",
                              "drop --labels (a --train artifact takes its labels as its last --input)")
        return as_numpy(self._run()(*arrays, labels=np.asarray(labels)))

    def train(self, data: str | Path, *, steps: int | None = None, lr: float | None = None,
              save_weights: str | Path | None = None, progress=None, on_start=None):
        """SGD steps of an mcu training-step artifact over ``data`` (.npz: x inputs, y int
        labels), batches in order, on the host build or the firmware under QEMU, per the
        compiled target (``gradrewrite run OUT --train``). Returns the run: ``losses``,
        ``params`` and, with ``save_weights``, the names of the ``saved`` parameters."""
        from .backends.mcu.training import run as train_run

        facts_path = self.path / "mcu" / "model.json"
        facts = json.loads(facts_path.read_text()) if self.backend == "mcu" and facts_path.is_file() else {}
        if not facts.get("train_step"):
            raise ConfigError(f"{str(self.path)!r} is not an mcu training-step artifact",
                              "compile one with `gradrewrite compile MODEL --train --backend mcu`")
        x, y = train_run.load_dataset(data, facts)
        batch = facts["input"]["shape"][0]
        steps = steps if steps is not None else len(x) // batch
        lr = lr if lr is not None else float(facts["lr"])
        train_run.check_run_options(steps, lr, save_weights)
        target = facts.get("target", "host")
        if on_start is not None:
            on_start({"parameters": sum(not p.get("optimizer_state") for p in facts["trained"]), "steps": steps,
                      "batches": len(x) // batch, "batch": batch, "target": target, "lr": lr})
        run = train_run.run_training(self.path / "mcu", facts, x, y, steps, lr, target=target, progress=progress)
        run.trained_bytes = sum(p["bytes"] for p in facts["trained"])
        run.saved = []
        if save_weights:
            weights = train_run.whole_parameters(self.path / "mcu", facts, run.params)
            weights = {k: v for k, v in weights.items()  # parameters, not the momentum buffers
                       if not next(p for p in facts["trained"] if p["path"] == k).get("optimizer_state")}
            train_run.save_weights(save_weights, weights)
            run.saved = list(weights)
        return run

    def __repr__(self) -> str:
        return f"Artifact({str(self.path)!r}, backend={self.backend!r})"
