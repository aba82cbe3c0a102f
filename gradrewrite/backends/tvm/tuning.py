"""MetaSchedule tuning with a persistent, content-keyed database.

Flow: the Relax module is legalized and fused exactly as ``compile_relax`` will do it,
the fused TIR functions become tasks, every computing task gets a first batch once the
budget holds 2 trials per task (below that only the heaviest, weight x FLOPs, are tuned;
see ``trials_floor``), light CPU tasks are searched single-threaded (``space_generator``),
and the records land in a JSON database under the cache directory::

    <tune_cache>/<key>/database_workload.json
    <tune_cache>/<key>/database_tuning_record.json
    <tune_cache>/<key>/database_checked.txt  # records whose kernel passed kernel_check
    <tune_cache>/<key>/tuning.json          # trials done so far, tasks, history
    <tune_cache>/<key>/logs/                 # MetaSchedule's per-task logs

``key`` hashes the TVM version, the target, the search recipe (``RECIPE``) and the TIR
text of *every* task of the model, so any compile of the same workload on the same target
(other weights included: weights are not part of the TIR) finds it. A compile asking for no more trials than
``tuning.json`` records runs zero new trials; asking for more tunes only the difference.

A record is never used before its kernel was checked against the untuned one on random
data (``kernel_check``: TVM 0.27 generates some wrong kernels). Ctrl-C stops tuning
promptly (``interrupt``): the workers are ended, the trials measured so far are kept in
the database (``_salvage``) and count as done, and ``KeyboardInterrupt`` propagates.

Speed on small CPUs (measured on 2 loaded cores): MetaSchedule's stock setup spends
~35 s per task before the first measurement. Three things remove most of it:

* candidates are built in one long-lived worker process (``candidate_builder``): the stock
  ``LocalBuilder`` starts a fresh worker pool for every batch, and each worker imports all
  of TVM's tensor intrinsics (20-30 s here, mostly the CUDA ones);
* the tensor-intrinsic modules for other hardware are installed as lazy stubs before
  MetaSchedule imports them (``lazy_intrinsics``); the real module loads on first use;
* small budgets use ``replay-trace`` sampling with no cost model instead of evolutionary
  search with XGBoost (512-candidate populations and model training per batch cost
  more than the measurements they save when each task gets only a few trials).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.machinery
import importlib.util
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ...errors import BackendError, ConfigError
from . import interrupt

log = logging.getLogger("gradrewrite.tvm")

STRATEGIES = ("auto", "replay-trace", "evolutionary")
EVOLUTIONARY_FROM = 512        # "auto" switches to evolutionary search + XGBoost at this budget
MIN_TRIALS_PER_TASK = 4
SERIAL_BELOW_FLOPS = 4e6       # CPU tasks lighter than this (per call) get single-threaded schedules
RECIPE = 2                     # bump when the search itself changes: old caches then do not match
MAX_TRIALS_PER_ITER = 64
FLOP_COVERAGE = 0.99           # tune the heaviest tasks that together hold this share of the work

Progress = Callable[[dict[str, Any]], None]


# --------------------------------------------------------------------------- cache location
def default_cache_dir() -> Path:
    """``$GRADREWRITE_CACHE/tvm`` if that variable is set, else ``~/.cache/gradrewrite/tvm``."""
    root = os.environ.get("GRADREWRITE_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "gradrewrite") / "tvm"


# --------------------------------------------------------------------------- lazy intrinsics
_INTRIN_PKG = "tvm.s_tir.tensor_intrin"
_INTRIN_FOR = {"cuda": "cuda", "rocm": "rocm", "metal": "metal", "hexagon": "hexagon"}


class _LazyModule(types.ModuleType):
    """Stands in for a tensor-intrinsic module until something reads a name from it."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(_load_real(self.__name__), name)


def _load_real(fullname: str) -> types.ModuleType:
    current = sys.modules.get(fullname)
    if current is not None and not isinstance(current, _LazyModule):
        return current
    pkg_name, _, short = fullname.rpartition(".")
    pkg = importlib.import_module(pkg_name)
    spec = importlib.machinery.PathFinder.find_spec(fullname, list(pkg.__path__))
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot find {fullname}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[fullname] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        if current is not None:
            sys.modules[fullname] = current
        raise
    setattr(pkg, short, module)
    return module


def lazy_intrinsics(target) -> None:
    """Defer importing tensor intrinsics of hardware other than ``target``'s.

    Only acts before TVM's intrinsic package is first imported; the modules the target
    needs are loaded for real. Set ``GRADREWRITE_TVM_LAZY_INTRINSICS=0`` to turn it off.
    """
    needed = _INTRIN_FOR.get(str(target.kind.name))
    if os.environ.get("GRADREWRITE_TVM_LAZY_INTRINSICS", "1") != "0" and _INTRIN_PKG not in sys.modules:
        machine = platform.machine().lower()
        host = "arm_cpu" if machine.startswith(("arm", "aarch")) else (
            "riscv_cpu" if machine.startswith("riscv") else "x86")
        for short in ("cuda", "rocm", "metal", "hexagon", "arm_cpu", "riscv_cpu"):
            name = f"{_INTRIN_PKG}.{short}"
            if short not in (host, needed) and name not in sys.modules:
                sys.modules[name] = _LazyModule(name)
    importlib.import_module(_INTRIN_PKG)
    if needed:
        _load_real(f"{_INTRIN_PKG}.{needed}")


# --------------------------------------------------------------------------- relax pipeline
def fuse_passes(target) -> list:
    """Legalize + fuse, as ``meta_schedule.relax_integration.compile_relax`` does it
    (the database is keyed by the fused TIR, so extraction must match the build)."""
    from tvm import relax
    from tvm.relax import pipeline as rp

    try:
        dispatch = list(rp.library_dispatch_passes(target))
    except (ValueError, AttributeError):
        dispatch = []
    return [*dispatch, relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(), relax.transform.FuseOps(), relax.transform.FuseTIR()]


def fused(mod, target):
    import tvm

    with target, tvm.transform.PassContext(opt_level=3):
        return tvm.transform.Sequential(fuse_passes(target))(mod)


@dataclass
class Task:
    name: str
    weight: int
    flops: float
    digest: str           # sha256 of the task's TIR text
    extracted: Any        # meta_schedule ExtractedTask

    @property
    def cost(self) -> float:
        return self.weight * self.flops


def extract_tasks(mod, target) -> list[Task]:
    """The model's tuning tasks, heaviest (weight x FLOPs) first."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.analysis import estimate_tir_flops

    tasks = []
    for t in ms.relax_integration.extract_tasks(fused(mod, target), target):
        prim = t.dispatched[0]
        try:
            flops = float(estimate_tir_flops(prim))
        except Exception:
            flops = 0.0
        digest = hashlib.sha256(prim.script().encode()).hexdigest()
        tasks.append(Task(str(t.task_name), int(t.weight), flops, digest, t))
    tasks.sort(key=lambda t: (-t.cost, -t.weight, t.name))
    return tasks


def cache_key(tasks: list[Task], target) -> str:
    import tvm

    blob = json.dumps({"tvm": tvm.__version__, "target": str(target), "recipe": RECIPE,
                       "tasks": sorted(t.digest for t in tasks)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def plan(tasks: list[Task], trials: int, min_per_task: int = MIN_TRIALS_PER_TASK) -> tuple[list[Task], int]:
    """The tasks worth ``trials`` and the batch size per round.

    ``tune`` passes ``min_per_task=trials_floor(tasks, trials)``.

    With a budget of ``2 * min_per_task`` per task, every task that computes
    (FLOPs > 0; pure copies are left alone) is tuned: FLOPs undercount elementwise
    tasks with transcendental math (a fused GELU or softmax can cost more than a matmul
    twice its FLOPs once the matmuls are tuned). With less, the heaviest tasks (weight x
    FLOPs) are taken until they hold ``FLOP_COVERAGE`` of the work or each would get
    fewer than ``min_per_task``. The first round uses at most half the budget;
    MetaSchedule's gradient scheduler spends the rest where latency still drops.
    """
    work = [t for t in tasks if t.cost > 0] or list(tasks)
    if not work or trials <= 0:
        return [], 0
    if trials >= 2 * min_per_task * len(work):
        chosen = list(work)
    else:
        total = sum(t.cost for t in work) or 1.0
        limit = max(1, trials // min_per_task)
        chosen, covered = [], 0.0
        for t in work:
            if len(chosen) >= limit or covered / total >= FLOP_COVERAGE:
                break
            chosen.append(t)
            covered += t.cost
    per_iter = max(min(min_per_task, trials), min(MAX_TRIALS_PER_ITER, trials // (2 * len(chosen))))
    return chosen, per_iter


def trials_floor(tasks: list[Task], trials: int) -> int:
    """Fewest trials a chosen task gets: 1 once the budget holds 2 per computing task, so
    every one of them is tuned; below that ``MIN_TRIALS_PER_TASK`` on the heaviest few.

    A task left out is built unscheduled (one thread, no vectorization), which costs more
    than the trials the heavy tasks give up for it (MobileNetV2-0.35 b1, 64 trials, side by
    side with all else equal: 16 of 32 tasks tuned 3.25 ms, all 32 tuned 2.64 ms).
    """
    work = [t for t in tasks if t.cost > 0] or list(tasks)
    return 1 if work and trials >= 2 * len(work) else MIN_TRIALS_PER_TASK


# --------------------------------------------------------------------------- tuning
@dataclass
class TuneResult:
    key: str
    work_dir: Path
    database: Any
    trials_requested: int
    trials_recorded: int          # trials in the cache for this workload after this run
    new_trials: int               # measured in this run (0 = reused the cache)
    tasks_total: int
    tasks_tuned: list[str] = field(default_factory=list)
    strategy: str = ""
    seconds: float = 0.0
    records: int = 0
    kernel_checks: dict[str, Any] = field(default_factory=dict)   # kernel_check.add_stats

    def info(self) -> dict[str, Any]:
        return {"cache_key": self.key, "cache_dir": str(self.work_dir),
                "trials_requested": self.trials_requested, "trials_recorded": self.trials_recorded,
                "new_trials": self.new_trials, "reused_cache": self.new_trials == 0 and self.trials_recorded > 0,
                "tasks": self.tasks_total, "tasks_tuned": self.tasks_tuned, "strategy": self.strategy,
                "tuning_seconds": round(self.seconds, 2), "records": self.records,
                "kernel_checks": self.kernel_checks}


def _emit(progress: Progress | None, event: dict[str, Any]) -> None:
    if progress is not None:
        try:
            progress(event)
        except Exception:  # a broken progress hook must not kill a long tune
            log.debug("progress callback failed", exc_info=True)


@contextlib.contextmanager
def _locked(path: Path):
    """One tuner per cache entry at a time (a JSON database is not safe to share)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            import fcntl

            fcntl.flock(fh, fcntl.LOCK_EX)
        except (ImportError, OSError):
            pass
        yield


def _read_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _write_state(path: Path, state: dict[str, Any]) -> None:
    _write_atomic(path, json.dumps(state, indent=2) + "\n")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


RECORDS = "database_tuning_record.json"
NEW_RECORDS = "database_tuning_record.new.json"   # this session's commits, merged into RECORDS after


def open_database(work_dir: Path, stats: dict | None = None, name: Callable[[Any], str] | None = None):
    """The tuning database in ``work_dir``, loaded one record at a time, with every record a
    build would use checked against the untuned kernel (``kernel_check.vet``).

    ``JSONDatabase`` would replay every record on its workload in parallel when it opens,
    and with TVM 0.27 that replay is not safe: it failed 1 in 8 opens of a 508-record
    MobileNetV2 database on records that replay one by one ("unordered_map::at", "old_outputs
    .size() == new_outputs.size()"), and once crashed the process. So the database is opened
    on an empty record file (``NEW_RECORDS``, which then receives what tuning commits) and the
    stored records are replayed here, serially. Records that do not replay on their own
    workload (evolutionary search can commit such a record: a mutated
    ``SampleComputeLocation`` decision beside postprocessing steps recorded for the old
    location) are dropped, and so are records whose kernel computes something else; the
    file is then rewritten without them. Call ``close_database`` after tuning to merge the
    new records in. ``stats`` collects the kernel checks' counts and time, ``name`` (workload
    -> task name) labels their warnings.
    """
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.database import TuningRecord, Workload

    from .kernel_check import vet

    close_database(work_dir)               # records a crashed or interrupted run left behind
    fresh = work_dir / NEW_RECORDS
    fresh.write_text("")
    workload_path = work_dir / "database_workload.json"
    try:
        db = ms.database.JSONDatabase(path_workload=str(workload_path), path_tuning_record=str(fresh),
                                      module_equality="structural")
        workloads = [db.commit_workload(Workload.from_json(json.loads(line)).mod)
                     for line in workload_path.read_text().splitlines() if line.strip()]
    except Exception as exc:  # noqa: BLE001 - TVM raises RuntimeError/TVMError subclasses
        first = str(exc).strip().splitlines()
        raise BackendError(f"cannot open the TVM tuning database in {str(work_dir)!r}: "
                           f"{first[-1] if first else type(exc).__name__}",
                           f"delete {str(work_dir)!r} to start that workload's tuning over") from exc
    records_path = work_dir / RECORDS
    lines = [ln for ln in records_path.read_text().splitlines() if ln.strip()] if records_path.exists() else []
    entries = []
    for line in lines:
        try:
            index, body = json.loads(line)
            entries.append((line, index, TuningRecord.from_json(body, workloads[index])))
        except Exception:  # noqa: BLE001 - a bad record, whatever TVM calls the failure
            continue
    drop = vet(work_dir, entries, workloads, stats, name)
    kept = []
    for pos, (line, _, record) in enumerate(entries):
        if pos in drop:
            continue
        try:
            db.commit_tuning_record(record)
        except Exception:  # noqa: BLE001
            continue
        kept.append(line)
    fresh.write_text("")                   # the commits above were copies of RECORDS
    if len(kept) < len(lines):
        if len(lines) - len(kept) > len(drop):     # the wrong ones were reported by vet
            log.warning("TVM tuning: dropped %d record(s) that do not replay from %s",
                        len(lines) - len(kept) - len(drop), work_dir)
        _write_atomic(records_path, "".join(line + "\n" for line in kept))
    return db


def close_database(work_dir: Path) -> None:
    """Append the records tuning committed to ``NEW_RECORDS`` to ``RECORDS``."""
    fresh = work_dir / NEW_RECORDS
    if not fresh.exists():
        return
    new = [ln for ln in fresh.read_text().splitlines() if ln.strip()]
    if new:  # a line cut short by a crash here is dropped as unreadable at the next open
        with (work_dir / RECORDS).open("a") as f:
            f.write("".join(line + "\n" for line in new))
    fresh.unlink()


def tune(mod, target, *, trials: int, cache_dir: str | Path | None = None, strategy: str = "auto",
         progress: Progress | None = None, seed: int = 0, num_cores: int | None = None) -> TuneResult:
    """Tune ``mod`` (preprocessed Relax) for ``target``; reuse the cache when it holds enough."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown tune_strategy {strategy!r}", f"valid strategies: {', '.join(STRATEGIES)}")
    strategy_used = strategy if strategy != "auto" else (
        "evolutionary" if trials >= EVOLUTIONARY_FROM else "replay-trace")
    _check_tuning_deps(xgboost=strategy_used == "evolutionary")
    lazy_intrinsics(target)

    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    tasks = extract_tasks(mod, target)
    key = cache_key(tasks, target)
    work_dir = cache / key
    try:
        (work_dir / "logs").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BackendError(f"cannot create the TVM tuning cache {str(work_dir)!r}: {exc.strerror or exc}",
                           "pass backend option tune_cache=DIR (a writable directory) or set GRADREWRITE_CACHE") from exc
    t0 = time.perf_counter()
    with interrupt.watch(), _locked(work_dir / ".lock"):
        state_path = work_dir / "tuning.json"
        state = _read_state(state_path)
        done = int(state.get("trials", 0))
        chosen, per_iter = plan(tasks, trials, trials_floor(tasks, trials))
        wanted = trials - done
        checks: dict[str, Any] = {}
        name_of = _namer(tasks)
        if not chosen:
            log.info("TVM tuning: the model has no tunable tasks")
            return TuneResult(key, work_dir, _memory_db(), trials, 0, 0, len(tasks), [], "none",
                              time.perf_counter() - t0, 0)
        if wanted <= 0:
            log.info("TVM tuning: reusing %s (%d trials recorded, %d asked)", work_dir, done, trials)
            _emit(progress, {"event": "reuse", "cache_dir": str(work_dir), "trials_recorded": done,
                             "trials": trials})
            db = open_database(work_dir, checks, name_of)
            close_database(work_dir)
            return TuneResult(key, work_dir, db, trials, done, 0, len(tasks), list(state.get("tasks_tuned", [])),
                              state.get("strategy", ""), time.perf_counter() - t0, _count(db), checks)
        db = open_database(work_dir, checks, name_of)
        counter = _Counter(chosen, wanted, progress)
        share = sum(t.cost for t in chosen) / (sum(t.cost for t in tasks) or 1.0)
        log.info("TVM tuning: %d trials over %d of %d tasks (%.0f%% of the FLOPs), %s, cache %s",
                 wanted, len(chosen), len(tasks), 100 * share, strategy_used, work_dir)
        _emit(progress, {"event": "start", "trials": wanted, "tasks": [t.name for t in chosen],
                         "tasks_total": len(tasks), "flop_share": share, "strategy": strategy_used,
                         "cache_dir": str(work_dir)})
        finished = False
        try:
            _run_tuner(chosen, work_dir, db, wanted, per_iter, strategy_used, counter, seed, num_cores, checks)
            finished = True
        except BackendError:
            raise
        except Exception as exc:
            interrupt.raise_if_hit(exc)    # TVM's C++ turned the KeyboardInterrupt into this
            first = str(exc).strip().splitlines()
            raise BackendError(f"MetaSchedule tuning failed: {type(exc).__name__}: {first[-1] if first else ''}",
                               "retry with tune_trials=0 (untuned) or see the logs in " + str(work_dir / "logs")) from exc
        finally:
            with interrupt.deferred():     # a second Ctrl-C must not cut the merge short
                close_database(work_dir)   # keep what was measured, even from a failed run
                if finished or (interrupt.hit() and counter.measured):
                    # Interrupted: the trials measured count as done, so asking again for the
                    # same budget tunes only the rest.
                    _save_state(state_path, state, str(target), trials if finished else done + counter.measured,
                                counter, chosen, strategy_used, time.perf_counter() - t0, interrupted=not finished)
        interrupt.raise_if_hit()           # a Ctrl-C during that cleanup
        log.info("TVM tuning: %d trials in %.0f s", counter.measured, time.perf_counter() - t0)
        db = open_database(work_dir, checks, name_of)   # the new records checked; what the build uses
        close_database(work_dir)
        seconds = time.perf_counter() - t0
        _emit(progress, {"event": "done", "trials": counter.measured, "seconds": seconds})
        return TuneResult(key, work_dir, db, trials, trials, counter.measured, len(tasks),
                          _tuned(state, chosen), strategy_used, seconds, _count(db), checks)


def _tuned(state: dict[str, Any], chosen: list[Task]) -> list[str]:
    return sorted(set(state.get("tasks_tuned", [])) | {t.name for t in chosen})


def _save_state(path: Path, state: dict[str, Any], target: str, trials: int, counter: "_Counter",
                chosen: list[Task], strategy: str, seconds: float, *, interrupted: bool) -> None:
    import tvm

    entry = {"trials": counter.measured, "seconds": round(seconds, 1), "strategy": strategy,
             "unix": int(time.time())}
    if interrupted:
        entry["interrupted"] = True
    # The budget counts as spent even when MetaSchedule measured fewer (a task's search
    # space ran out): asking again for the same budget would find nothing new.
    _write_state(path, {"tvm": tvm.__version__, "target": target, "trials": trials,
                        "measured": int(state.get("measured", 0)) + counter.measured,
                        "tasks_tuned": _tuned(state, chosen), "strategy": strategy,
                        "history": list(state.get("history", [])) + [entry]})


def _namer(tasks: list[Task]):
    """Workload -> task name, for messages (matched structurally, only when asked)."""
    def name(workload) -> str:
        from tvm_ffi import structural_equal

        for t in tasks:
            if structural_equal(t.extracted.dispatched[0], workload.mod):
                return t.name
        return "a workload of another model"
    return name


def _count(db) -> int:
    try:
        return len(db.get_all_tuning_records())
    except Exception:
        return 0


def _memory_db():
    from tvm.s_tir import meta_schedule as ms

    return ms.database.MemoryDatabase()


def _check_tuning_deps(*, xgboost: bool) -> None:
    missing = []
    needed = [("psutil", "psutil"), ("cloudpickle", "cloudpickle")] + ([("xgboost", "xgboost-cpu")] if xgboost else [])
    for mod, pkg in needed:
        try:
            importlib.import_module(mod)
        except ImportError:
            missing.append(pkg)
    if missing:
        raise BackendError(f"TVM tuning (MetaSchedule) needs {', '.join(missing)}",
                           f"pip install {' '.join(missing)}, or pass tune_trials=0")


def _run_tuner(chosen: list[Task], work_dir: Path, db, trials: int, per_iter: int, strategy: str,
               counter: "_Counter", seed: int, num_cores: int | None, checks: dict[str, Any]) -> None:
    from tvm.s_tir import meta_schedule as ms

    from .kernel_check import Checker, add_stats, committing_callback
    from .targets import cpu_count

    cores = num_cores or cpu_count()
    loggers = _task_loggers(work_dir / "logs", [t.name for t in chosen])
    # The task scheduler logs its tables on "tvm.s_tir.meta_schedule.*": into the log file.
    ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
    saved = (ms_logger.propagate, ms_logger.level)
    ms_handler = logging.FileHandler(work_dir / "logs" / "task_scheduler.log")
    ms_handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] %(message)s", "%Y-%m-%d %H:%M:%S"))
    ms_logger.addHandler(ms_handler)
    ms_logger.propagate = False
    ms_logger.setLevel(logging.INFO)
    contexts, weights = [], []
    builder, runner = candidate_builder(budget=counter), None
    scheduler = ms.task_scheduler.TaskScheduler.create("gradient")
    checker = Checker(builder.worker)
    try:
        for i, (task, logger) in enumerate(zip(chosen, loggers)):
            if strategy == "evolutionary":
                search = ms.search_strategy.EvolutionarySearch(population_size=256, genetic_num_iters=3)
            else:
                search = ms.search_strategy.ReplayTrace()
            contexts.append(ms.TuneContext(mod=task.extracted.dispatched[0], target=task.extracted.target,
                                           space_generator=space_generator(task, task.extracted.target),
                                           search_strategy=search,
                                           task_name=task.name, logger=logger, rand_state=seed + i,
                                           num_threads=cores).clone())
            weights.append(float(task.weight))
        xgb = (ms.cost_model.XGBModel(num_tuning_cores=cores, early_stopping_rounds=10)
               if strategy == "evolutionary" else None)
        cost_model = xgb or ms.cost_model.CostModel.create("random")
        # MetaSchedule's AddToDatabase and UpdateCostModel, with tuned kernels checked first
        callbacks = [committing_callback(db, xgb, work_dir, work_dir / NEW_RECORDS, checker, _Counter.SKIPPED,
                                         counter.committed),
                     ms.measure_callback.RemoveBuildArtifact()]
        runner = ms.runner.LocalRunner(timeout_sec=60)
        # tune_tasks' own steps, with the scheduler kept for _salvage
        scheduler.tune(tasks=contexts, task_weights=weights, max_trials_global=trials,
                       max_trials_per_task=trials, num_trials_per_iter=per_iter, builder=builder,
                       runner=runner, measure_callbacks=callbacks, database=db, cost_model=cost_model)
    except BaseException:
        with interrupt.deferred():
            _salvage(scheduler, db, counter)
        raise
    finally:
        # The worker processes end here, also on Ctrl-C or an error mid-batch (the runner's
        # pool would otherwise live until garbage collection).
        with interrupt.deferred():
            builder.close()
            checker.close()
            if runner is not None:
                runner.pool.shutdown(wait=True)
        add_stats(checks, checker)
        ms_logger.removeHandler(ms_handler)
        ms_handler.close()
        ms_logger.propagate, ms_logger.level = saved[0], saved[1]
        for logger in loggers:
            for h in list(logger.handlers):
                logger.removeHandler(h)
                h.close()


def _salvage(scheduler, db, counter: "_Counter") -> None:
    """Commit the batches that were measured but not yet handed to the measure callbacks.

    MetaSchedule's gradient scheduler joins a task's batch (commits its records) only when
    it picks that task again, and its first round sends every task once: MobileNetV2 at 64
    trials (16 tasks x 4) measures all 64 before the first commit. On Ctrl-C or an error
    those would be lost; here they go to the database as ``AddToDatabase`` would put them.
    A batch marked ``committed`` is already in.
    """
    from tvm.s_tir.meta_schedule.database import TuningRecord

    try:
        for task_id, task in enumerate(scheduler.tasks_):
            futures, candidates, built = task.runner_futures, task.measure_candidates, task.builder_results
            if futures is None or candidates is None or built is None or len(futures) != len(candidates):
                continue
            if task_id in counter.seen and counter.seen[task_id].same_as(candidates):
                continue                   # committed; interrupted in a later callback
            workload = db.commit_workload(task.ctx.mod)
            results, builds = [], []
            for cand, b, future in zip(candidates, built, futures):
                if b.error_msg == _Counter.SKIPPED:
                    continue
                res = future.result()
                db.commit_tuning_record(TuningRecord(cand.sch.trace, workload, list(res.run_secs or [1e10]),
                                                     task.ctx.target, cand.args_info))
                results.append(res)
                builds.append(b)
            counter.record(task_id, builds, results)
    except Exception:  # noqa: BLE001 - best effort on the way out; the error in flight matters more
        log.debug("TVM tuning: could not keep the last measured batches", exc_info=True)


def space_generator(task: Task, target):
    """MetaSchedule's design space for ``task``: single-threaded for light CPU tasks.

    Every parallel kernel call wakes the runtime's worker threads; with non-spinning pools
    (the benchmark's setting, and any machine whose cores are shared) that costs more than
    the whole compute of a light layer, and MetaSchedule's runner, which times one kernel
    back to back, does not see it: offered both kinds, it kept picking threaded schedules.
    Measured side by side (MobileNetV2-0.35 b1, 64 trials, 2 cores): stock space 6.8 ms,
    stock + single-threaded space 3.6 ms, single-threaded below ``SERIAL_BELOW_FLOPS``
    1.8 ms (ORT 1.1 ms). The serial space is the stock rules with
    ``ParallelizeVectorizeUnroll(max_jobs_per_core=-1)`` and no ``AddRFactor``.
    """
    from tvm.s_tir import meta_schedule as ms

    from .targets import is_gpu

    if is_gpu(target) or task.flops >= SERIAL_BELOW_FLOPS:
        return "post-order-apply"
    serial = [ms.schedule_rule.ParallelizeVectorizeUnroll(     # the stock rule's settings, no threads
                  max_jobs_per_core=-1, max_vectorize_extent=64, unroll_max_steps=[0, 16, 64, 512],
                  unroll_explicit=True) if isinstance(r, ms.schedule_rule.ParallelizeVectorizeUnroll) else r
              for r in ms.ScheduleRule.create("llvm") if not isinstance(r, ms.schedule_rule.AddRFactor)]
    return ms.space_generator.PostOrderApply(sch_rules=serial, postprocs="llvm", mutator_probs="llvm")


def _task_loggers(log_dir: Path, names: list[str]) -> list[logging.Logger]:
    """Per-task file loggers (MetaSchedule's own setup also prints to stdout; this does not)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s [%(levelname)s] %(message)s", "%Y-%m-%d %H:%M:%S")
    loggers = []
    for i, name in enumerate(names):
        logger = logging.getLogger(f"gradrewrite.tvm.metaschedule.{log_dir.parent.name}.task{i}")
        logger.setLevel(logging.INFO)
        logger.propagate = False
        handler = logging.FileHandler(log_dir / f"task_{i:02d}_{name[:80]}.log")
        handler.setFormatter(fmt)
        logger.addHandler(handler)
        loggers.append(logger)
    return loggers


class _Counter:
    """Counts measured trials, reports progress after every batch, and holds the budget.

    MetaSchedule checks its global trial limit before each batch, not within one, so after
    a short batch (a candidate that failed postprocessing is not replaced) the last batch
    overshoots: 65 of 64. The builder asks ``take()`` per candidate and skips the ones past
    the budget (``SKIPPED``): they are neither built, run, nor counted.
    """

    SKIPPED = "skipped: the trial budget is spent"

    def __init__(self, chosen: list[Task], total: int, progress: Progress | None):
        self.names = [t.name for t in chosen]
        self.total = total
        self.progress = progress
        self.taken = 0
        self.measured = 0
        self.per_task = [0] * len(chosen)
        self.best_us: list[float | None] = [None] * len(chosen)
        self.seen: dict[int, Any] = {}     # task -> its last batch in the database

    def committed(self, task_id: int, candidates, builder_results, runner_results) -> None:
        """A batch is in the database (the committing callback calls this; a candidate found
        wrong comes with a failed run): remembered for ``_salvage``, counted, reported."""
        self.seen[task_id] = candidates
        self.update(task_id, builder_results, runner_results)

    def take(self) -> bool:
        if self.taken >= self.total:
            return False
        self.taken += 1
        return True

    def update(self, task_id: int, builder_results, runner_results) -> None:
        if not self.record(task_id, builder_results, runner_results):
            return
        best = self.best_us[task_id]
        log.info("TVM tuning [%d/%d] task %d/%d %s: %d trials, best %s",
                 self.measured, self.total, task_id + 1, len(self.names), self.names[task_id],
                 self.per_task[task_id], f"{best:.1f} us" if best is not None else "n/a")
        _emit(self.progress, {"event": "batch", "task": self.names[task_id], "task_index": task_id,
                              "tasks": len(self.names), "task_trials": self.per_task[task_id],
                              "best_us": best, "trials_done": self.measured, "trials": self.total})

    def record(self, task_id: int, builder_results, runner_results) -> int:
        """Count one batch (skipped candidates left out); how many were measured."""
        done = [r for b, r in zip(builder_results, runner_results) if b.error_msg != self.SKIPPED]
        self.measured += len(done)
        self.per_task[task_id] += len(done)
        for res in done:
            if res.error_msg is None and res.run_secs:
                us = 1e6 * sum(float(s) for s in res.run_secs) / len(res.run_secs)
                best = self.best_us[task_id]
                self.best_us[task_id] = us if best is None else min(best, us)
        return len(done)


BUILD_TIMEOUT_S = 30.0  # one candidate's build; a sound one takes 0.1-2 s


_BUILDER = None


def candidate_builder(budget: _Counter | None = None):
    """A MetaSchedule builder that compiles candidates one at a time in one long-lived worker
    process with a time limit per candidate (``BUILD_TIMEOUT_S``).

    The stock ``LocalBuilder`` starts a fresh worker pool for every batch (see module doc);
    building in this process instead has no time limit, and LLVM can take forever on a
    pathological schedule (seen: a fused softmax candidate of the tiny GPT at batch 8 was
    still in codegen after 20 minutes). Here such a candidate is recorded as a failed build,
    the worker is killed and the next candidate starts a fresh one. Candidates past
    ``budget`` are skipped (see ``_Counter``). Libraries go to one temporary folder per
    builder. Call ``close()`` when done: it ends the worker and removes that folder (with
    what an interrupted batch left in it).
    """
    global _BUILDER
    if _BUILDER is not None:
        return _BUILDER(budget)
    import cloudpickle
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.support.popen_pool import PopenWorker

    from . import build_worker

    cloudpickle.register_pickle_by_value(build_worker)

    @derived_object
    class WorkerBuilder(PyBuilder):
        def __init__(self, budget):
            super().__init__()
            self.budget = budget
            self.worker = PopenWorker()
            self.root = tempfile.mkdtemp(prefix="gradrewrite-ms-")

        def build(self, build_inputs):
            import tvm

            results = []
            for item in build_inputs:
                interrupt.raise_if_hit()
                if self.budget is not None and not self.budget.take():
                    results.append(BuilderResult(None, _Counter.SKIPPED))
                    continue
                try:
                    self.worker.send(build_worker.build_candidate,
                                     (tvm.ir.save_json(item.mod), str(item.target), self.root),
                                     timeout=BUILD_TIMEOUT_S)
                    results.append(BuilderResult(self.worker.recv(), None))
                except TimeoutError:  # the worker is killed; the next send starts another
                    log.info("TVM tuning: a candidate's build passed %.3g s; skipped", BUILD_TIMEOUT_S)
                    results.append(BuilderResult(None, f"build timed out after {BUILD_TIMEOUT_S:.3g} s"))
                except Exception as exc:  # noqa: BLE001 - a bad candidate, not a failed tune
                    interrupt.raise_if_hit(exc)
                    results.append(BuilderResult(None, f"{type(exc).__name__}: {exc}"))
            return results

        def close(self):
            self.worker.kill()
            shutil.rmtree(self.root, ignore_errors=True)

    _BUILDER = WorkerBuilder
    return _BUILDER(budget)


def build(mod, target, database):
    """Compile ``mod`` applying ``database``'s schedules (dlight defaults for the rest on GPUs)."""
    from tvm.s_tir import meta_schedule as ms

    return ms.relax_integration.compile_relax(database, mod, target, None)
