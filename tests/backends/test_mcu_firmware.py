"""mcu backend, firmware half: host and Cortex-M builds of a C project, runs under QEMU,
sizes, the budget enforced at link time, stack high-water mark, instruction counts.

The projects here are small hand-written ones in the code generator's layout (model.h,
model.c, weights.c), so the build and run machinery is tested on its own; the tests
that go through the code generator are in test_mcu_end_to_end.py.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from gradrewrite.backends.mcu.firmware import build as firmware, qemu
from gradrewrite.backends.mcu.targets import TARGETS, check_budget, get_target
from gradrewrite.errors import BackendError, ConfigError

IN_F, OUT_F = 16, 8
CORTEX = ["cortex-m4", "cortex-m7"]


def need_tools(target: str) -> None:
    reason = firmware.toolchain_missing(target)
    if reason:
        # CI installs the toolchain and QEMU (.ci/run): there a missing tool is a failure.
        (pytest.fail if os.environ.get("CI") else pytest.skip)(reason)


def _c_floats(a: np.ndarray) -> str:
    """Exact C99 hex-float literals for float32 values."""
    return ", ".join(f"{float(v).hex()}f" for v in np.asarray(a, np.float32).ravel())


MODEL_H = """#ifndef MODEL_H
#define MODEL_H
#define MODEL_INPUT_BYTES {inb}
#define MODEL_OUTPUT_BYTES {outb}
#define MODEL_ARENA_BYTES {arena}
int model_run(const void *in, void *out);
#endif
"""

DENSE_C = """#include <string.h>
#include "model.h"
extern const float fc_weight[{o} * {i}];
extern const float fc_bias[{o}];
static float arena[MODEL_ARENA_BYTES / 4] __attribute__((aligned(16)));
/* out of line, so the instruction counter sees model_run call something */
__attribute__((noinline)) void copy_out(void *dst, const void *src, size_t n)
{{
    memcpy(dst, src, n);
}}
/* y = relu(W x + b) */
int model_run(const void *in, void *out)
{{
    const float *x = (const float *)in;
    for (int o = 0; o < {o}; ++o) {{
        float acc = fc_bias[o];
        for (int i = 0; i < {i}; ++i)
            acc += fc_weight[o * {i} + i] * x[i];
        arena[o] = acc > 0.0f ? acc : 0.0f;
    }}
    copy_out(out, arena, MODEL_OUTPUT_BYTES);
    return 0;
}}
"""


def write_dense_project(path: Path, seed: int = 0, extra_c: str = "", arena_bytes: int | None = None):
    """A relu(Wx+b) model; returns (W, b)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((OUT_F, IN_F)).astype(np.float32)
    b = rng.standard_normal(OUT_F).astype(np.float32)
    path.mkdir(parents=True, exist_ok=True)
    (path / "model.h").write_text(MODEL_H.format(inb=4 * IN_F, outb=4 * OUT_F, arena=arena_bytes or 4 * OUT_F))
    (path / "model.c").write_text(DENSE_C.format(o=OUT_F, i=IN_F) + extra_c)
    (path / "weights.c").write_text(f"const float fc_weight[{OUT_F * IN_F}] = {{{_c_floats(w)}}};\n"
                                    f"const float fc_bias[{OUT_F}] = {{{_c_floats(b)}}};\n")
    return w, b


def reference(w, b, x):
    return np.maximum(w.astype(np.float64) @ x.astype(np.float64) + b, 0)


def assert_fp32_close(got_bytes: bytes, ref: np.ndarray):
    got = np.frombuffer(got_bytes, np.float32)
    assert got.shape == ref.shape
    # fp32 rounding of a 16-term dot product: a few ulps of the magnitudes summed
    tol = 8 * np.finfo(np.float32).eps * (np.abs(ref).max() + 1) * IN_F
    assert np.abs(got - ref).max() <= tol, (got, ref)


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    path = tmp_path_factory.mktemp("dense")
    w, b = write_dense_project(path)
    return path, w, b


def _input(seed: int) -> np.ndarray:
    return np.random.default_rng(100 + seed).standard_normal(IN_F).astype(np.float32)


# ------------------------------------------------------------------ targets
def test_targets_table():
    assert get_target("cortex-m4").qemu_machine == "mps2-an386"
    assert get_target("cortex-m7").qemu_machine == "mps2-an500"
    assert get_target("host").is_host and set(TARGETS) == {"cortex-m4", "cortex-m7", "host"}
    assert "-mfpu=fpv4-sp-d16" in get_target("cortex-m4").cpu_flags
    assert "-mfpu=fpv5-d16" in get_target("cortex-m7").cpu_flags
    with pytest.raises(ConfigError, match="valid targets: cortex-m4, cortex-m7, host"):
        get_target("cortex-m0")
    with pytest.raises(ConfigError, match="--ram-kb 0 is outside 1..4096"):
        check_budget(0, 1024)
    with pytest.raises(ConfigError, match="--flash-kb 8192"):
        check_budget(320, 8192)


# ------------------------------------------------------------------ host
def test_host_build_matches_reference(dense):
    need_tools("host")
    path, w, b = dense
    exe = firmware.build_host(path)
    assert exe == path / firmware.HOST_EXE and os.access(exe, os.X_OK)
    for seed in range(3):
        x = _input(seed)
        assert_fp32_close(firmware.run_host(exe, x.tobytes()), reference(w, b, x))
    with pytest.raises(BackendError, match="must hold exactly 64 bytes"):
        firmware.run_host(exe, b"\0" * 10)


def test_build_error_is_one_line(tmp_path):
    need_tools("host")
    write_dense_project(tmp_path)
    (tmp_path / "model.c").write_text('#include "model.h"\nint model_run(const void *i, void *o) { return 0 }\n')
    with pytest.raises(BackendError, match=r"does not build for host: model.c:2:.*error: expected ';'"):
        firmware.build_host(tmp_path)
    assert not (tmp_path / firmware.HOST_EXE).exists()
    with pytest.raises(BackendError, match="not a generated mcu project .missing model.h"):
        firmware.build_host(tmp_path / "nothing-here")


# ------------------------------------------------------------------ firmware under QEMU
@pytest.mark.parametrize("target", CORTEX)
def test_firmware_runs_under_qemu(dense, target):
    need_tools(target)
    path, w, b = dense
    info = firmware.build_firmware(path, target)
    assert info.elf == path / "firmware.elf" and info.bin == path / "firmware.bin"
    s = info.sections
    # the weights are const: flash (.rodata), never SRAM; the arena is in .bss
    assert s[".rodata"] >= 4 * (OUT_F * IN_F + OUT_F) and s[".bss"] >= info.arena_bytes == 4 * OUT_F
    assert s[".stack"] == info.stack_reserve_bytes == firmware.STACK_BYTES
    assert info.flash_bytes == s[".text"] + s[".rodata"] + s.get(".ARM.exidx", 0) + s[".data"]
    assert info.sram_bytes == s[".data"] + s[".bss"] + s[".heap"] + s[".stack"] <= info.ram_budget_bytes
    # the raw image holds the flash contents (code, constants, .data's initial values)
    assert abs(info.bin.stat().st_size - info.flash_bytes) <= 8
    for seed in range(2):
        x = _input(seed)
        out, stats = qemu.run_firmware(info.elf, x.tobytes(), target)
        assert_fp32_close(out, reference(w, b, x))
        assert stats["exit_code"] == 0 and stats["model_run"] == 0
        assert 0 < stats["stack_model_bytes"] <= stats["stack_peak_bytes"] <= stats["stack_reserve_bytes"]
        assert 0 < stats["heap_used_bytes"] <= firmware.HEAP_BYTES
        assert "instructions" not in stats
    with pytest.raises(BackendError, match="must hold exactly 64 bytes"):
        qemu.run_firmware(info.elf, b"\0" * 10, target)


def _singlestep_count(elf: Path, x: bytes, target: str, tmp: Path) -> int:
    """Independent count: one log line per instruction (-singlestep), between the markers."""
    (tmp / "input.bin").write_bytes(x)
    log = tmp / "exec.log"
    subprocess.run(qemu.qemu_command(elf, target) + ["-singlestep", "-d", "nochain,exec", "-D", str(log)],
                   cwd=tmp, check=True, capture_output=True, timeout=120)
    n, inside = 0, False
    for line in log.read_text().splitlines():
        sym = line.rsplit(" ", 1)[-1]
        if not line.startswith("Trace"):
            continue
        if sym == "gr_mark_begin":
            inside = True
        elif sym == "gr_mark_end":
            break
        elif inside and sym != "main":
            n += 1
    log.unlink()
    return n


@pytest.mark.parametrize("target", CORTEX)
def test_instruction_count_is_exact(dense, target, tmp_path):
    need_tools(target)
    path, _, _ = dense
    info = firmware.build_firmware(path, target)
    x = _input(0).tobytes()
    _, stats = qemu.run_firmware(info.elf, x, target, per_symbol=True)
    n = stats["instructions"]
    assert n == _singlestep_count(info.elf, x, target, tmp_path)
    assert n > OUT_F * IN_F * 3          # at least load, load, multiply-accumulate per MAC
    per = stats["instructions_per_symbol"]
    assert sum(per.values()) == n and "model_run" in per and "main" not in per
    calls = stats["instructions_per_call"]   # model_run's only call copies the output out
    assert [c["function"] for c in calls] == ["copy_out"]
    assert calls[0]["instructions"] + per["model_run"] == n
    assert "not cycles" in stats["instructions_note"]
    again = qemu.run_firmware(info.elf, x, target, count_instructions=True)[1]
    assert again["instructions"] == n and "instructions_per_symbol" not in again


def test_stack_high_water_mark(tmp_path):
    need_tools("cortex-m4")
    probe = """
__attribute__((noinline)) int stack_probe(int k)
{
    volatile unsigned char buf[3000];
    for (int i = 0; i < 3000; ++i) buf[i] = (unsigned char)(i + k);
    return buf[k];
}
"""
    write_dense_project(tmp_path, extra_c=probe)
    base = firmware.build_firmware(tmp_path, "cortex-m4")
    small = qemu.run_firmware(base.elf, _input(0).tobytes(), "cortex-m4")[1]["stack_model_bytes"]
    src = (tmp_path / "model.c").read_text()
    src = src.replace("    copy_out(out, arena", "    arena[0] += (float)stack_probe(1) * 0.0f;\n    copy_out(out, arena")
    src = "int stack_probe(int k);\n" + src
    (tmp_path / "model.c").write_text(src)
    info = firmware.build_firmware(tmp_path, "cortex-m4")
    big = qemu.run_firmware(info.elf, _input(0).tobytes(), "cortex-m4")[1]["stack_model_bytes"]
    assert small < 256
    assert 3000 <= big <= 3000 + small + 128
    # a frame larger than the 8 KB reserve runs into the heap: caught, not a silent corruption
    (tmp_path / "model.c").write_text(src.replace("3000", "9000"))
    info = firmware.build_firmware(tmp_path, "cortex-m4")
    with pytest.raises(BackendError, match="used its whole 8192-byte stack reserve"):
        qemu.run_firmware(info.elf, _input(0).tobytes(), "cortex-m4")


# ------------------------------------------------------------------ budgets
def _arena_project(path: Path, arena_bytes: int) -> None:
    write_dense_project(path, arena_bytes=arena_bytes)


def test_over_ram_budget_fails_at_link(tmp_path):
    need_tools("cortex-m4")
    _arena_project(tmp_path, 64 * 1024)
    fits = firmware.build_firmware(tmp_path, "cortex-m4", ram_kb=128)
    with pytest.raises(BackendError) as err:
        firmware.build_firmware(tmp_path, "cortex-m4", ram_kb=48)
    msg = str(err.value)
    m = re.search(r"does not fit cortex-m4: it exceeds SRAM by ([\d.]+) KB \(budget 48 KB", msg)
    assert m, msg
    assert "the activation arena alone is 64.0 KB" in msg and "raise --ram-kb" in msg
    assert abs(float(m.group(1)) * 1024 - (fits.sram_bytes - 48 * 1024)) <= 64
    assert "\n" not in msg
    assert not (tmp_path / "firmware.elf").exists() and not (tmp_path / "firmware.bin").exists()


def test_over_flash_budget_fails_at_link(tmp_path):
    need_tools("cortex-m7")
    write_dense_project(tmp_path)
    big = np.arange(40000, dtype=np.float32)   # 160 KB of weights
    (tmp_path / "big.c").write_text(f"const float big_table[40000] = {{{_c_floats(big)}}};\n"
                                    "float big_at(int i) { return big_table[i]; }\n")
    src = (tmp_path / "model.c").read_text()
    (tmp_path / "model.c").write_text("float big_at(int i);\n" + src.replace(
        "float acc = fc_bias[o];", "float acc = fc_bias[o] + 0.0f * big_at((int)x[0] & 1023);"))
    fits = firmware.build_firmware(tmp_path, "cortex-m7", flash_kb=512)
    assert fits.sections[".rodata"] >= 160_000
    with pytest.raises(BackendError, match=r"exceeds flash by ([\d.]+) KB \(budget 128 KB\)") as err:
        firmware.build_firmware(tmp_path, "cortex-m7", flash_kb=128)
    over = float(re.search(r"flash by ([\d.]+) KB", str(err.value)).group(1)) * 1024
    assert abs(over - (fits.flash_bytes - 128 * 1024)) <= 64


# ------------------------------------------------------------------ failures under QEMU
def test_fault_and_hang_fail_clearly(tmp_path):
    need_tools("cortex-m4")
    write_dense_project(tmp_path)
    (tmp_path / "model.c").write_text(
        '#include "model.h"\nint model_run(const void *in, void *out)\n'
        '{ (void)in; (void)out; __asm__ volatile("udf #0"); return 0; }\n')
    info = firmware.build_firmware(tmp_path, "cortex-m4")
    with pytest.raises(BackendError, match="hit a CPU fault while running the model"):
        qemu.run_firmware(info.elf, bytes(64), "cortex-m4")
    with pytest.raises(BackendError, match="hit a CPU fault while running the model"):
        qemu.run_firmware(info.elf, bytes(64), "cortex-m4", count_instructions=True)
    (tmp_path / "model.c").write_text(
        '#include "model.h"\nint model_run(const void *in, void *out)\n'
        '{ (void)in; (void)out; for (volatile int i = 1; i;) {} return 0; }\n')
    info = firmware.build_firmware(tmp_path, "cortex-m4")
    with pytest.raises(BackendError, match="QEMU did not finish within 2 s"):
        qemu.run_firmware(info.elf, bytes(64), "cortex-m4", timeout_s=2)
    with pytest.raises(BackendError, match="QEMU did not finish within 2 s"):
        qemu.run_firmware(info.elf, bytes(64), "cortex-m4", timeout_s=2, count_instructions=True)


# ------------------------------------------------------------------ the Makefile alone
def test_makefile_builds_and_runs_without_python(dense, tmp_path):
    need_tools("cortex-m4")
    src, w, b = dense
    firmware.build_firmware(src, "cortex-m4", ram_kb=256)
    proj = tmp_path / "proj"
    shutil.copytree(src, proj, ignore=shutil.ignore_patterns("firmware.*", firmware.HOST_EXE))
    x = _input(5)
    (proj / "input.bin").write_bytes(x.tobytes())
    env = {"PATH": os.environ["PATH"], "LC_ALL": "C"}
    run = subprocess.run(["make", "-s", "run"], cwd=proj, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "gr: model_run=0" in run.stdout and "stack_model=" in run.stdout   # default TARGET: cortex-m4
    assert (proj / "build" / "cortex-m4" / "firmware.elf").is_file()
    assert "LENGTH = 256K" in (proj / "build" / "cortex-m4" / "link.ld").read_text()
    assert_fp32_close((proj / "output.bin").read_bytes(), reference(w, b, x))
    (proj / "output.bin").unlink()
    host = subprocess.run(["make", "-s", "run", "TARGET=host"], cwd=proj, env=env, capture_output=True,
                          text=True, timeout=300)
    assert host.returncode == 0, host.stderr
    assert_fp32_close((proj / "output.bin").read_bytes(), reference(w, b, x))
    bad = subprocess.run(["make", "TARGET=cortex-m0"], cwd=proj, env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown TARGET=cortex-m0" in bad.stderr


def test_per_layer_attribution():
    ops = [{"path": "conv1", "op": "aten.conv2d", "kernel": "k_conv"},
           {"path": "fc", "op": "aten.linear", "kernel": "k_linear"}]
    calls = [{"function": "k_conv", "instructions": 100}, {"function": "gr_copy_nd", "instructions": 7},
             {"function": "k_linear", "instructions": 20}, {"function": "memcpy", "instructions": 3}]
    got = qemu.per_layer(ops, calls)
    assert [l["instructions"] for l in got["layers"]] == [100, 27]   # the copy belongs to fc
    assert got["after_last_layer"] == 3 and got["calls_not_named_by_an_op"] == 2 and got["matched_all"]
    assert not qemu.per_layer(ops + [{"path": "x", "kernel": "k_missing"}], calls)["matched_all"]


def test_measure_for_the_report(dense):
    need_tools("cortex-m4")
    path, _, _ = dense
    firmware.build_firmware(path, "cortex-m4")
    ops = [{"path": "fc", "op": "copy", "kernel": "copy_out"}]
    got = qemu.measure(path, "cortex-m4", _input(0).tobytes(), ops=ops)
    assert 0 < got["stack_model_bytes"] <= got["stack_peak_bytes"]
    layer = got["instructions_per_layer"]["layers"][0]
    assert 0 < layer["instructions"] < got["instructions"] == sum(got["instructions_per_symbol"].values())
    plain = qemu.measure(path, "cortex-m4", _input(0).tobytes(), count_instructions=False)
    assert "instructions" not in plain and plain["stack_model_bytes"] == got["stack_model_bytes"]
