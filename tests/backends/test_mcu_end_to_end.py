"""mcu backend end to end through the real CLI: compile for Cortex-M, build the ELF,
run it under QEMU with `gradrewrite run --compare` (fp32 within rounding of the torch
reference, int8 bit-exact against the integer reference), and a model over its SRAM
budget failing at link time with nothing written."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.backends.test_mcu_firmware import need_tools
from tests.cli.conftest import assert_user_error, run_cli



@pytest.fixture(scope="module")
def small_cnn_pt2(tmp_path_factory) -> Path:
    """small_cnn.pt2 as examples/make_models.py writes it (examples/models/ is not in git)."""
    from examples.models import small_cnn

    model, inputs = small_cnn()
    path = tmp_path_factory.mktemp("models") / "small_cnn.pt2"
    torch.export.save(torch.export.export(model.eval(), inputs), str(path))
    return path


def _input(tmp_path: Path, seed: int = 0) -> tuple[Path, np.ndarray]:
    x = np.random.default_rng(seed).standard_normal((1, 3, 32, 32)).astype(np.float32)
    path = tmp_path / f"x{seed}.npy"
    np.save(path, x)
    return path, x


def _eager(pt2: Path, x: np.ndarray) -> np.ndarray:
    module = torch.export.load(str(pt2)).module()
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


@pytest.mark.slow
def test_fp32_cortex_m4_compile_run_compare(tmp_path, small_cnn_pt2):
    need_tools("cortex-m4")
    out = tmp_path / "out"
    run_cli("compile", small_cnn_pt2, "-p", "fold-bn", "--backend", "mcu", "--target", "cortex-m4",
            "-o", out, "-q", check=True)
    project = out / "mcu"
    assert (project / "firmware.elf").stat().st_size > 0 and (project / "firmware.bin").stat().st_size > 0
    fw = json.loads((project / "model.json").read_text())["firmware"]
    assert fw["target"] == "cortex-m4" and fw["ram_budget_bytes"] == 320 * 1024
    assert fw["sram_bytes"] <= fw["ram_budget_bytes"] and fw["flash_bytes"] <= fw["flash_budget_bytes"]
    assert fw["sections"][".bss"] >= fw["arena_bytes"] > 0   # the arena is static SRAM
    makefile = (project / "Makefile").read_text()   # plain `make` rebuilds this same firmware
    assert "TARGET      ?= cortex-m4" in makefile and "RAM_KB      ?= 320" in makefile
    report = json.loads((out / "report.json").read_text())
    runtime = report["mcu"]["runtime"]   # measured in QEMU at compile time
    assert runtime["instructions"] > 0 and 0 < runtime["stack_peak_bytes"] <= runtime["stack_reserve_bytes"]
    layers = runtime["instructions_per_layer"]["layers"]
    assert layers and sum(layer["instructions"] for layer in layers) <= runtime["instructions"]
    assert "skipped" in report["latency_ms"]   # emulator wall time is not reported as latency

    xpath, x = _input(tmp_path)
    proc = run_cli("run", out, "--input", xpath, "--compare", "-o", tmp_path / "y.npz", check=True)
    assert "compare: ok (fp32, within rounding of the torch reference" in proc.stdout
    y = np.load(tmp_path / "y.npz")["output_0"]
    ref = _eager(small_cnn_pt2, x)
    assert np.linalg.norm(y - ref) <= 1e-5 * np.linalg.norm(ref)


@pytest.mark.slow
def test_int8_cortex_m7_bit_exact(tmp_path, small_cnn_pt2):
    need_tools("cortex-m7")
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(1).standard_normal((8, 1, 3, 32, 32)).astype(np.float32))
    out = tmp_path / "out"
    run_cli("compile", small_cnn_pt2, "-p", "fold-bn,quantize(mode=static)", "--calib", calib, "--backend", "mcu",
            "--target", "cortex-m7", "-o", out, "-q", check=True)
    facts = json.loads((out / "mcu" / "model.json").read_text())
    assert facts["int8_layers"] > 0 and facts["firmware"]["target"] == "cortex-m7"
    xpath, x = _input(tmp_path, seed=3)
    proc = run_cli("run", out, "--input", xpath, "--compare", "-o", tmp_path / "y.npz", check=True)
    assert "compare: ok (int8, bit-exact against the integer reference; max abs error 0," in proc.stdout
    y = np.load(tmp_path / "y.npz")["output_0"]
    ref = _eager(small_cnn_pt2, x)   # quantization error, not a bug: a few percent of the logits' scale
    assert np.linalg.norm(y - ref) <= 0.1 * np.linalg.norm(ref)


@pytest.mark.slow
def test_over_sram_budget_fails_to_link_and_writes_nothing(tmp_path, small_cnn_pt2):
    need_tools("cortex-m4")
    out = tmp_path / "out"
    proc = run_cli("compile", small_cnn_pt2, "-p", "fold-bn", "--backend", "mcu", "--target", "cortex-m4",
                   "--ram-kb", "16", "-o", out, "-q")
    line = assert_user_error(proc, "does not fit cortex-m4: it exceeds SRAM by", "budget 16 KB",
                             "the activation arena alone is", "raise --ram-kb")
    assert "region `RAM' overflowed" not in line
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_mcu_flags_are_routed_to_mcu_only():
    from gradrewrite.cli import _backend_options
    from gradrewrite.errors import ConfigError

    assert _backend_options("mcu", quiet=True, target="cortex-m7", ram_kb=256, flash_kb=None) == \
        {"target": "cortex-m7", "ram_kb": 256}
    with pytest.raises(ConfigError, match="--flash-kb, --ram-kb do not apply to --backend ort"):
        _backend_options("ort", quiet=True, ram_kb=64, flash_kb=512)
    with pytest.raises(ConfigError, match="--ram-kb does not apply to --backend tvm"):
        _backend_options("tvm", quiet=True, ram_kb=64)


def test_compare_needs_an_mcu_artifact(tmp_path, small_cnn_pt2):
    import gradrewrite as gr

    out = tmp_path / "t"
    gr.compile(gr.load(small_cnn_pt2), out, latency_runs=0, verify_inputs=1)
    xpath, _ = _input(tmp_path)
    proc = run_cli("run", out, "--input", xpath, "--compare", "-o", tmp_path / "y.npz")
    assert_user_error(proc, "--compare checks mcu artifacts", "is a torch artifact")
    assert not (tmp_path / "y.npz").exists()
