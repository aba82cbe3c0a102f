"""tvm backend: import into Relax, tune with MetaSchedule, build a shared library.

Pipeline: ``graph.to_exported_program()`` -> core-ATen decomposition -> one check of
every op against TVM's importer (all unsupported ops reported at once, with the layers
using them) -> ``normalize`` (pre-import rewrites for patterns TVM 0.27 miscompiles) ->
``from_exported_program`` -> ``relax_passes.preprocess`` (bounds-safe gathers, batch norm
folded into convolutions, fast math) -> MetaSchedule tuning
(optional, cached) -> ``compile_relax`` -> ``model.so`` + ``tvm_meta.json``.

Quantized graphs: static int8 conv/linear/add chains (``quantize(mode=static)``) become
integer ops before export (``int8_ops``) and int8 x int8 -> int32 Relax compute with
integer requantization at import (``int8_relax``), bit-exact against the mcu backend's
integer reference; weight-only ``groupwise_linear`` layers are dequantized at import into
fp32 weights. ``tvm_meta.json`` / the report's ``quantized`` entry counts both.

A dynamic batch imports as a symbolic dimension; a tuned build adds an entry specialised
to the example batch, because MetaSchedule tunes static shapes (``dynamic_batch``).

Options (``backend_options``):

``target``         ``"auto"`` (CUDA when TVM sees a GPU, else the host CPU), ``"llvm"``, ``"cuda"``
``mcpu``           LLVM CPU name; default: this machine's (``generic`` for a portable library)
``num_cores``      threads MetaSchedule schedules for; default: the cores this process may use
``tune_trials``    MetaSchedule trials for the whole model; 0 = untuned (30-60x slower than
                   ORT on CPU); ``RECOMMENDED_TUNE_TRIALS`` finishes in well under a minute
                   for the example models on 2 cores
``tune_cache``     tuning database root; default ``$GRADREWRITE_CACHE/tvm`` or
                   ``~/.cache/gradrewrite/tvm``
``tune_strategy``  ``"auto"`` (replay-trace below 512 trials, else evolutionary + XGBoost),
                   ``"replay-trace"``, ``"evolutionary"``
``progress``       callable receiving dict events (``start``, ``batch``, ``done``, ``reuse``);
                   the same facts are logged on ``logging.getLogger("gradrewrite.tvm")``
``fold_batchnorm`` fold eval-mode batch norm into the preceding convolution (default True)
``fast_math``      TVM's fast exp/erf/tanh/softmax and a fast-erf GELU (default True; errors
                   stay at fp32-rounding level, see ``relax_passes``)
``seed``           tuning seed (default 0)
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import BackendError
from ...rewrite.graph import Graph
from ..options import as_config, make_options
from ..base import Backend, BackendArtifact, register_backend
from . import dynamic_batch

log = logging.getLogger("gradrewrite.tvm")

RECOMMENDED_TUNE_TRIALS = 64
META_FILE = "tvm_meta.json"
LIB_FILE = "model.so"

def _options(options: Any) -> dict[str, Any]:
    """``TvmOptions`` (backends/options.py: names, types, ranges checked there) as a dict."""
    return as_config(make_options("tvm", options), keep_callables=True)


def _tvm_import_error() -> str | None:
    try:
        import tvm  # noqa: F401
        from tvm import relax  # noqa: F401
    except Exception as exc:  # ImportError, or a broken native library
        return (f"TVM cannot be imported ({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); "
                "pip install apache-tvm apache-tvm-ffi==0.1.14.post0")
    return None


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


@register_backend("tvm")
class TvmBackend(Backend):
    def availability(self) -> str | None:
        return _tvm_import_error()

    # ------------------------------------------------------------------ compile
    def compile(self, graph: Graph, out_dir: Path, *, options: dict[str, Any]) -> BackendArtifact:
        from . import interrupt

        # Ctrl-C in TVM's C++ callbacks surfaces as RuntimeError: remember it (see interrupt)
        with interrupt.watch():
            return self._compile(graph, out_dir, _options(options))

    def _compile(self, graph: Graph, out_dir: Path, opts: dict[str, Any]) -> BackendArtifact:
        from . import tuning
        from .importer import import_graph
        from .relax_passes import preprocess
        from .targets import cpu_count, make_target

        cores = int(opts["num_cores"] or cpu_count())
        target = make_target(opts["target"], mcpu=opts["mcpu"], num_cores=cores)
        kind = str(target.kind.name)

        t0 = time.perf_counter()
        imported = import_graph(graph)

        def pre(m):
            return preprocess(m, fold_batchnorm=bool(opts["fold_batchnorm"]), fast_math=bool(opts["fast_math"]))

        # MetaSchedule tunes static shapes: a dynamic batch is tuned at the example batch (dynamic_batch.py)
        batch = graph.example_batch if opts["tune_trials"] > 0 else None
        mod = pre(dynamic_batch.with_static_entry(imported.mod, batch) if batch else imported.mod)
        tune_mod = pre(dynamic_batch.specialise(imported.mod, batch)) if batch else mod
        import_s = time.perf_counter() - t0

        tuned = None
        if opts["tune_trials"] > 0:
            tuned = tuning.tune(tune_mod, target, trials=opts["tune_trials"], cache_dir=opts["tune_cache"],
                                strategy=opts["tune_strategy"], progress=opts["progress"],
                                seed=int(opts["seed"]), num_cores=cores)
            database = tuned.database
        else:
            log.info("TVM: building untuned (tune_trials=0); on CPU that is 30-60x slower than "
                     "ONNX Runtime, set tune_trials=%d or more", RECOMMENDED_TUNE_TRIALS)
            database = tuning._memory_db()

        t1 = time.perf_counter()
        executable = self._build(mod, target, database, imported)
        try:
            executable.export_library(str(out_dir / LIB_FILE))
        except Exception as exc:
            raise BackendError(f"could not link the TVM library: {_first_line(exc)}",
                               "TVM links model.so with the system C compiler: install gcc/g++") from exc
        build_s = time.perf_counter() - t1

        import tvm

        cpu_target = target.host if target.host is not None else target
        mcpu = str(cpu_target.attrs["mcpu"]) if "mcpu" in cpu_target.attrs else "generic"
        meta = {
            "format": 1,
            "tvm_version": tvm.__version__,
            "target_kind": kind,
            "target": str(target),
            "mcpu": mcpu,
            "num_cores": cores,
            "inputs": [{"name": s.name, "shape": list(s.shape), "dtype": str(s.dtype).removeprefix("torch.")}
                       for s in graph.inputs],
            "tune_trials": opts["tune_trials"],
            "cache_key": tuned.key if tuned else None,
            "tuning": tuned.info() if tuned else None,
            "normalized": imported.normalized,
            "quantized": imported.quantized,
            "fold_batchnorm": bool(opts["fold_batchnorm"]),
            "fast_math": bool(opts["fast_math"]),
            "dynamic_batch": graph.dynamic_batch,
            "static_entry": dynamic_batch.STATIC_ENTRY if batch else None,
        }
        (out_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        info = {k: meta[k] for k in ("tvm_version", "target", "mcpu", "num_cores", "tune_trials", "cache_key",
                                     "tuning", "normalized", "fold_batchnorm", "fast_math")}
        if imported.quantized:
            info["quantized"] = imported.quantized
        if graph.dynamic_batch:
            info["dynamic_batch"] = {"tuned_batch": batch, "note": (
                f"MetaSchedule tunes static shapes: batch {batch} runs the tuned kernels, other batches "
                "TVM's default schedules" if batch else "untuned at every batch")}
        info.update({"aten_ops_imported": imported.aten_ops, "import_seconds": round(import_s, 3),
                     "build_seconds": round(build_s, 3)})
        if not opts["tune_trials"]:
            info["note"] = (f"untuned: set backend option tune_trials (e.g. {RECOMMENDED_TUNE_TRIALS}) "
                            "for usable CPU speed")
        label = f"tvm-{kind}-{mcpu}" if kind == "llvm" else f"tvm-{kind}"
        return BackendArtifact([LIB_FILE, META_FILE], label, info)

    @staticmethod
    def _build(mod, target, database, imported):
        from . import interrupt, tuning
        from .importer import _where
        from .normalize import non_float_arith

        try:
            return tuning.build(mod, target, database)
        except Exception as exc:
            interrupt.raise_if_hit(exc)
            text = str(exc)
            if "MatchesCode" in text:
                suspects = non_float_arith(imported.ep)
                by_op: dict[str, list] = {}
                from ...rewrite.graph import op_name

                for n in suspects:
                    by_op.setdefault(op_name(n), []).append(n)
                named = "; ".join(f"{op} on bool at {_where(ns)}" for op, ns in sorted(by_op.items()))
                raise BackendError(
                    "TVM's LLVM code generator cannot lower arithmetic on a bool/integer tensor "
                    "(Check failed: t.MatchesCode(kDLFloat))" + (f"; likely: {named}" if named else ""),
                    "cast that tensor to float or int64 before the op (e.g. x.long().cumsum()), "
                    "or use --backend ort") from exc
            raise BackendError(f"TVM build failed: {_first_line(exc)}",
                               "use --backend ort / torch, or run with --debug for the traceback") from exc

    # ------------------------------------------------------------------ load
    def load(self, out_dir: Path, artifact: dict[str, Any]):
        reason = _tvm_import_error()
        if reason:
            raise BackendError(f"cannot load the TVM artifact: {reason}")
        import tvm
        from tvm import relax

        try:
            meta = json.loads((out_dir / META_FILE).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise BackendError(f"{META_FILE} is missing or damaged in {str(out_dir)!r}", "compile it again") from exc
        kind = meta.get("target_kind", "llvm")
        if kind == "cuda":
            dev = tvm.cuda(0)
            if not dev.exist:
                raise BackendError("this TVM artifact was built for CUDA and TVM sees no GPU here",
                                   "run it on a GPU machine, or compile again with target=llvm")
        else:
            dev = tvm.cpu(0)
            self._warn_cpu(meta)
        try:
            lib = tvm.runtime.load_module(str(out_dir / LIB_FILE))
            vm = relax.VirtualMachine(lib, dev)
            main = vm["main"]
            static = vm[meta["static_entry"]] if meta.get("static_entry") else None
        except Exception as exc:
            raise BackendError(f"cannot load {LIB_FILE}: {_first_line(exc)}",
                               "it was built by another TVM version or for another machine; compile it again") from exc
        names = [i["name"] for i in meta.get("inputs", [])]
        example = [tuple(i["shape"]) for i in meta.get("inputs", [])]

        def run(*inputs: np.ndarray) -> list[np.ndarray]:
            if names and len(inputs) != len(names):
                raise BackendError(f"the model takes {len(names)} inputs ({', '.join(names)}), got {len(inputs)}",
                                   "pass one --input per model input")
            # a dynamic-batch library: its tuned, batch-specialised entry when the shapes fit
            fn = static if static is not None and [np.shape(x) for x in inputs] == example else main
            return _flatten(fn(*[_device_tensor(x, dev) for x in inputs]))

        run.vm = vm  # for benchmarks: vm.time_evaluator("main", dev)
        return run

    @staticmethod
    def _warn_cpu(meta: dict[str, Any]) -> None:
        mcpu = meta.get("mcpu") or "generic"
        if mcpu == "generic":
            return
        try:
            from .targets import host_cpu

            here = host_cpu()
        except Exception:
            return
        if here != mcpu:
            log.warning("TVM artifact was built for CPU %r, this machine is %r: it may fail with an "
                        "illegal instruction (compile with mcpu='generic' for a portable library)", mcpu, here)


_DLPACK_CPU = 1     # kDLCPU
_TVM_ALIGN = 64     # bytes; TVM refuses to share a less aligned buffer


def _device_tensor(x, dev):
    """``x`` as a TVM tensor on ``dev``: a CPU array TVM can read in place (C-contiguous,
    64-byte aligned, writable) is shared through DLPack; anything else is copied. The VM
    never writes its inputs. Sharing saved 10 us per small-CNN call (0.153 -> 0.143 ms,
    side by side)."""
    import tvm

    a = np.ascontiguousarray(np.asarray(x))
    if dev.dlpack_device_type() == _DLPACK_CPU and a.ctypes.data % _TVM_ALIGN == 0 and a.flags.writeable:
        try:
            return tvm.runtime.from_dlpack(a)
        except Exception:  # noqa: BLE001 - a dtype DLPack cannot carry: copy instead
            pass
    return tvm.runtime.tensor(a, dev)


def _flatten(value) -> list[np.ndarray]:
    """VM results (a tensor or nested tuples of them) -> flat list of numpy arrays."""
    import tvm

    if isinstance(value, tvm.runtime.Tensor):
        return [value.numpy()]
    if isinstance(value, (list, tuple)) or type(value).__name__ == "Array":
        out: list[np.ndarray] = []
        for item in value:
            out.extend(_flatten(item))
        return out
    if value is None:
        return []
    return [np.asarray(value)]


__all__ = ["TvmBackend", "RECOMMENDED_TUNE_TRIALS"]
