"""On-device training step (mcu backend, fp32): generated C vs the torch training-step graph.

small_cnn with batch norm folded, captured as one training-step graph, pruned by
sparse-update (or not: full update), lowered to ``model_train_step`` and built with the
host cc. Three SGD steps on a fixed batch must give the parameters the torch graph
gives (``apply_step``), within fp32 rounding: |C - torch| <= 1e-5 * max(1, max|p|)
per parameter (observed: about 1e-7; a wrong gradient moves a parameter by
lr * |grad|, orders above that). Frozen parameters are const (flash) arrays.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from examples.models import small_cnn
from gradrewrite.backends.mcu.firmware.build import build_host
from gradrewrite.backends.mcu.inference.lowering import Unsupported
from gradrewrite.backends.mcu.inference.runner import make_runner
from gradrewrite.backends.mcu.training.host import build_train_host, run_train_host, write_train
from gradrewrite.backends.mcu.training.lowering import lower_train
from gradrewrite.compiler import run_pipeline
from gradrewrite.rewrite.capture import capture
from gradrewrite.rewrite.train_step import apply_step, capture_train_step

LR = 0.05
STEPS = 3
REL_TOL = 1e-5
SCHEMES = {
    "sparse": "sparse-update(bias_last=2,weights='-1:1,-2:1/2')",            # fc + half of conv.0's filters
    "sparse_deeper": "sparse-update(bias_last=5,weights='-1:1,-2:1,-3:1/4')",  # backward through the residual
    "full": None,
}


def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 32, 32, generator=g), torch.tensor([1, 3])


@pytest.fixture(scope="module")
def folded():
    model, _ = small_cnn()
    graph = capture(model, (torch.randn(2, 3, 32, 32),))
    run_pipeline(graph, "fold-bn", verify=False)
    return graph


def train_graph(folded, scheme, **kw):
    graph = capture_train_step(folded, "cross_entropy", batch(), lr=LR, **kw)
    if scheme:
        run_pipeline(graph, scheme, verify=False)
    return graph


def param(graph, path):
    node = next(n for n in graph.gm.graph.nodes if n.op == "get_attr" and n.target == path)
    return graph.attr(node).detach().clone()


@pytest.mark.parametrize("name", list(SCHEMES))
def test_c_training_step_matches_torch(folded, name, tmp_path):
    graph = train_graph(folded, SCHEMES[name])
    ts = graph.meta["train_step"]
    trained = [p for p, info in ts["params"].items() if info.get("trained")]
    frozen = [p for p, info in ts["params"].items() if not info.get("trained")]
    before = {p: param(graph, ts["params"][p]["attr"]) for p in ts["params"]}

    facts = write_train(graph.clone(), tmp_path / "mcu", source="small_cnn")
    build_train_host(tmp_path / "mcu")
    x, y = batch()
    losses, got = run_train_host(tmp_path / "mcu", x.numpy(), y.numpy(), STEPS, LR)

    ref_losses = []
    for _ in range(STEPS):
        out = graph.gm(x, y)
        ref_losses.append(float(out[0]))
        apply_step(graph, out)

    assert sorted(got) == sorted(trained)
    for p in trained:
        want = param(graph, ts["params"][p]["attr"]).numpy()
        assert not np.array_equal(want, before[p].numpy()), f"{p} did not move in torch"
        rows = ts["params"][p]["rows"]
        if rows is not None:  # partial channels: only the first rows are in SRAM, the rest never move
            assert got[p].shape[0] == rows
            np.testing.assert_array_equal(want[rows:], before[p].numpy()[rows:])
            want = want[:rows]
        err = np.abs(got[p] - want).max()
        assert err <= REL_TOL * max(1.0, np.abs(want).max()), f"{p}: max |C - torch| = {err:.3g}"
    for p in frozen:  # the torch step leaves them alone; the C code keeps them in flash
        np.testing.assert_array_equal(param(graph, ts["params"][p]["attr"]).numpy(), before[p].numpy())
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert losses[0] > losses[1] > losses[2], losses  # a fixed batch: the loss falls every step

    weights_c = (tmp_path / "mcu" / "weights.c").read_text()
    mutable = re.findall(r"^float (\w+)\[", weights_c, flags=re.M)
    assert len(mutable) == len(trained)  # only trained parameters are writable (SRAM)
    assert facts["trained_bytes"] == sum(4 * before[p].numel() // before[p].shape[0]
                                         * (ts["params"][p]["rows"] or before[p].shape[0]) for p in trained)
    assert set(facts["frozen"]) == set(frozen)
    kernels = {op["kernel"] for op in facts["ops"]}
    assert "gr_sgd_f32" in kernels and "gr_nll_loss_f32" in kernels
    if name == "sparse":  # the pruned backward: no input gradient below conv.0, no gradient for frozen layers
        assert "gr_conv2d_bwd_input_f32" not in kernels
        assert sum(op["kernel"] == "gr_conv2d_bwd_weight_f32" for op in facts["ops"]) == 1


def test_update_order_follows_the_graph(folded):
    """Updates run in the graph's order (the sparse-update reordering's), and each
    gradient dies at its update: no later kernel reads it."""
    graph = train_graph(folded, SCHEMES["sparse"])
    order = [n.meta["custom"]["writes"] for n in graph.gm.graph.nodes
             if n.target == torch.ops.aten.sub.Tensor and n.meta.get("custom", {}).get("writes")]
    tp = lower_train(graph)
    steps = tp.program.steps
    sgd = [i for i, s in enumerate(steps) if s.kernel == "gr_sgd_f32"]
    assert [steps[i].writes[0].path for i in sgd] == order
    for i in sgd:
        grad = steps[i].reads[1]
        assert not any(grad in s.reads for s in steps[i + 1:]), f"{grad.name} read after its update"
    assert tp.forward_steps == next(i for i, s in enumerate(steps) if s.kernel == "gr_log_softmax_tr_f32")


def test_model_run_beside_the_training_step(folded, tmp_path):
    """The same project builds with the inference harness (main.c): model_run is the
    forward prefix of the step and gives the model's logits."""
    graph = train_graph(folded, SCHEMES["sparse"])
    facts = write_train(graph, tmp_path / "mcu", source="small_cnn")
    build_host(tmp_path / "mcu")
    x, _ = batch()
    (logits,) = make_runner(tmp_path / "mcu", {**facts, "target": "host"})(x.numpy())
    want = folded.gm(x)
    want = want[0] if isinstance(want, (tuple, list)) else want
    np.testing.assert_allclose(logits, want.detach().numpy(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scheme", ["sparse", None])
def test_sgd_momentum(folded, scheme, tmp_path):
    """SGD with momentum: the buffers live in SRAM (trained rows only), start at zero and
    follow torch's step graph, as the parameters do. Two steps: momentum moves the
    parameters far enough that a third step can flip a relu on a rounding difference
    (observed on the full update: 3e-8 after two steps, 1.6e-5 after three)."""
    graph = train_graph(folded, SCHEMES[scheme] if scheme else None, momentum=0.9)
    ts = graph.meta["train_step"]
    facts = write_train(graph.clone(), tmp_path / "mcu", source="small_cnn")
    state = [p for p in facts["trained"] if p.get("optimizer_state")]
    assert {p["path"] for p in state} == {f"{p}_momentum" for p, i in ts["params"].items() if i["trained"]}
    build_train_host(tmp_path / "mcu")
    x, y = batch()
    _, got = run_train_host(tmp_path / "mcu", x.numpy(), y.numpy(), 2, LR)
    for _ in range(2):
        apply_step(graph, graph.gm(x, y))
    for p, value in got.items():
        attr = ts["params"][p.removesuffix("_momentum")]["attr"] + ("_momentum" if p.endswith("_momentum") else "")
        want = graph.attr(attr).detach().numpy()[:len(value)]
        err = np.abs(value - want).max()
        assert err <= REL_TOL * max(1.0, np.abs(want).max()), f"{p}: max |C - torch| = {err:.3g}"


class MobileBlock(torch.nn.Module):
    """Ops small_cnn lacks: depthwise + grouped conv with stride, relu6, average pooling
    (fixed and adaptive), a residual add, a linear head with a hidden layer."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 8, 1)
        self.grp = nn.Conv2d(8, 12, 3, padding=1, groups=4)
        self.hidden = nn.Linear(12 * 2 * 2, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.nn.functional.relu6(self.stem(x))
        x = torch.nn.functional.relu6(self.dw(x))
        x = x + torch.relu(self.pw(x))
        x = torch.nn.functional.avg_pool2d(x, 2)
        x = torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.grp(x)), 2)
        return self.head(torch.relu(self.hidden(x.flatten(1))))


SPLIT_SCHEMES = {  # scheme -> kernels reading a split (SRAM + flash) weight
    None: 0,
    "sparse-update(bias_last=3,weights='-1:1,pw:1/2,dw:1/2')": 3,  # pw forward + input grad, dw forward
    "sparse-update(weights='-1:1,dw:1/4,stem:1')": 2,               # depthwise forward + input grad
    "sparse-update(bias_last=1,weights='-1:1/2')": 1,               # a linear head, half trained
}


@pytest.mark.parametrize("scheme", list(SPLIT_SCHEMES))
def test_more_ops_full_and_sparse(scheme, tmp_path):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 3, 12, 12, generator=g), torch.tensor([0, 4])
    graph = capture_train_step(MobileBlock().eval(), "cross_entropy", (x, y), lr=LR)
    if scheme:
        run_pipeline(graph, scheme, verify=False)
    ts = graph.meta["train_step"]
    facts = write_train(graph.clone(), tmp_path / "mcu")
    split = sum("split weight" in op["op"] for op in facts["ops"])
    assert split == SPLIT_SCHEMES[scheme]
    build_train_host(tmp_path / "mcu")
    losses, got = run_train_host(tmp_path / "mcu", x.numpy(), y.numpy(), STEPS, LR)
    for _ in range(STEPS):
        apply_step(graph, graph.gm(x, y))
    for p, value in got.items():
        want = param(graph, ts["params"][p]["attr"]).numpy()[:len(value)]
        err = np.abs(value - want).max()
        assert err <= REL_TOL * max(1.0, np.abs(want).max()), f"{p}: max |C - torch| = {err:.3g}"
    assert len(got) == sum(bool(i.get("trained")) for i in ts["params"].values())
    assert losses[0] > losses[-1]


@pytest.mark.slow
def test_cli_compile_train_mcu_host(tmp_path):
    """`gradrewrite compile --train --backend mcu --target host`: the compiler verifies
    one C training step against the torch training-step graph on fresh inputs."""
    import json
    from pathlib import Path

    from tests.cli.conftest import run_cli

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "step"
    run_cli("compile", "--module", "examples.models:small_cnn", "--train", "--lr", "0.05", "-p",
            "fold-bn,sparse-update(bias_last=2,weights='-1:1,-2:1/2')", "--backend", "mcu", "--target", "host",
            "-o", out, "-q", cwd=root, check=True)
    report = json.loads((out / "report.json").read_text())
    v = report["verification"]
    assert v["inputs_compared"] >= 1 and v["max_abs_error"] < 1e-5  # loss and updated parameters, fp32 rounding
    mcu = report["mcu"]
    assert {p["path"] for p in mcu["trained"]} == {"conv.0.weight", "conv.0.bias", "fc.weight", "fc.bias"}
    assert "model_train_step" in (out / "mcu" / "model.h").read_text()
    # SRAM for trained parameters (conv.0's trained half only) is what the memory planner planned
    assert mcu["trained_bytes"] == report["memory_plan"]["trained_weights_bytes"]
    # where the backend's time went: the host target runs no device build or QEMU phase
    t = mcu["timings"]
    assert set(t["phases_wall_seconds"]) == {"lower_and_write", "host_builds"}
    assert all(v >= 0 for v in t["phases_wall_seconds"].values()) and t["cpu_seconds"]["children"] > 0
    assert (out / "mcu" / "model_host").is_file() and (out / "mcu" / "train_host").is_file()
    # Cortex-M training firmware: tests/backends/test_mcu_train_firmware.py
