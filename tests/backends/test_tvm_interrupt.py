"""Ctrl-C during TVM tuning: prompt stop, measured records kept, workers ended, exit 130."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest
import torch

import gradrewrite as gr

ROOT = Path(__file__).resolve().parents[2]


def _record_lines(cache: Path) -> list[str]:
    files = list(cache.glob("*/database_tuning_record.json"))
    return [ln for f in files for ln in f.read_text().splitlines() if ln.strip()]


def _state(cache: Path) -> dict:
    (path,) = cache.glob("*/tuning.json")
    return json.loads(path.read_text())


@pytest.mark.slow
def test_interrupt_while_a_candidate_builds_keeps_the_measured_batches(tmp_path, monkeypatch):
    """In process: Ctrl-C (its handler called directly) lands while the builder takes its
    fifth candidate, in MetaSchedule's first round, when the four measured candidates have
    not reached the database yet."""
    from gradrewrite.backends.tvm import interrupt, tuning

    take = tuning._Counter.take
    calls = []

    def take_then_interrupt(self):
        calls.append(1)
        if len(calls) == 5:
            interrupt._on_sigint(signal.SIGINT, None)
        return take(self)

    monkeypatch.setattr(tuning._Counter, "take", take_then_interrupt)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 1),
                                torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 8, 4)).eval()
    x = torch.randn(1, 3, 8, 8)
    graph = gr.capture(model, (x,))
    cache = tmp_path / "cache"
    opts = {"target": "llvm", "tune_trials": 12, "tune_cache": str(cache)}
    children = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(KeyboardInterrupt):
        gr.compile(graph, tmp_path / "out", backend="tvm", backend_options=opts)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in children]
    assert psutil.wait_procs(left, timeout=10)[1] == []      # the build and run workers are gone

    records = _record_lines(cache)
    state = _state(cache)
    assert len(records) == 4 and len(set(records)) == 4     # the first round's two measured batches, once
    assert state["trials"] == 4 and state["history"][-1]["interrupted"]

    monkeypatch.setattr(tuning._Counter, "take", take)
    events: list[dict] = []
    art = gr.compile(graph, tmp_path / "again", backend="tvm",
                     backend_options={**opts, "progress": events.append})
    assert events[0]["event"] == "start" and events[0]["trials"] == 8   # only the rest of the budget
    assert art.report["artifact"]["tuning"]["new_trials"] == 8
    assert art.report["verification"]["relative_error"] < 1e-4


@pytest.mark.slow
def test_ctrl_c_on_the_cli_exits_130_and_keeps_the_records(tmp_path):
    """A real ``gradrewrite compile`` in its own process group, SIGINT to the group (what a
    terminal's Ctrl-C does) once tuning has committed records."""
    cache, out = tmp_path / "cache", tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "gradrewrite.cli", "compile", "--module", "examples.models:small_cnn",
           "-b", "tvm", "--target", "llvm", "--tune-trials", "40", "--tune-cache", str(cache), "-o", str(out)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env,
                            cwd=tmp_path, start_new_session=True)
    lines: list[str] = []
    measured = threading.Event()

    def read():
        for line in proc.stderr:
            lines.append(line)
            if re.search(r"\[\d+/\d+\]", line) and any("TVM tuning:" in ln for ln in lines):
                measured.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert measured.wait(600), "".join(lines)
        seen = int(re.findall(r"\[(\d+)/\d+\]", "".join(lines))[-1])
        workers = psutil.Process(proc.pid).children(recursive=True)
        assert workers                                       # the build and run workers
        os.killpg(proc.pid, signal.SIGINT)
        rc = proc.wait(120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    reader.join(10)
    stderr = "".join(lines)
    assert rc == 130, stderr
    assert stderr.rstrip().splitlines()[-1] == "interrupted; nothing was written"
    assert stderr.count("interrupted; nothing was written") == 1 and "Traceback" not in stderr
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))
    assert psutil.wait_procs(workers, timeout=10)[1] == []
    assert len(_record_lines(cache)) >= seen                 # what was measured before Ctrl-C
    state = _state(cache)
    assert state["history"][-1]["interrupted"] and seen <= state["trials"] < 40
