"""Tuned kernels are checked against the untuned ones before a build may use them.

MetaSchedule times candidates on random data and never looks at their outputs, and TVM
0.27 generates some wrong ones. Seen on transformers' MobileNetV2-0.35 (TF-style
padding): in ``fused_conv2d6_add3_tir_clip2_pad8`` (1x1 conv, bias, ReLU6, then the
zero pad 24x24 -> 25x25 for the next stride-2 depthwise conv) the multi-level tiling
rule moves the fused pad block under the conv's tile loop (``reverse_compute_at``);
its loops then cover only the 24x24 the tile produces, so the pad row and column are
never written and the output holds whatever memory held. That record was the fastest,
every compile of the model used it, and verification failed (relative error 0.2-0.3).

Two places check, with the same check (``Checker``: the kernel built as tuned and built
untuned, ``build_worker.check_candidate``, both run on the same random arguments):

* while tuning (``committing_callback``, in place of MetaSchedule's ``AddToDatabase`` and
  ``UpdateCostModel``): a measured candidate faster than its task's best so far is checked
  before its record is committed. A wrong one is not committed, and the cost model learns
  it as a failed run: wrong kernels that skip work are fast, and evolutionary search
  otherwise breeds from them (one MobileNetV2 task at 512 trials ended with 38 wrong
  records ahead of its first correct one).
* when the database opens (``vet``: on a reused cache, records an interrupted run left,
  caches written before this check existed): for each workload, the record MetaSchedule
  would pick (the fastest valid one) is checked unless it passed before; a wrong one is
  dropped and the next fastest checked, until one agrees.

Records that passed are remembered by a hash of their line (``CHECKED``), so each is
checked once; slower records never checked stay unused behind a checked one. Checks run
in a worker process: a wrong kernel may write out of bounds, and LLVM may hang.
"""
from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

from . import interrupt

log = logging.getLogger("gradrewrite.tvm")

CHECKED = "database_checked.txt"   # hashes of record lines whose kernel passed the check
TOLERANCE = 1e-4                   # relative L2 error per argument; fp32 reordering gives ~1e-7
CHECK_TIMEOUT_S = 60.0             # two builds and two runs of one kernel
_FAILED_RUN = 1e10                 # MetaSchedule's run time for a failed build or run


def line_hash(line: str) -> str:
    return hashlib.sha256(line.encode()).hexdigest()[:20]


def mean_secs(record) -> float | None:
    """The sort key MetaSchedule picks records by, ``None`` for one it never picks (the
    rules of ``TuningRecord::IsValid``: some instruction before postprocessing, some real
    run time)."""
    insts = list(record.trace.insts)
    if not insts or insts[0].kind.name == "EnterPostproc":
        return None
    secs = [float(s) for s in (record.run_secs or [])]
    if not secs or all(s == _FAILED_RUN for s in secs):
        return None
    return sum(secs) / len(secs)


class Checker:
    """Checks tuned kernels one at a time in a worker process: ``worker`` (a ``PopenWorker``
    that stays its owner's; tuning lends the builder's, whose TVM is loaded: a fresh worker
    costs ~4 s), else one started on first use."""

    def __init__(self, worker=None):
        self.worker = worker
        self.owned = worker is None
        self.count = 0          # kernels checked
        self.wrong = 0          # of which disagreed (or could not be checked)
        self.seconds = 0.0

    def check(self, mod, record, seed: int = 0) -> str | None:
        """``None`` when ``record``'s kernel agrees with the untuned ``mod``, else why not."""
        why = self._check(mod, record, seed)
        self.wrong += why is not None
        return why

    def _check(self, mod, record, seed: int) -> str | None:
        import tvm
        from tvm.s_tir import Schedule

        from . import build_worker

        t0 = time.perf_counter()
        try:
            try:
                sch = Schedule(mod)
                record.trace.apply_to_schedule(sch, remove_postproc=False)
            except Exception as exc:  # noqa: BLE001 - TVM's error types vary
                return f"its schedule does not replay ({_last_line(exc)})"
            if self.worker is None:
                import cloudpickle
                from tvm.support.popen_pool import PopenWorker

                cloudpickle.register_pickle_by_value(build_worker)
                self.worker = PopenWorker()
            try:
                self.worker.send(build_worker.check_candidate,
                                 (tvm.ir.save_json(mod), tvm.ir.save_json(sch.mod), str(record.target), seed),
                                 timeout=CHECK_TIMEOUT_S)
                errors = self.worker.recv()
            except TimeoutError:
                return f"the check passed {CHECK_TIMEOUT_S:.3g} s"
            except Exception as exc:  # noqa: BLE001 - a crash or build error: not trusted
                interrupt.raise_if_hit(exc)
                return f"the check failed: {type(exc).__name__}: {_last_line(exc)}"
            name, worst = max(errors, key=lambda e: e[1]) if errors else ("", 0.0)
            if not worst <= TOLERANCE:     # NaN fails too
                return f"relative error {worst:.3g} on {name}"
            return None
        finally:
            self.count += 1
            self.seconds += time.perf_counter() - t0

    def close(self) -> None:
        if self.worker is not None and self.owned:
            self.worker.kill()
        self.worker = None


def vet(work_dir: Path, entries: list[tuple[str, int, Any]], workloads: list, stats: dict | None = None,
        name: Callable[[Any], str] | None = None) -> set[int]:
    """Positions in ``entries`` (record line, workload index, ``TuningRecord``) to drop: the
    records MetaSchedule would pick that disagree with the untuned kernel (see module doc).
    Updates ``CHECKED``; adds its counts to ``stats`` (``add_stats``); ``name``
    (workload -> task name) labels the warnings."""
    path = work_dir / CHECKED
    checked = set(path.read_text().split()) if path.exists() else set()
    candidates: dict[int, list[tuple[float, int]]] = defaultdict(list)
    for pos, (_, index, record) in enumerate(entries):
        secs = mean_secs(record)
        if secs is not None:
            candidates[index].append((secs, pos))
    drop: set[int] = set()
    passed: set[str] = set()
    checker = Checker()
    try:
        for index, ranked in sorted(candidates.items()):
            wrong = []
            for _, pos in sorted(ranked):          # ties: the earlier line, as MetaSchedule picks
                digest = line_hash(entries[pos][0])
                if digest in checked:
                    break
                why = checker.check(workloads[index].mod, entries[pos][2])
                if why is None:
                    passed.add(digest)
                    break
                drop.add(pos)
                wrong.append(why)
            if wrong:
                log.warning("TVM tuning: dropped %d tuned kernel(s) of %s that disagree with the untuned "
                            "kernel (%s)", len(wrong), name(workloads[index]) if name else f"workload {index}",
                            "; ".join(sorted(set(wrong))))
    finally:
        checker.close()
    if passed or drop:
        keep = {line_hash(line) for pos, (line, _, _) in enumerate(entries) if pos not in drop}
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(h + "\n" for h in sorted((checked | passed) & keep)))
        tmp.replace(path)
    if checker.count:
        log.info("TVM tuning: checked %d tuned kernel(s) against untuned ones in %.1f s, %d dropped",
                 checker.count, checker.seconds, len(drop))
    if stats is not None:
        add_stats(stats, checker)
    return drop


def add_stats(stats: dict, checker: Checker) -> None:
    """``checked`` kernels, how many were ``wrong`` (dropped or never committed), ``seconds``."""
    stats["checked"] = stats.get("checked", 0) + checker.count
    stats["wrong"] = stats.get("wrong", 0) + checker.wrong
    stats["seconds"] = round(stats.get("seconds", 0.0) + checker.seconds, 2)


def mark_checked(work_dir: Path, digests: list[str]) -> None:
    if digests:
        with (work_dir / CHECKED).open("a") as f:
            f.write("".join(d + "\n" for d in digests))


def _tail_line(path: Path) -> str:
    """The last line of ``path`` (what ``JSONDatabase`` just appended)."""
    with path.open("rb") as f:
        f.seek(0, 2)
        f.seek(max(0, f.tell() - (1 << 20)))
        return f.read().decode(errors="replace").rstrip("\n").rsplit("\n", 1)[-1]


def committing_callback(db, cost_model, work_dir: Path, records: Path, checker: Checker,
                        skipped: str, committed: Callable[..., None]):
    """A measure callback that commits each measured candidate's record to ``db`` (which
    appends to ``records``) and updates ``cost_model`` (``None``: no model), checking first
    the candidates that beat their task's best (see module doc). Candidates whose build
    result says ``skipped`` are left out; ``committed(task_id, candidates, builder results,
    runner results)`` gets each batch once it is in the database, a wrong candidate's run
    replaced by a failed one."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.database import TuningRecord
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback
    from tvm.s_tir.meta_schedule.runner import RunnerResult

    best: dict[int, float] = {}

    @derived_object
    class CheckedCommit(PyMeasureCallback):
        def apply(self, task_scheduler, task_id, candidates, builder_results, runner_results):
            ctx = task_scheduler.tasks_[task_id].ctx
            workload = db.commit_workload(ctx.mod)
            if task_id not in best:       # the database's best passed vet when it opened
                top = db.get_top_k(workload, 1)
                best[task_id] = (mean_secs(top[0]) if top else None) or math.inf
            keep = [i for i, b in enumerate(builder_results) if b.error_msg != skipped]
            recs = {i: TuningRecord(candidates[i].sch.trace, workload,
                                    list(runner_results[i].run_secs or [_FAILED_RUN]), ctx.target,
                                    candidates[i].args_info) for i in keep}
            results = {i: runner_results[i] for i in keep}
            good, wrong = None, []
            for i in sorted(keep, key=lambda i: mean_secs(recs[i]) or math.inf):
                secs = mean_secs(recs[i])
                if secs is None or secs >= best[task_id]:
                    break                 # the rest are slower: never picked, not checked now
                why = checker.check(ctx.mod, recs[i])
                if why is None:
                    best[task_id], good = secs, i
                    break
                results[i] = RunnerResult(None, f"wrong results: {why}")
                wrong.append(why)
            if wrong:
                log.warning("TVM tuning: %d candidate(s) of %s disagree with the untuned kernel (%s); not kept",
                            len(wrong), ctx.task_name, "; ".join(sorted(set(wrong))))
            with interrupt.deferred():    # all of the batch or none of it (see tuning._salvage)
                for i in keep:
                    if results[i].same_as(runner_results[i]):
                        db.commit_tuning_record(recs[i])
                        if i == good:
                            mark_checked(work_dir, [line_hash(_tail_line(records))])
                committed(int(task_id), candidates, [builder_results[i] for i in keep],
                          [results[i] for i in keep])
            interrupt.raise_if_hit()
            if cost_model is not None:
                cost_model.update(ctx, [candidates[i] for i in keep], [results[i] for i in keep])

    return CheckedCommit()


def _last_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__
