"""capture -> passes -> backend -> artifact directory.

``compile_graph`` writes OUT atomically: everything is built in a temporary sibling
directory that is renamed into place only when the build and its verification
succeeded, so a failure never leaves half an OUT behind.
"""
from __future__ import annotations

import hashlib
import json
import platform
import shutil
import statistics
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from . import auto_select
from .backends.base import as_numpy, get_backend
from .errors import ConfigError, GradrewriteError, VerificationError
from .outputs import check_out_free, make_build_dir, replace_dir
from .rewrite import dynamic_batch
from .rewrite.graph import Graph
from .rewrite.pass_manager import DumpGraphs, Instrument, PassManager, VerifyEachPass
from .rewrite.pipeline import PassSpec, build_passes, load_recipe, parse_pipeline
from .rewrite.registry import PassContext
from .rewrite.verify import verify

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
    backend_options: dict[str, Any] = field(default_factory=dict)
    force: bool = False
    calibration: Any = None  # samples for passes that observe data (see rewrite/calibration.py)


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


def compile_graph(graph: Graph, out: str | Path, options: CompileOptions | None = None, *,
                  model_file: str | Path | None = None, console=None) -> "Artifact":
    """Rewrite ``graph`` with the pipeline, lower it with the backend, write OUT."""
    opts = options or CompileOptions()
    out = Path(out)
    check_out_free(out, opts.force)
    if graph.dynamic_batch:
        dynamic_batch.refuse(backend=opts.backend)
    specs = pipeline_specs(opts.passes, opts.recipe)
    passes = build_passes(specs)              # typos fail before any work
    auto = opts.backend == auto_select.AUTO
    if auto:
        auto_select.split_options(opts.backend_options)
    backend = None if auto else get_backend(opts.backend)

    tmp = make_build_dir(out)
    try:
        log = console.log if console is not None else (lambda *a, **k: None)
        original = graph.clone()
        instruments: list[Instrument] = []
        if opts.verify_each_pass:
            instruments.append(VerifyEachPass(n_inputs=2, seed=opts.seed, rel_tol=opts.rel_tol))
        if opts.dump_graphs:
            instruments.append(DumpGraphs(tmp / "graphs"))
        if console is not None:
            from .rewrite.pass_manager import Progress
            instruments.append(Progress(console))
        progress = None
        if console is not None and opts.calibration is not None:
            from .rewrite.calibration import ConsoleProgress
            progress = ConsoleProgress(console)
        result = PassManager(passes, instruments).run(
            graph, PassContext(seed=opts.seed, calibration=opts.calibration, progress=progress))

        if graph.meta.get("pending_training"):
            kind = graph.meta["pending_training"]
            raise ConfigError(f"the graph still holds {kind} training rewrites, which no backend lowers",
                              f"train it first, then end the pipeline with the pass that bakes them "
                              f"(e.g. {'nm-finalize' if kind == 'nm-sparsity' else 'its finalize pass'})")
        exact = all(getattr(p, "exact", True) for p in passes)
        t0 = time.perf_counter()
        auto_table = None
        if auto:  # build, verify and time every backend; the winner's files end up in tmp
            chosen = auto_select.select(graph, original, tmp, opts, exact=exact, log=log)
            backend, artifact, auto_table = chosen.backend, chosen.artifact, chosen.table
        else:
            log(f"lowering with backend [bold]{backend.name}[/] …")
            artifact = backend.compile(graph, tmp, options=opts.backend_options)
        build_seconds = time.perf_counter() - t0

        # Files passes left for deployment (e.g. N:M masks) ship with every backend.
        for name, data in graph.meta.get("export_files", {}).items():
            (tmp / name).write_bytes(data)
            artifact.files.append(name)
        if auto:
            runner, verification = chosen.runner, chosen.verification
        else:
            runner = backend.load(tmp, {"files": artifact.files})
            # a training step's passes change what it returns (the trained parameters):
            # its artifact is checked against the rewritten step itself
            verification = _verify_artifact(runner, graph if graph.meta.get("train_step") else original,
                                            opts)
        if original.dynamic_batch:  # the traced batch is checked; other batches must agree too
            verification = _verify_other_batches(runner, original, opts, verification)
        # a training step is compared with the rewritten step, so lossy passes do not
        # excuse the backend: its lowering must be exact
        exact = exact or bool(graph.meta.get("train_step"))
        # a backend may widen the tolerance for what it computes at lower precision by
        # design (the mcu int8 training step, itself checked bit for bit elsewhere)
        rel_tol = max(opts.rel_tol, artifact.info.get("rel_tol", 0.0))
        if exact and verification["relative_error"] > rel_tol:
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

        (tmp / "graph_before.txt").write_text(original.text())
        (tmp / "graph_after.txt").write_text(graph.text())
        report = {
            "format_version": FORMAT_VERSION,
            "source": graph.source,
            "backend": backend.name,
            "target": artifact.target,
            "inputs": [{"name": s.name, "shape": ["B", *s.shape[1:]] if s.dynamic_batch else list(s.shape),
                        "dtype": str(s.dtype).removeprefix("torch."), "high": s.high}
                       for s in graph.inputs],
            "passes": result.reports(),
            "nodes": {"before": original.node_count(), "after": graph.node_count()},
            "ops": {"before": original.op_histogram(), "after": graph.op_histogram()},
            "parameters": {"before": original.parameter_count(), "after": graph.parameter_count()},
            "verification": {**verification, "checked": exact,
                             "tolerance": rel_tol if exact else None},
            "latency_ms": latency,
            "build_seconds": round(build_seconds, 3),
            "artifact": {"files": artifact.files, **artifact.info},
            "sizes": {f: (tmp / f).stat().st_size for f in artifact.files},
            "export_metadata": graph.meta.get("export_metadata", {}),
        }
        if original.dynamic_batch:
            report["dynamic_batch"] = {"min": dynamic_batch.MIN_BATCH, "max": dynamic_batch.MAX_BATCH,
                                       "example": original.example_batch,
                                       "verified": [b["batch"] for b in verification["batches"]]}
        if auto_table is not None:
            report["auto"] = auto_table
        if "mcu" in report["artifact"]:  # the mcu backend's arena/flash facts: their own section
            report["mcu"] = report["artifact"].pop("mcu")
        if graph.meta.get("train_step"):  # the training step's static memory plan
            from .rewrite.memory_plan import memory_report
            report["train_step"] = {k: graph.meta["train_step"][k]
                                    for k in ("optimizer", "loss_fn", "outputs", "captured_after")
                                    if k in graph.meta["train_step"]}
            report["memory_plan"] = memory_report(graph)
        _write_json(tmp / "report.json", report)
        _write_json(tmp / "manifest.json", _manifest(tmp, opts, specs, model_file, graph))
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Artifact(out)


def _verify_artifact(runner, reference: Graph, opts: CompileOptions, batch: int | None = None) -> dict[str, Any]:
    """The artifact (numpy in/out) against the original graph, on fresh seeded inputs
    (offset from the per-pass checks' seeds); ``batch``: another size of a dynamic batch."""
    def run(*inputs: torch.Tensor) -> list[torch.Tensor]:
        return [torch.from_numpy(np.asarray(o)) for o in runner(*(t.numpy() for t in inputs))]

    try:
        return verify(run, reference, reference, n_inputs=opts.verify_inputs,
                      seed=opts.seed + 1000, batch=batch).as_dict()
    except ValueError as exc:
        raise VerificationError(f"artifact outputs do not match the model's: {exc}",
                                "this is a backend bug; use --backend torch") from exc


def _verify_other_batches(runner, reference: Graph, opts: CompileOptions, first: dict[str, Any]) -> dict[str, Any]:
    """A dynamic-batch artifact checked at each of ``verify_batches``: the worst error
    over all of them, and one row per batch."""
    batches = dynamic_batch.verify_batches(reference.example_batch)
    rows = [{"batch": batches[0], **first}]
    rows += [{"batch": b, **_verify_artifact(runner, reference, opts, batch=b)} for b in batches[1:]]
    worst = {k: max(r[k] for r in rows) for k in ("max_abs_error", "relative_error", "max_abs_reference")}
    keep = ("batch", "inputs_compared", "max_abs_error", "relative_error")
    return {**first, **worst, "inputs_compared": sum(r["inputs_compared"] for r in rows),
            "batches": [{k: r[k] for k in keep} for r in rows]}


def _latency(runner, graph: Graph, runs: int) -> dict[str, Any] | None:
    if runs <= 0:
        return None
    inputs = [t.numpy() for t in graph.random_inputs(7)]
    for _ in range(3):
        runner(*inputs)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        runner(*inputs)
        times.append((time.perf_counter() - t0) * 1e3)
    return {"median": round(statistics.median(times), 4), "min": round(min(times), 4),
            "runs": runs, "threads": torch.get_num_threads(),
            "note": "quick in-process timing at compile time; use benchmarks/ for comparisons"}


def _manifest(tmp: Path, opts: CompileOptions, specs: list[PassSpec], model_file, graph: Graph) -> dict:
    config = {"passes": [{"name": s.name, "options": s.options} for s in specs],
              "backend": opts.backend,
              # callables (progress hooks) are not configuration
              "backend_options": _config_options(opts.backend_options),
              "inputs": [s.describe() for s in graph.inputs], "seed": opts.seed}
    versions = {}
    for pkg in ("gradrewrite", "torch", "onnx", "onnxruntime", "onnxruntime-gpu", "onnxscript",
                "apache-tvm", "numpy"):
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


def _config_options(options: dict[str, Any]) -> dict[str, Any]:
    """Backend options minus callables (progress hooks); auto nests them per backend."""
    return {k: _config_options(v) if isinstance(v, dict) else v
            for k, v in options.items() if not callable(v)}


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    return str(obj)


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
            if "stream_bp" in self.report:  # a StreamBP training step, run here (backends import no pass)
                from .passes.stream_bp.train_artifact import load_step
                self._runner = load_step(self.path, self.report, self.trust_pickle)
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

    def __repr__(self) -> str:
        return f"Artifact({str(self.path)!r}, backend={self.backend!r})"
