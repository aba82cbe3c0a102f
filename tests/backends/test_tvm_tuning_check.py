"""Tuned TVM kernels are checked against the untuned ones: a wrong one is dropped, not kept.

The wrong kernel is TVM 0.27's own: a fused conv + zero-pad task whose pad block is moved
under the conv's tile loop (``reverse_compute_at``, as MetaSchedule's multi-level tiling
does) never writes the pad border. transformers' MobileNetV2 (TF-style padding) tuned to
one such record and failed verification (relative error 0.3)."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import gradrewrite as gr

RTOL = 1e-4


class ConvPad(torch.nn.Module):
    """1x1 conv, ReLU, pad right/bottom by one, stride-2 depthwise conv (TF "SAME")."""

    def __init__(self):
        super().__init__()
        self.pw = torch.nn.Conv2d(4, 8, 1)
        self.dw = torch.nn.Conv2d(8, 8, 3, stride=2, groups=8)

    def forward(self, x):
        return self.dw(F.pad(torch.relu(self.pw(x)), (0, 1, 0, 1)))


def pad_under_tile_loop(sch):
    """The wrong schedule: elementwise blocks inlined, conv's width loop split, the pad block
    computed under the outer part; its loops then cover 8 of the 9 padded columns."""
    for name in ("pad_temp", "T_add", "compute"):
        sch.compute_inline(sch.get_sblock(name))
    xo, _ = sch.split(sch.get_loops(sch.get_sblock("conv2d_nchw"))[3], factors=[2, 4])
    sch.reverse_compute_at(sch.get_sblock("PadInput"), xo)
    return sch


def _pad_records(records: Path) -> list[str]:
    return [ln for ln in records.read_text().splitlines() if "PadInput" in ln and "ReverseComputeAt" in ln]


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """One compile, tuned, where every candidate of the conv+pad task is the wrong schedule."""
    from tvm.s_tir import meta_schedule as ms

    from gradrewrite.backends.tvm import tuning

    stock = tuning.space_generator

    def space(task, target):
        if task.name.endswith("_pad"):
            return ms.space_generator.ScheduleFn(pad_under_tile_loop, sch_rules=[], postprocs=[], mutator_probs={})
        return stock(task, target)

    torch.manual_seed(0)
    model = ConvPad().eval()
    x = torch.randn(1, 4, 8, 8)
    graph = gr.capture(model, (x,))
    root = tmp_path_factory.mktemp("tuning_check")
    opts = {"target": "llvm", "tune_trials": 4, "tune_cache": str(root / "cache")}
    logs = _Lines()
    logger = logging.getLogger("gradrewrite.tvm")
    logger.addHandler(logs)
    saved = logger.level
    logger.setLevel(logging.INFO)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(tuning, "space_generator", space)
            art = gr.compile(graph, root / "tuned", backend="tvm", backend_options=opts)
    finally:
        logger.removeHandler(logs)
        logger.setLevel(saved)
    return model, x, graph, opts, art, logs.lines


def test_wrong_kernel_from_tuning_is_dropped_and_the_compile_verifies(tuned):
    model, x, _, _, art, lines = tuned
    tuning = art.report["artifact"]["tuning"]
    assert tuning["new_trials"] == 4
    checks = tuning["kernel_checks"]
    assert checks["wrong"] >= 1 and checks["checked"] > checks["wrong"]
    assert any("disagree with the untuned kernel" in ln and "_pad" in ln and "relative error" in ln for ln in lines)
    records = Path(tuning["cache_dir"]) / "database_tuning_record.json"
    assert _pad_records(records) == []                       # not kept for later compiles
    assert art.report["verification"]["relative_error"] < RTOL
    torch.testing.assert_close(torch.from_numpy(art(x.numpy())[0]), model(x), rtol=1e-5, atol=1e-5)


def test_wrong_record_already_in_the_cache_is_dropped_on_reuse(tuned, tmp_path):
    """A cache written before the check existed (or by hand) holding a wrong fastest record."""
    import tvm
    from tvm.s_tir import Schedule
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.database import TuningRecord, Workload

    from gradrewrite.backends.tvm.kernel_check import Checker

    model, x, graph, opts, art, _ = tuned
    work = tmp_path / "cache" / art.report["artifact"]["tuning"]["cache_key"]
    shutil.copytree(art.report["artifact"]["tuning"]["cache_dir"], work)
    workload_lines = (work / "database_workload.json").read_text().splitlines()
    workloads = [Workload.from_json(json.loads(ln)) for ln in workload_lines]
    index = next(i for i, w in enumerate(workloads) if "PadInput" in w.mod.script())
    target = tvm.target.Target(json.loads(json.loads((work / "tuning.json").read_text())["target"]))
    trace = pad_under_tile_loop(Schedule(workloads[index].mod)).trace
    wrong = TuningRecord(trace, workloads[index], [1e-9], target, None)   # the fastest by far
    assert "relative error" in Checker().check(workloads[index].mod, wrong)

    scratch = ms.database.JSONDatabase(path_workload=str(tmp_path / "w.json"),
                                       path_tuning_record=str(tmp_path / "r.json"))
    for w in workloads:                    # same order, so the same workload indices
        scratch.commit_workload(w.mod)
    scratch.commit_tuning_record(TuningRecord(trace, scratch.commit_workload(workloads[index].mod),
                                              [1e-9], target, None))
    records = work / "database_tuning_record.json"
    before = records.read_text()
    records.write_text(before + (tmp_path / "r.json").read_text())
    assert len(_pad_records(records)) == 1

    again = gr.compile(graph, tmp_path / "reused", backend="tvm",
                       backend_options={**opts, "tune_cache": str(tmp_path / "cache")})
    tuning = again.report["artifact"]["tuning"]
    checks = tuning["kernel_checks"]
    assert tuning["reused_cache"] and (checks["checked"], checks["wrong"]) == (1, 1)
    assert records.read_text() == before                     # dropped from the file, the rest untouched
    assert again.report["verification"]["relative_error"] < RTOL
    torch.testing.assert_close(torch.from_numpy(again(x.numpy())[0]), model(x), rtol=1e-5, atol=1e-5)
