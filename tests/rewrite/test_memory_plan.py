"""Memory planner: random buffer sets checked by simulation, liveness on fx graphs."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn as nn

from gradrewrite.rewrite.memory_plan import (Buffer, MemoryPlan, default_inplace, graph_buffers,
                                             plan_buffers, plan_graph)


def random_buffers(rng: random.Random, n: int, inplace: bool = False) -> list[Buffer]:
    bufs: list[Buffer] = []
    for i in range(n):
        start = i  # one writer per step, as in a schedule
        end = start + rng.choice([0, 1, 1, 2, 3, 5, 9])
        bufs.append(Buffer(f"b{i}", rng.choice([16, 48, 64, 100, 256, 1000, 4096]), start, end))
    if inplace:  # let some buffers overwrite an input that dies at their step
        out = []
        by_end = {}
        for b in bufs:
            by_end.setdefault(b.end, []).append(b)
        for b in bufs:
            cands = [p for p in by_end.get(b.start, []) if p.name != b.name and p.size >= b.size]
            if cands and rng.random() < 0.7:
                b = Buffer(b.name, b.size, b.start, b.end, rng.choice(cands).name)
            out.append(b)
        bufs = out
    return bufs


def simulated_peak(plan: MemoryPlan) -> int:
    """Independent simulation: mark bytes step by step, track the highest byte used."""
    top = 0
    last = max(b.end for b in plan.buffers)
    for step in range(last + 1):
        for b in plan.buffers:
            if b.start <= step <= b.end:
                top = max(top, plan.offsets[b.name] + b.size)
    return top


@pytest.mark.parametrize("strategy", ["greedy-by-size", "first-fit"])
@pytest.mark.parametrize("inplace", [False, True])
def test_random_plans_never_overlap_live_buffers(strategy, inplace):
    rng = random.Random(0)
    for trial in range(60):
        bufs = random_buffers(rng, rng.randint(1, 40), inplace)
        plan = plan_buffers(bufs, strategy=strategy, alignment=16)
        plan.check()
        assert plan.peak_bytes() == simulated_peak(plan)
        assert plan.arena_bytes >= simulated_peak(plan)
        assert plan.arena_bytes >= plan.peak_live_bytes()          # the lower bound holds
        assert plan.arena_bytes <= sum(-(-b.size // 16) * 16 for b in bufs)
        assert all(off % 16 == 0 for off in plan.offsets.values())


def test_arena_is_what_the_plan_touches():
    rng = random.Random(1)
    for _ in range(30):
        plan = plan_buffers(random_buffers(rng, 25), alignment=1)
        # blocks are placed so the top of the arena is reached by some live buffer
        assert plan.arena_bytes == simulated_peak(plan)


def test_check_catches_overlap():
    a, b = Buffer("a", 64, 0, 2), Buffer("b", 64, 1, 3)
    bad = MemoryPlan([a, b], {"a": 0, "b": 32}, 96, "first-fit")
    with pytest.raises(AssertionError, match="a .* b|b .* a"):
        bad.check()


def test_greedy_reaches_lower_bound_on_chain():
    # a sequence where each buffer is read only by the next step: two live at a time
    bufs = [Buffer(f"x{i}", 1024, i, i + 1) for i in range(10)]
    plan = plan_buffers(bufs)
    plan.check()
    assert plan.arena_bytes == plan.peak_live_bytes() == 2048


def test_inplace_reuse_shares_storage():
    a = Buffer("a", 1024, 0, 1)
    b = Buffer("b", 1024, 1, 2, inplace_of="a")
    c = Buffer("c", 1024, 2, 3, inplace_of="b")
    plan = plan_buffers([a, b, c])
    plan.check()
    assert plan.offsets["a"] == plan.offsets["b"] == plan.offsets["c"]
    assert plan.arena_bytes == plan.peak_live_bytes() == 1024
    without = plan_buffers([Buffer(x.name, x.size, x.start, x.end) for x in (a, b, c)])
    assert without.arena_bytes == 2048


def test_invalid_inplace_is_ignored():
    a = Buffer("a", 1024, 0, 3)              # still alive after b's step
    b = Buffer("b", 1024, 1, 2, inplace_of="a")
    plan = plan_buffers([a, b])
    plan.check()
    assert plan.offsets["a"] != plan.offsets["b"]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        return self.fc(y.flatten(1))


def test_graph_liveness_and_views():
    ep = torch.export.export(Net().eval(), (torch.randn(1, 3, 8, 8),))
    gm = ep.module()
    bufs = {b.name: b for b in graph_buffers(gm)}
    steps = [n for n in gm.graph.nodes if n.op == "call_function"]
    names = [n.name for n in steps]
    conv = next(n for n in steps if "conv" in n.name)
    assert bufs[conv.name].size == 8 * 8 * 8 * 4
    # flatten/view writes nothing; the relu output lives until the linear reads the view
    views = [n for n in steps if n.target in (torch.ops.aten.view.default,
                                              torch.ops.aten.flatten.using_ints)]
    assert views and all(v.name not in bufs for v in views)
    relu = next(n for n in steps if "relu" in n.name)
    linear = next(n for n in steps if "linear" in n.name)
    assert bufs[relu.name].end == names.index(linear.name)
    # the graph output lives to the output step
    assert bufs[linear.name].end == len(steps)
    plan = plan_graph(gm)
    plan.check()
    assert plan.offset_of(views[0].name) == plan.offsets[relu.name]


def test_graph_inplace_relu_reuses_conv_output():
    ep = torch.export.export(Net().eval(), (torch.randn(1, 3, 8, 8),))
    gm = ep.module()
    plan = plan_graph(gm, inplace=default_inplace)
    plan.check()
    relu = next(b for b in plan.buffers if "relu" in b.name)
    conv = next(b for b in plan.buffers if "conv" in b.name)
    assert relu.inplace_of == conv.name
    assert plan.offsets[relu.name] == plan.offsets[conv.name]
    assert plan.as_dict()["inplace_reuses"] >= 1


def test_skip_excludes_nodes():
    gm = torch.export.export(Net().eval(), (torch.randn(1, 3, 8, 8),)).module()
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0][0]
    bufs = graph_buffers(gm, skip=lambda n: n is out)
    assert out.name not in {b.name for b in bufs}


def test_unread_tuple_outputs_get_scratch():
    class Pool(nn.Module):
        def forward(self, x):
            return torch.ops.aten.max_pool2d_with_indices(x, [2, 2])[0] + 1

    gm = torch.export.export(Pool(), (torch.randn(1, 2, 4, 4),)).module()
    for node in list(gm.graph.nodes):  # as after dead-code removal: nobody reads index 1
        if node.op == "call_function" and not node.users:
            gm.graph.erase_node(node)
    bufs = {b.name: b for b in graph_buffers(gm)}
    scratch = [b for n, b in bufs.items() if n.endswith(".1")]
    assert len(scratch) == 1 and scratch[0].size == 2 * 2 * 2 * 8   # int64 indices
    assert scratch[0].start == scratch[0].end
    plan_graph(gm).check()
