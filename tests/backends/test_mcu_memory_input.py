"""mcu model input: an input only int8 quantize nodes read is taken as int8 by the C API
(runners quantize float inputs on the host, torch's way), and the packed input lives in
the arena (``model_input_buffer()``), reused once the model has read it."""
from __future__ import annotations

import subprocess

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from examples.models import small_cnn
from gradrewrite.backends.mcu.inference.runner import make_runner
from gradrewrite.backends.mcu.packing import quantize_input
from gradrewrite.rewrite import int8_layers as int8
from gradrewrite.backends.mcu.firmware.build import build_host
from gradrewrite.backends.mcu.inference.codegen import INPUT_BUFFER, plan_arena, write_project
from gradrewrite.backends.mcu.inference.lowering import lower
from gradrewrite.compiler import CompileOptions, compile_graph
from gradrewrite.rewrite.capture import capture

from ..cli.conftest import run_cli
from .mcu_helpers import build_and_run, graph_of
from .test_mcu_memory_int8 import Block


class FloatAlsoReads(nn.Module):
    """The input is quantized for one branch and read as float by another."""

    def __init__(self):
        super().__init__()
        self.block = Block(cin=4, mid=8, cout=4)

    def forward(self, x):
        return self.block(x) + F.relu(x)


def _project(graph, tmp_path):
    prog = lower(graph)
    project = tmp_path / "mcu"
    facts = write_project(prog, project, source="test")
    build_host(project)
    return prog, project, facts


def test_int8_input_replaces_the_quantize_step(tmp_path):
    graph = graph_of(Block(), torch.randn(1, 4, 8, 8))
    prog, project, facts = _project(graph, tmp_path)
    scale, zp = Block().q[0]
    assert facts["inputs"] == [{"shape": [1, 4, 8, 8], "dtype": "int8", "bytes": 256,
                                "quantize": {"scale": scale, "zero_point": zp, "from_dtype": "float32"}}]
    assert "gr_quantize_f32_i8" not in [s.kernel for s in prog.steps]
    model_h = (project / "model.h").read_text()
    assert '#define MODEL_INPUT0_DTYPE "int8"' in model_h and f"#define MODEL_INPUT0_ZERO_POINT {zp}" in model_h
    assert "#define MODEL_INPUT0_SCALE" in model_h
    run = make_runner(project, {**facts, "target": "host"})
    gen = torch.Generator().manual_seed(11)
    for _ in range(2):  # float inputs are quantized on the host exactly as torch does
        x = torch.randn(1, 4, 8, 8, generator=gen) * 3
        (got,) = run(x.numpy())
        assert np.array_equal(got, int8.integer_reference(graph, x)[0].numpy())
        xq = quantize_input(x.numpy(), facts["inputs"][0]["quantize"])
        assert xq.dtype == np.int8 and np.array_equal(run(xq)[0], got)  # int8 goes through as is


def test_input_with_a_float_reader_stays_float(tmp_path):
    graph = graph_of(FloatAlsoReads(), torch.randn(1, 4, 8, 8))
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(12))
    (got,), facts = build_and_run(graph, tmp_path, x)
    assert facts["inputs"][0]["dtype"] == "float32" and "quantize" not in facts["inputs"][0]
    assert torch.equal(got, int8.integer_reference(graph, x)[0])


def test_input_is_an_arena_buffer_reused_after_its_last_reader(tmp_path):
    graph = graph_of(Block(cin=8, mid=8, cout=8, expand=False), torch.randn(1, 8, 12, 12))
    prog, project, facts = _project(graph, tmp_path)
    plan = plan_arena(prog).plan
    inp = next(b for b in plan.buffers if b.name == INPUT_BUFFER)
    assert inp.size == 8 * 12 * 12 and inp.start == 0 and inp.end == 0  # read by the first conv only
    lo, hi = plan.offsets[INPUT_BUFFER], plan.offsets[INPUT_BUFFER] + inp.size
    later = [b for b in plan.buffers if b.start > inp.end
             and plan.offsets[b.name] < hi and lo < plan.offsets[b.name] + b.size]
    assert later, "no later tensor reuses the input's bytes"
    assert facts["input_in_arena"] and "void *model_input_buffer(void);" in (project / "model.h").read_text()


DRIVER = r"""
#include <stdio.h>
#include <string.h>
#include "model.h"
/* model_run from a caller's buffer and from model_input_buffer() give the same bytes,
   twice in a row (a run clobbers the arena input, so the caller refills it) */
int main(void) {
    static unsigned char in[MODEL_INPUT_BYTES], out[4][MODEL_OUTPUT_BYTES];
    unsigned i;
    for (i = 0; i < MODEL_INPUT_BYTES; i++) in[i] = (unsigned char)(i * 37u + 11u);
    for (i = 0; i < 2; i++) {
        if (model_run(in, out[2 * i])) return 2;
        memcpy(model_input_buffer(), in, MODEL_INPUT_BYTES);
        if (model_run(model_input_buffer(), out[2 * i + 1])) return 3;
    }
    for (i = 1; i < 4; i++)
        if (memcmp(out[0], out[i], MODEL_OUTPUT_BYTES)) { printf("run %u differs\n", i); return 1; }
    printf("same\n");
    return 0;
}
"""


def test_model_run_copies_a_caller_input_or_uses_the_arena_one(tmp_path):
    graph = graph_of(Block(), torch.randn(1, 4, 8, 8))
    _, project, _ = _project(graph, tmp_path)
    (project / "driver.c").write_text(DRIVER)
    sources = ["driver.c", "model.c", "weights.c", *sorted(str(p.relative_to(project))
                                                        for p in (project / "kernels").glob("*.c"))]
    subprocess.run(["cc", "-O1", "-I.", "-o", "driver", *sources, "-lm"], cwd=project, check=True)
    proc = subprocess.run(["./driver"], cwd=project, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "same", proc.stdout


def test_firmware_reads_the_int8_input_into_the_arena(tmp_path):
    """Cortex-M4 under QEMU: main.c reads the (host-quantized) input file straight into
    model_input_buffer(); the run is bit-exact and the harness has no input array."""
    from gradrewrite.backends.mcu.firmware import build as firmware

    from .test_mcu_firmware import need_tools

    need_tools("cortex-m4")
    graph = graph_of(Block(stride=2), torch.randn(1, 4, 12, 12))
    _, project, facts = _project(graph, tmp_path)
    info = firmware.build_firmware(project, "cortex-m4")
    x = torch.randn(1, 4, 12, 12, generator=torch.Generator().manual_seed(13)) * 2
    (got,) = make_runner(project, {**facts, "target": "cortex-m4"})(x.numpy())
    assert np.array_equal(got, int8.integer_reference(graph, x)[0].numpy())
    symbols = subprocess.run(["arm-none-eabi-nm", str(info.elf)], capture_output=True, text=True,
                             check=True).stdout.split()
    assert "input_storage" not in symbols and "model_input_buffer" in symbols


def test_fp32_model_keeps_a_float_input(tmp_path):
    model, (x,) = small_cnn()
    (got,), facts = build_and_run(capture(model, (x,)), tmp_path, x)
    assert facts["inputs"] == [{"shape": [1, 3, 32, 32], "dtype": "float32", "bytes": 3 * 32 * 32 * 4}]
    with torch.no_grad():
        assert torch.allclose(got, model(x), atol=1e-4, rtol=1e-4)


def test_cli_run_compare_quantizes_float_inputs(tmp_path):
    """`gradrewrite run OUT --input x.npy --compare` on an int8-input artifact: the float
    input is quantized on the host and the outputs are bit-exact against the reference."""
    model, x = small_cnn()
    gen = torch.Generator().manual_seed(5)
    calib = [(torch.randn(1, 3, 32, 32, generator=gen),) for _ in range(2)]
    opts = CompileOptions(passes="fold-bn,quantize(mode=static)", backend="mcu", latency_runs=0,
                          verify_inputs=1, calibration=calib, backend_options={"target": "host"})
    art = compile_graph(capture(model, x), tmp_path / "out", opts)
    assert art.report["mcu"]["inputs"][0]["dtype"] == "int8" and art.report["mcu"]["int8_check"]["bit_exact"]
    np.save(tmp_path / "x.npy", torch.randn(1, 3, 32, 32, generator=gen).numpy())
    proc = run_cli("run", tmp_path / "out", "--input", tmp_path / "x.npy", "--compare",
                   "-o", tmp_path / "y.npz", check=True)
    assert "compare: ok (int8, bit-exact against the integer reference" in proc.stdout
