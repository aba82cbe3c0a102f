"""A new user's probes: output paths, unsafe archives, huge inputs, data-dependent
branches, typos in options, and Ctrl-C through a real process group. Each ends as one
line and exit 2 (130 for Ctrl-C), decided before the slow work, with nothing left behind."""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from .conftest import assert_user_error, run_cli

ROOT = Path(__file__).resolve().parents[2]


def leftovers(directory: Path, name: str) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith((name, f".{name}")))


def assert_fast_error(proc, *needles):
    """One line, exit 2, and decided before the capture (no progress lines before it)."""
    line = assert_user_error(proc, *needles)
    assert "capturing" not in proc.stderr and "lowering" not in proc.stderr, proc.stderr
    return line


# ------------------------------------------------------------------ output paths
def test_out_inside_a_file(tmp_path, convbn_pt2):
    (tmp_path / "afile").write_text("mine")
    assert_fast_error(run_cli("compile", convbn_pt2, "-o", tmp_path / "afile" / "out"), "is a file")
    assert (tmp_path / "afile").read_text() == "mine"


def test_out_unwritable(tmp_path, convbn_pt2):
    assert_fast_error(run_cli("compile", convbn_pt2, "-o", "/sys/gradrewrite-out"), "cannot write in '/sys'")
    assert not Path("/sys/gradrewrite-out").exists()


def test_out_in_immutable_dir(tmp_path, convbn_pt2):
    locked = tmp_path / "locked"
    locked.mkdir()
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode != 0:
        pytest.skip("this file system has no immutable flag")
    try:
        assert_fast_error(run_cli("compile", convbn_pt2, "-o", locked / "out"), "cannot write in")
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)
    assert list(locked.iterdir()) == []


def test_force_never_replaces_a_file(tmp_path, convbn_pt2):
    target = tmp_path / "afile"
    target.write_text("mine")
    assert_fast_error(run_cli("compile", convbn_pt2, "-o", target, "--force"), "is a file",
                      "--force replaces only artifact directories")
    assert target.read_text() == "mine"
    assert leftovers(tmp_path, "afile") == ["afile"]


def test_force_never_replaces_a_foreign_dir(tmp_path, convbn_pt2):
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("...")
    assert_fast_error(run_cli("compile", convbn_pt2, "-o", mine, "--force"), "gradrewrite did not write")
    assert (mine / "chapter1.tex").read_text() == "..."


def test_force_replaces_an_artifact(tmp_path, convbn_pt2):
    out = tmp_path / "art"
    run_cli("compile", convbn_pt2, "-o", out, "-q", check=True)
    run_cli("compile", convbn_pt2, "-p", "fold-bn", "-o", out, "--force", "-q", check=True)
    assert leftovers(tmp_path, "art") == ["art"]
    assert os.stat(out).st_mode & 0o777 == 0o777 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_inspect_output_inside_a_file(tmp_path, convbn_pt2):
    (tmp_path / "afile").write_text("mine")
    assert_fast_error(run_cli("inspect", convbn_pt2, "-f", "json", "-o", tmp_path / "afile" / "g.json"),
                      "is a file")


def test_run_output_unwritable(tmp_path, convbn_pt2):
    out = tmp_path / "art"
    run_cli("compile", convbn_pt2, "-o", out, "-q", check=True)
    assert_user_error(run_cli("run", out, "--random", "-o", "/sys/y.npz"), "cannot write in '/sys'")


def test_run_with_model_file_deleted(tmp_path, convbn_pt2):
    out = tmp_path / "art"
    run_cli("compile", convbn_pt2, "-o", out, "-q", check=True)
    (out / "model.pt2").unlink()
    assert_user_error(run_cli("run", out, "--random", "-o", tmp_path / "y.npz"),
                      "'model.pt2' is missing", "compile it again")
    assert not (tmp_path / "y.npz").exists()


# ------------------------------------------------------------------ inputs and models
def test_input_too_large_for_memory(tmp_path, convbn_pt2):
    assert_fast_error(run_cli("compile", convbn_pt2, "--input", "1x3x100000x100000", "-o", tmp_path / "o"),
                      "GiB for the inputs alone", "smaller --input")
    assert leftovers(tmp_path, "o") == []


BRANCHY = '''
import torch
class Branchy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
    def forward(self, x):
        y = self.lin(x)
        if y.sum() > 0:
            return y * 2
        return y - 1
def factory():
    return Branchy(), (torch.randn(2, 4),)
'''


def test_data_dependent_branch(tmp_path):
    (tmp_path / "branchy.py").write_text(BRANCHY)
    proc = run_cli("compile", "--module", "branchy:factory", "-o", tmp_path / "o", cwd=tmp_path)
    assert_user_error(proc, "branches on a tensor's value", "branchy.py:9", "torch.cond")
    assert "def forward" not in proc.stderr and "Unable to find user code" not in proc.stderr


def test_unknown_mcu_target_one_line(tmp_path, convbn_pt2):
    proc = run_cli("compile", convbn_pt2, "-b", "mcu", "--target", "cortex-m0", "-o", tmp_path / "o")
    line = assert_fast_error(proc, "unknown mcu target 'cortex-m0'", "cortex-m4, cortex-m7, host")
    assert "llvm" not in line and "Usage:" not in proc.stderr


def test_click_usage_error_one_line(tmp_path, convbn_pt2):
    proc = run_cli("compile", convbn_pt2, "--no-such-flag", "-o", tmp_path / "o")
    assert_user_error(proc, "No such option", "gradrewrite compile --help")
    assert "Usage:" not in proc.stderr


def test_unknown_backend_lists_every_choice(tmp_path, convbn_pt2):
    line = assert_fast_error(run_cli("compile", convbn_pt2, "-b", "onnx", "-o", tmp_path / "o"),
                             "unknown backend 'onnx'")
    for name in ("mcu", "ort", "torch", "tvm", "auto"):
        assert name in line


# ------------------------------------------------------------------ code in archives
def _evil_pt2(tmp_path: Path, good: Path, marker: Path) -> Path:
    """``good`` with its sample inputs replaced by a pickle that creates ``marker``."""
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pt2"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(evil, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if "sample_inputs" in item.filename:
                data = pickle.dumps(Payload())
            zout.writestr(item, data)
    return evil


def test_pt2_with_code_is_refused(tmp_path, convbn_pt2):
    marker = tmp_path / "PAYLOAD_RAN"
    evil = _evil_pt2(tmp_path, convbn_pt2, marker)
    assert_user_error(run_cli("compile", evil, "-o", tmp_path / "o"), "unrestricted unpickling",
                      "--trust-pickle")
    assert not marker.exists()
    assert leftovers(tmp_path, "o") == []


def test_artifact_pt2_loads_without_running_code(tmp_path, convbn_pt2):
    from gradrewrite.backends.torch_backend import TorchBackend
    from gradrewrite.errors import InputError

    marker = tmp_path / "PAYLOAD_RAN"
    art = tmp_path / "art"
    art.mkdir()
    _evil_pt2(tmp_path, convbn_pt2, marker).rename(art / "model.pt2")
    with pytest.raises(InputError, match="--trust-pickle"):
        TorchBackend().load(art, {"files": ["model.pt2"]})
    assert not marker.exists()


def test_ordinary_pt2_still_loads(tmp_path, convbn_pt2):
    out = tmp_path / "art"
    run_cli("compile", convbn_pt2, "-o", out, "-q", check=True)
    run_cli("run", out, "--random", "-o", tmp_path / "y.npz", check=True)


# ------------------------------------------------------------------ small things
def test_passes_descriptions():
    proc = run_cli("passes", "--json", check=True)
    import json
    passes = json.loads(proc.stdout)
    assert passes["stream-bp"]["doc"].startswith("StreamBP:")
    assert passes["nm-sparsity"]["doc"].endswith("finished by nm-finalize).")
    assert all(o["help"] for o in passes["qas"]["options"])


def test_run_prints_scalars(tmp_path):
    (tmp_path / "scalar.py").write_text(
        "import torch\nclass S(torch.nn.Module):\n    def forward(self, x):\n        return x.sum()\n"
        "def factory():\n    return S(), (torch.randn(2, 3),)\n")
    out = tmp_path / "art"
    run_cli("compile", "--module", "scalar:factory", "-o", out, "-q", cwd=tmp_path, check=True)
    proc = run_cli("run", out, "--random", "-o", tmp_path / "y.npz", check=True)
    assert "output_0: scalar float32" in proc.stdout


# ------------------------------------------------------------------ Ctrl-C
def _interrupt_when(args: list[str], ready, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the CLI in its own process group, send SIGINT to the whole group (as a
    terminal's Ctrl-C does) once ``ready(process, stderr_lines)`` holds, wait for the end."""
    import threading

    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.Popen([sys.executable, "-m", "gradrewrite", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    me = psutil.Process(proc.pid)
    deadline = time.monotonic() + timeout
    try:
        while not ready(me, lines):
            assert proc.poll() is None, f"finished before the interrupt: {lines}"
            assert time.monotonic() < deadline, "never reached the phase to interrupt"
            time.sleep(0.05)
        children = me.children(recursive=True)
        os.killpg(proc.pid, signal.SIGINT)
        out = proc.stdout.read()
        proc.wait(timeout=120)
        reader.join(timeout=10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert alive == [], f"processes left running: {alive}"
    return subprocess.CompletedProcess(args, proc.returncode, out, "".join(lines))


def _assert_interrupted(result, tmp_path: Path, name: str) -> None:
    assert result.returncode == 130, (result.returncode, result.stderr)
    assert result.stderr.strip().splitlines()[-1] == "interrupted; nothing was written", result.stderr
    assert "Traceback" not in result.stderr
    assert leftovers(tmp_path, name) == []


@pytest.mark.slow
def test_ctrl_c_during_qemu_run(tmp_path):
    def qemu_runs(p: psutil.Process, lines) -> bool:
        try:
            return any("qemu-system-arm" in c.name() for c in p.children(recursive=True))
        except psutil.Error:
            return False
    result = _interrupt_when(["compile", "--module", "examples.models:small_cnn", "-b", "mcu", "--target",
                              "cortex-m4", "-o", tmp_path / "fw"], qemu_runs, cwd=ROOT)
    _assert_interrupted(result, tmp_path, "fw")


@pytest.mark.slow
def test_ctrl_c_during_calibration(tmp_path):
    calib = tmp_path / "calib.npz"  # enough samples that calibration takes a while
    np.savez(calib, x=np.random.default_rng(0).standard_normal((3000, 1, 3, 32, 32)).astype(np.float32))

    def calibrating(p, lines) -> bool:  # the pass has started: it calibrates first
        return any("quantize …" in line for line in lines)
    result = _interrupt_when(["compile", "--module", "examples.models:small_cnn", "-p", "quantize(mode=static)",
                              "--calib", calib, "-o", tmp_path / "q"], calibrating, cwd=ROOT)
    _assert_interrupted(result, tmp_path, "q")


@pytest.mark.slow
def test_kill_int_reaches_a_background_job(tmp_path):
    """A script's `gradrewrite … &` starts with SIGINT ignored; `kill -INT` still stops it."""
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((3000, 1, 3, 32, 32)).astype(np.float32))
    script = (f'"{sys.executable}" -m gradrewrite compile --module examples.models:small_cnn '
              f'-p "quantize(mode=static)" --calib "{calib}" -o "{tmp_path / "bg"}" 2> "{tmp_path / "err"}" & '
              f'pid=$!; until grep -q "quantize …" "{tmp_path / "err"}" 2>/dev/null; do sleep 0.05; done; '
              'kill -INT $pid; wait $pid; echo "rc=$?"')
    proc = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert "rc=130" in proc.stdout, (proc.stdout, (tmp_path / "err").read_text())
    assert (tmp_path / "err").read_text().strip().splitlines()[-1] == "interrupted; nothing was written"
    assert leftovers(tmp_path, "bg") == []
