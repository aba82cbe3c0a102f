"""The pass manager: runs a pipeline of passes with instruments around each.

Instruments (timing, graph dumps, property checks, numerical verification, progress)
hook ``before_pass``/``after_pass`` instead of passes printing or checking themselves,
in the manner of TVM's ``PassInstrument``. A failure names the pass and the passes
that ran before it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..errors import GradrewriteError, PassError, VerificationError
from .graph import Graph
from .mapped_safetensors import release_pages
from .pipeline import pass_config
from .properties import check_property
from .recorded_outputs import RecordedOutputs
from .registry import PassContext, PassResult
from .verify import Verification, verify


@dataclass
class PassRecord:
    name: str
    options: dict[str, Any]
    seconds: float = 0.0
    changed: bool = False
    report: dict[str, Any] = field(default_factory=dict)
    nodes_before: int = 0
    nodes_after: int = 0
    verification: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Instrument:
    """Hooks around a pipeline; override what you need."""

    def enter_pipeline(self, graph: Graph, passes: Sequence[Any]) -> None: ...
    def before_pass(self, graph: Graph, p: Any, record: PassRecord) -> None: ...
    def after_pass(self, graph: Graph, p: Any, record: PassRecord) -> None: ...
    def exit_pipeline(self, graph: Graph, records: list[PassRecord]) -> None: ...


class Timing(Instrument):
    def before_pass(self, graph, p, record):
        self._t0 = time.perf_counter()

    def after_pass(self, graph, p, record):
        record.seconds = round(time.perf_counter() - self._t0, 6)


class DumpGraphs(Instrument):
    """Write the graph as text before the pipeline and after every pass."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)

    def enter_pipeline(self, graph, passes):
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "00-input.txt").write_text(graph.text())
        self._i = 0

    def after_pass(self, graph, p, record):
        self._i += 1
        (self.dir / f"{self._i:02d}-{record.name}.txt").write_text(graph.text())


class PropertyChecks(Instrument):
    """Check each pass's ``requires`` before it runs and ``ensures`` after."""

    def before_pass(self, graph, p, record):
        for prop in getattr(p, "requires", ()):
            reason = check_property(prop, graph)
            if reason:
                raise GradrewriteError(f"needs the graph to be {prop!r}, but {reason}",
                                       _fix_for(prop))

    def after_pass(self, graph, p, record):
        for prop in getattr(p, "ensures", ()):
            reason = check_property(prop, graph)
            if reason:
                raise GradrewriteError(f"promised {prop!r} but {reason}",
                                       "this is a bug in the pass: please report it")


def _fix_for(prop: str) -> str:
    return {
        "eval-mode": "call model.eval() before exporting",
        "no-dropout": "call model.eval() before exporting",
        "inference-graph": "run this pass on an inference graph (without --train)",
        "training-step": "compile with --train (capture_train_step) to get a training-step graph",
    }.get(prop, f"run a pass that ensures {prop!r} first")


class VerifyEachPass(Instrument):
    """Compare the graph with the pipeline's input after every pass.

    Exact passes must stay within ``rel_tol`` (fp32 rounding); lossy passes (those
    with ``exact = False``) are measured and reported but never fail here.
    """

    def __init__(self, n_inputs: int = 2, seed: int = 0, rel_tol: float = 1e-4):
        self.n_inputs, self.seed, self.rel_tol = n_inputs, seed, rel_tol

    def enter_pipeline(self, graph, passes):
        if "mapped_weights" in graph.meta:
            # bounded memory: the input's outputs on the check's inputs, recorded now, instead of
            # a reference model resident next to the rewritten one (see recorded_outputs.py)
            self.reference = RecordedOutputs(graph.clone(), self.n_inputs, self.seed)
            release_pages(graph)
        else:
            self.reference = graph.clone()

    def after_pass(self, graph, p, record):
        if graph.meta.get("training") or not record.changed:
            return
        v = verify(graph, self.reference, graph, n_inputs=self.n_inputs, seed=self.seed)
        record.verification = v.as_dict()
        if getattr(p, "exact", True) and not v.within(self.rel_tol):
            raise VerificationError(
                f"output changed: relative error {v.relative_error:.3g} "
                f"(max abs {v.max_abs_error:.3g}) exceeds {self.rel_tol:g}",
                "this pass should preserve numerics; run with --dump-graphs to see the change")


class Progress(Instrument):
    """One status line per pass on a rich console."""

    def __init__(self, console):
        self.console = console

    def before_pass(self, graph, p, record):
        self.console.log(f"[bold]{record.name}[/] …")

    def after_pass(self, graph, p, record):
        self.console.log(f"{record.name}: {record.nodes_before} -> {record.nodes_after} nodes "
                         f"in {record.seconds:.2f}s")
        skipped = record.report.get("skipped") or []
        if skipped:  # layers the selector picked but the pass left as they were
            shown = "; ".join(f"{s['path']} ({s['reason']})" for s in skipped[:3])
            more = f"; and {len(skipped) - 3} more in report.json" if len(skipped) > 3 else ""
            self.console.log(f"  {record.name} left {len(skipped)} layer(s) unchanged: {shown}{more}")


def console_feedback(console, calibration: Any = None) -> tuple[list[Instrument], Any]:
    """What a pipeline shows on a console: a line per pass, and (when it observes
    calibration data) a progress bar for ``PassContext.progress``. Nothing without one."""
    if console is None:
        return [], None
    from .calibration import ConsoleProgress

    return [Progress(console)], (ConsoleProgress(console) if calibration is not None else None)


@dataclass
class PipelineResult:
    graph: Graph
    records: list[PassRecord]

    def reports(self) -> list[dict[str, Any]]:
        return [r.as_dict() for r in self.records]


class PassManager:
    def __init__(self, passes: Sequence[Any], instruments: Sequence[Instrument] = (),
                 *, check_properties: bool = True):
        self.passes = list(passes)
        base: list[Instrument] = [Timing()]
        if check_properties:
            base.append(PropertyChecks())
        self.instruments = base + list(instruments)

    def run(self, graph: Graph, ctx: PassContext | None = None) -> PipelineResult:
        """Run every pass on ``graph`` in place; returns it with per-pass records."""
        ctx = ctx or PassContext()
        records: list[PassRecord] = []
        for inst in self.instruments:
            inst.enter_pipeline(graph, self.passes)
        for i, p in enumerate(self.passes):
            record = PassRecord(p.name, pass_config(p), nodes_before=graph.node_count())
            ran = tuple(r.name for r in records)
            ctx.following = tuple(self.passes[i + 1:])
            try:
                for inst in self.instruments:
                    inst.before_pass(graph, p, record)
                result = p.run(graph, ctx)
                if not isinstance(result, PassResult):
                    raise TypeError(f"run() returned {type(result).__name__}, not PassResult")
                record.changed, record.report = result.changed, result.report
                record.nodes_after = graph.node_count()
                for inst in self.instruments:
                    inst.after_pass(graph, p, record)
            except GradrewriteError as exc:
                raise _in_pass(type(exc), exc.message, exc.hint, p.name, ran) from exc
            except Exception as exc:
                raise _in_pass(PassError, f"{type(exc).__name__}: {exc}",
                               "run with --debug for the traceback", p.name, ran) from exc
            records.append(record)
        for inst in self.instruments:
            inst.exit_pipeline(graph, records)
        return PipelineResult(graph, records)


def _in_pass(cls, message, hint, name, ran):
    where = f"pass {name!r}" + (f" (after {', '.join(ran)})" if ran else " (first pass)")
    err = cls.__new__(cls)
    GradrewriteError.__init__(err, f"{where}: {message}", hint)
    err.pass_name, err.ran_before = name, ran
    return err


__all__ = ["PassManager", "PipelineResult", "PassRecord", "Instrument", "Timing", "DumpGraphs",
           "PropertyChecks", "VerifyEachPass", "Progress", "Verification"]
