"""Patch-based execution of the first CNN stage (``inference/patches.py``): the patched
program equals the unpatched one bit for bit (fp32 and int8, streamed and plain int8
kernels, on the host and under QEMU) at odd shapes (stride 2 inside the stage, padding,
a split tensor no grid divides, a residual add), and the planner's choices and report."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradrewrite.backends.mcu.firmware import build as firmware, qemu
from gradrewrite.backends.mcu.inference import patches
from gradrewrite.backends.mcu.inference.codegen import plan_arena, write_project
from gradrewrite.backends.mcu.inference.lowering import lower
from gradrewrite.backends.mcu.packing import pack_inputs
from gradrewrite.backends.options import make_options
from gradrewrite.compiler import run_pipeline
from gradrewrite.errors import ConfigError
from gradrewrite.rewrite.registry import PassContext

from .mcu_helpers import graph_of

SHAPE = (1, 3, 37, 29)   # odd: no grid divides the split tensor (12 x 10 x 8)


class OddStage(nn.Module):
    """A first stage like MobileNetV2's (3x3 s2 conv, depthwise, pointwise), a generic 3x3
    stride-2 conv, an expand + depthwise + project block with a residual add, then a head."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.c0 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 8, 1)
        self.c1 = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.exp = nn.Conv2d(12, 24, 1)
        self.dw2 = nn.Conv2d(24, 24, 3, padding=1, groups=24)
        self.proj = nn.Conv2d(24, 12, 1)
        self.c2 = nn.Conv2d(12, 16, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 5)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x):
        relu6 = nn.ReLU6()   # aten.hardtanh: what the int8 layers fuse
        y = self.pw(relu6(self.dw(relu6(self.c0(x)))))
        y = F.relu(self.c1(y))
        y = y + self.proj(relu6(self.dw2(relu6(self.exp(y)))))
        y = F.relu(self.c2(y))
        return self.fc(torch.flatten(self.pool(y), 1))


def _graph(int8: bool):
    graph = graph_of(OddStage(), torch.randn(SHAPE))
    if int8:
        gen = torch.Generator().manual_seed(5)
        calib = [(torch.randn(SHAPE, generator=gen),) for _ in range(4)]
        run_pipeline(graph, "fold-bn,quantize(mode=static)", ctx=PassContext(seed=0, calibration=calib), verify=False)
    return graph


def _build(prog, path):
    facts = write_project(prog, path, source="test")
    firmware.build_host(path)
    return facts


def _split_at_add(prog):
    """The stage up to (and with) the residual add: stride 2 twice inside, the add's
    operand read both by it and, with a halo, by the expand conv."""
    stage = patches.find_stage(prog)
    k = 1 + next(i for i, layer in enumerate(stage.layers) if layer.kind == "elementwise" and len(layer.inputs) == 2)
    assert k in stage.splits(prog) and len(stage.layers) > k   # the stage could go on: c2
    return stage, k


CASES = [("fp32", False, True), ("int8", True, True), ("int8, not streamed", True, False)]


@pytest.mark.parametrize("name,int8,stream", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("grid", [(3, 3), (2, 5), (10, 8)])
def test_patched_equals_unpatched_bit_for_bit(tmp_path, name, int8, stream, grid):
    graph = _graph(int8)
    prog = lower(graph, stream=stream)
    base = _build(prog, tmp_path / "base")
    stage, k = _split_at_add(prog)
    kernels = {layer.step.kernel for layer in stage.layers[:k]}
    if int8 and stream:
        assert "gr_pw_dw_s8" in kernels and "gr_depthwise3x3_s8" in kernels
    if int8 and not stream:
        assert "gr_pw_dw_s8" not in kernels and "gr_pointwise_s8" in kernels
    patched = patches.patch(prog, stage, k, grid)
    assert sum(s.kernel == "gr_patch_read" for s in patched.program.steps) == grid[0] * grid[1]
    assert patched.macs > patched.stage_macs   # halos overlap: some recompute
    facts = _build(patched.program, tmp_path / "patched")
    assert not facts["input_in_arena"]
    assert "#define MODEL_INPUT_STREAMED 1" in (tmp_path / "patched" / "model.h").read_text()
    gen = torch.Generator().manual_seed(17)
    for _ in range(2):
        data = pack_inputs([torch.randn(SHAPE, generator=gen).numpy() * 2], base["inputs"])
        want = firmware.run_host(tmp_path / "base" / firmware.HOST_EXE, data)
        assert firmware.run_host(tmp_path / "patched" / firmware.HOST_EXE, data) == want


@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
def test_patched_firmware_under_qemu(tmp_path, int8):
    target = "cortex-m4"
    reason = firmware.toolchain_missing(target)
    if reason:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(reason)
    graph = _graph(int8)
    prog = lower(graph)
    base = _build(prog, tmp_path / "base")
    stage, k = _split_at_add(prog)
    _build(patches.patch(prog, stage, k, (3, 2)).program, tmp_path / "patched")
    data = pack_inputs([torch.randn(SHAPE, generator=torch.Generator().manual_seed(2)).numpy()], base["inputs"])
    outs = []
    for name in ("base", "patched"):
        info = firmware.build_firmware(tmp_path / name, target)
        raw, stats = qemu.run_firmware(info.elf, data, target)
        assert stats["exit_code"] == 0 and stats["model_run"] == 0
        outs.append(raw)
    assert outs[0] == outs[1]


def test_planner_chooses_split_and_grid_within_overhead():
    prog = lower(_graph(True))
    best, report = patches.plan(prog, max_overhead=0.5)
    assert best is not None
    assert report["split_step"] == best.k and report["grid"] == list(best.grid)
    assert report["stage_ends_at"].endswith("(gr_avg_pool2d_s8)")   # the first step no patch can run
    assert report["patches"] == best.grid[0] * best.grid[1]
    assert 0 < report["macs_overhead"] <= 0.5
    assert report["arena_bytes"] == plan_arena(best.program).plan.arena_bytes
    assert report["arena_bytes"] == min(c["arena_bytes"] for c in report["candidates"] if c["arena_bytes"])
    assert report["stage_macs_patched"] - report["stage_macs"] == \
        pytest.approx(report["macs_overhead"] * report["model_macs"], abs=report["model_macs"] * 1e-4)
    # a tighter budget never picks a candidate over it
    tight, rep = patches.plan(prog, max_overhead=0.02)
    assert tight is None or rep["macs_overhead"] <= 0.02
    assert all(c["macs_overhead"] > 0.02 for c in rep["candidates"] if c.get("skipped") == "over the recompute limit")
    assert all(c["arena_bytes"] or c["skipped"] for c in rep["candidates"])


def test_options_off_auto_and_grid():
    prog = lower(_graph(True))
    same, report = patches.apply(prog, "off")
    assert same is prog and report == {"applied": False, "mode": "off"}
    # auto: only when the patched arena plus the whole input is below the unpatched arena;
    # this small model's unpatched arena is not large enough for that
    auto, report = patches.apply(prog, "auto", max_overhead=0.5)
    assert report["applied"] == (auto is not prog)
    if not report["applied"]:
        assert "is not below" in report["reason"]
    forced, report = patches.apply(prog, "2x3", max_overhead=10)
    assert report["applied"] and report["grid"] == [2, 3] and forced.notes["input_streamed"]
    with pytest.raises(ValueError, match="use auto, on, off"):
        patches.apply(prog, "four")
    assert make_options("mcu", {"patches": "4x4"}).patches == "4x4"
    with pytest.raises(ConfigError, match="valid patches"):
        make_options("mcu", {"patches": "many"})


def test_stage_ends_at_an_unpatchable_step():
    """A model whose first step is not a convolution over the input has no stage."""

    class Flat(nn.Module):
        def forward(self, x):
            return torch.softmax(x, -1)

    prog = lower(graph_of(Flat(), torch.randn(1, 3, 4, 4)))
    best, report = patches.plan(prog)
    assert best is None and "reason" in report


def make_odd():
    return OddStage(), (torch.randn(SHAPE),)


def test_check_cli_reports_the_patch_plan():
    from ..cli.conftest import run_cli

    res = run_cli("check", "--module", "tests.backends.test_mcu_patches:make_odd", check=True)
    line = next(l for l in res.stdout.splitlines() if l.startswith("patches: "))
    assert "split after" in line and "patches," in line and "more MACs (limit 20%)" in line


def test_every_split_of_odd_convs_is_bit_exact(tmp_path):
    """Dilation 2 with groups, a 3x1 kernel with stride (1, 2) and one-sided use of its
    padding, element-wise activations in between (fp32): every split, a 2x3 grid."""
    from .test_mcu_codegen import ConvZoo

    torch.manual_seed(0)
    shape = (1, 3, 23, 18)
    prog = lower(graph_of(ConvZoo(), torch.randn(shape)))
    base = _build(prog, tmp_path / "base")
    stage = patches.find_stage(prog)
    splits = stage.splits(prog)
    assert len(splits) >= 5 and any(layer.step.kernel == "gr_unary_f32" for layer in stage.layers)
    data = pack_inputs([torch.randn(shape).numpy()], base["inputs"])
    want = firmware.run_host(tmp_path / "base" / firmware.HOST_EXE, data)
    for k in splits:
        _build(patches.patch(prog, stage, k, (2, 3)).program, tmp_path / f"k{k}")
        assert firmware.run_host(tmp_path / f"k{k}" / firmware.HOST_EXE, data) == want, f"split {k}"


DRIVER = r"""
#include <stdio.h>
#include <string.h>
#include "model.h"
/* patched model_run: from a caller's buffer, and through model_read_input (NULL input),
   the same bytes as the harness wrote to expected.bin; a failing read fails the run */
static unsigned char in[MODEL_INPUT_BYTES];
static int fail;
int model_read_input(uint32_t offset, void *dst, uint32_t n) {
    if (fail || offset + n > MODEL_INPUT_BYTES) return -1;
    memcpy(dst, in + offset, n);
    return 0;
}
int main(void) {
    static unsigned char out[2][MODEL_OUTPUT_BYTES], want[MODEL_OUTPUT_BYTES];
    FILE *f = fopen("input.bin", "rb"), *g = fopen("expected.bin", "rb");
    if (!f || !g || fread(in, 1, sizeof in, f) != sizeof in || fread(want, 1, sizeof want, g) != sizeof want) return 2;
    if (model_run(in, out[0]) || model_run(NULL, out[1])) return 3;
    fail = 1;
    if (model_run(NULL, out[1]) == 0) return 4;
    printf(memcmp(out[0], want, sizeof want) || memcmp(out[1], want, sizeof want) ? "differs\n" : "same\n");
    return 0;
}
"""


def test_patched_model_run_reads_a_caller_buffer_or_model_read_input(tmp_path):
    import subprocess

    prog = lower(_graph(True))
    stage, k = _split_at_add(prog)
    project = tmp_path / "patched"
    facts = _build(patches.patch(prog, stage, k, (2, 2)).program, project)
    data = pack_inputs([torch.randn(SHAPE, generator=torch.Generator().manual_seed(4)).numpy()], facts["inputs"])
    (project / "input.bin").write_bytes(data)
    (project / "expected.bin").write_bytes(firmware.run_host(project / firmware.HOST_EXE, data))
    (project / "driver.c").write_text(DRIVER)
    sources = ["driver.c", "model.c", "weights.c", *sorted(str(p.relative_to(project))
                                                        for p in (project / "kernels").glob("*.c"))]
    subprocess.run(["cc", "-O1", "-I.", "-o", "driver", *sources, "-lm"], cwd=project, check=True)
    proc = subprocess.run(["./driver"], cwd=project, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "same", (proc.returncode, proc.stdout)
