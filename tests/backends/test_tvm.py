"""tvm backend: numerics vs the torch backend, reload in a fresh process, the one-shot
unsupported-op report, pre-import normalisation (Llama), and the tuning cache."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import gradrewrite as gr
from gradrewrite.backends.base import backend_names, get_backend
from gradrewrite.errors import BackendError, ConfigError



ROOT = Path(__file__).resolve().parents[2]
RTOL = 1e-5   # fp32 rounding: TVM reorders reductions and fuses differently from ATen


def _close(got, ref):
    got, ref = np.asarray(got), np.asarray(ref)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    if ref.dtype.kind in "biu":
        np.testing.assert_array_equal(got, ref)
    else:
        assert np.abs(got - ref).max() <= RTOL * (1 + np.abs(ref).max())


def _torch_outputs(graph, inputs, tmp_path):
    art = gr.compile(graph, tmp_path / "torch_ref", backend="torch")
    return art(*inputs)


@pytest.fixture(scope="module")
def cnn():
    from examples.models import small_cnn

    model, inputs = small_cnn()
    return model, gr.capture(model, inputs)


@pytest.fixture(scope="module")
def cnn_artifact(cnn, tmp_path_factory):
    _, graph = cnn
    return gr.compile(graph, tmp_path_factory.mktemp("tvm") / "cnn", backend="tvm",
                      backend_options={"target": "llvm"})


# --------------------------------------------------------------------------- registry, options
def test_registered_with_options_checked():
    assert "tvm" in backend_names()
    backend = get_backend("tvm")
    with pytest.raises(ConfigError, match="valid options: target, mcpu"):
        backend.compile(None, Path("."), options={"opset": 18})
    with pytest.raises(ConfigError, match="valid targets: auto, llvm, cuda"):
        backend.compile(None, Path("."), options={"target": "vulkan"})
    with pytest.raises(ConfigError, match="tune_trials must be an integer"):
        backend.compile(None, Path("."), options={"tune_trials": "many"})


def test_targets():
    from gradrewrite.backends.tvm.targets import cuda_available, host_cpu, make_target

    t = make_target("llvm", num_cores=2)
    assert t.kind.name == "llvm" and int(t.attrs["num-cores"]) == 2
    assert str(t.attrs["mcpu"]) == host_cpu()
    assert make_target("llvm", mcpu="generic").attrs["mcpu"] == "generic"
    if not cuda_available():
        assert make_target("auto").kind.name == "llvm"
        with pytest.raises(BackendError, match="no CUDA device"):
            make_target("cuda")


# --------------------------------------------------------------------------- numerics
def test_small_cnn_matches_torch_backend(cnn, cnn_artifact, tmp_path):
    model, graph = cnn
    rep = cnn_artifact.report
    assert rep["backend"] == "tvm" and rep["target"].startswith("tvm-llvm-")
    assert rep["verification"]["relative_error"] < RTOL
    assert {"model.so", "tvm_meta.json"} <= set(rep["artifact"]["files"])
    meta = json.loads((cnn_artifact.path / "tvm_meta.json").read_text())
    assert meta["inputs"] == [{"name": graph.inputs[0].name, "shape": [1, 3, 32, 32], "dtype": "float32"}]
    assert meta["target_kind"] == "llvm" and meta["tune_trials"] == 0 and meta["cache_key"] is None
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    got, = cnn_artifact(x)
    ref, = _torch_outputs(graph, (x,), tmp_path)
    _close(got, ref)
    _close(got, model(x).detach().numpy())


def _placed(x: np.ndarray, offset: int) -> np.ndarray:
    """A copy of ``x`` whose data starts ``offset`` bytes past a 64-byte boundary."""
    buf = np.empty(x.nbytes + 128, dtype=np.uint8)
    start = (-buf.ctypes.data) % 64 + offset
    out = buf[start:start + x.nbytes].view(x.dtype).reshape(x.shape)
    out[...] = x
    return out


def test_inputs_shared_or_copied_give_the_same_outputs(cnn_artifact):
    run = cnn_artifact._run()
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    ref, = run(_placed(x, 0))                                  # aligned: shared through DLPack
    for variant in (_placed(x, 4), np.asfortranarray(x), x.astype(np.float64).astype(np.float32)):
        got, = run(variant)                                    # misaligned / strided: copied
        np.testing.assert_array_equal(got, ref)
    readonly = _placed(x, 0)
    readonly.flags.writeable = False
    np.testing.assert_array_equal(run(readonly)[0], ref)
    shared = _placed(x, 0)
    run(shared)
    np.testing.assert_array_equal(shared, x)                   # the VM never writes its inputs


@pytest.mark.slow
def test_tiny_gpt_matches_torch_backend(tmp_path):
    from examples.models import tiny_gpt

    model, inputs = tiny_gpt()
    graph = gr.capture(model, inputs)
    art = gr.compile(graph, tmp_path / "gpt", backend="tvm")
    assert art.report["verification"]["relative_error"] < RTOL
    ids = torch.randint(0, graph.inputs[0].high or 2, inputs[0].shape, generator=torch.Generator().manual_seed(3))
    got, = art(ids)
    ref, = _torch_outputs(graph, (ids,), tmp_path)
    _close(got, ref)


def test_tuple_outputs_flat_in_torch_order(tmp_path):
    class Multi(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(6, 4)

        def forward(self, x, ids):
            h = self.lin(x)
            return h.relu(), (h.sum(-1), ids * 2 + 1)

    g = gr.capture(Multi().eval(), (torch.randn(3, 6), torch.randint(0, 9, (3,))))
    art = gr.compile(g, tmp_path / "m", backend="tvm")
    x, ids = torch.randn(3, 6), torch.arange(3)
    got = art(x, ids)
    ref = _torch_outputs(g, (x, ids), tmp_path)
    assert [o.shape for o in got] == [(3, 4), (3,), (3,)] and len(ref) == 3
    for a, b in zip(got, ref):
        _close(a, b)


def test_gathers_never_read_out_of_bounds(tmp_path):
    class Gather(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 3)

        def forward(self, ids, x):
            return self.emb(ids), x[:, torch.tensor([-1, 0, 2])]

    model = Gather().eval()
    g = gr.capture(model, (torch.randint(0, 10, (2, 4)), torch.randn(2, 5)))
    art = gr.compile(g, tmp_path / "g", backend="tvm")
    ids, x = torch.tensor([[0, 9, 3, 1], [2, 2, 5, 8]]), torch.randn(2, 5)
    for got, ref in zip(art(ids, x), model(ids, x)):
        _close(got, ref.detach().numpy())       # negative indices included
    bad = np.array([[0, 10_000_000, 3, 1], [2, 2, 5, 8]])
    assert np.isfinite(art(bad, x.numpy())[0]).all()   # wraps instead of reading outside the table


# --------------------------------------------------------------------------- reload
@pytest.mark.slow
def test_artifact_reloads_in_fresh_process(cnn, cnn_artifact, tmp_path):
    model, graph = cnn
    out = tmp_path / "outputs.npz"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "gradrewrite", "run", str(cnn_artifact.path), "--random",
                           "--seed", "4", "-o", str(out)], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "output_0: 1x10 float32" in proc.stdout
    got = np.load(out)["output_0"]
    x = graph.inputs[0].random(torch.Generator().manual_seed(4))   # what `run --random --seed 4` feeds
    _close(got, model(x).detach().numpy())
    again, = gr.Artifact(cnn_artifact.path)(x)                      # and a fresh Artifact in-process
    _close(again, got)


# --------------------------------------------------------------------------- import errors
class _Head(torch.nn.Module):
    def forward(self, x):
        return torch.amax(x, -1) + torch.amax(x * 2, -1)


class _Body(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        return torch.prod(self.lin(x), -1, keepdim=True) * x


class _TwoUnsupported(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.head = _Body(), _Head()

    def forward(self, x):
        return self.head(self.body(x))


def test_unsupported_ops_reported_together(tmp_path):
    g = gr.capture(_TwoUnsupported().eval(), (torch.randn(2, 8),))
    with pytest.raises(BackendError) as info:
        gr.compile(g, tmp_path / "o", backend="tvm")
    msg = str(info.value)
    assert "no converter for 2 ops" in msg
    assert "aten.amax at head (2x)" in msg and "aten.prod.dim_int at body" in msg
    assert "--backend ort" in msg
    assert not (tmp_path / "o").exists()


class _BoolMath(torch.nn.Module):
    def forward(self, x):
        pos, small = x > 0, x < 1
        either, both = pos + small, pos * small          # bool add/mul
        return pos.cumsum(-1) + either.long() + both.long().cumsum(-1)


def test_normalize_rules_fire_and_keep_numerics(tmp_path):
    g = gr.capture(_BoolMath().eval(), (torch.randn(3, 7),))
    art = gr.compile(g, tmp_path / "o", backend="tvm")
    assert art.report["artifact"]["normalized"] == {"scan-dtype": 1, "bool-arith": 2}
    x = torch.randn(3, 7)
    got, = art(x)
    _close(got, _BoolMath()(x).numpy())


@pytest.mark.slow
def test_hf_llama_compiles(tmp_path):

    from tests.model_zoo import hf_llama

    model, inputs = hf_llama(seq=16)
    graph = gr.capture(model, inputs)
    art = gr.compile(graph, tmp_path / "llama", backend="tvm")
    # The mask code's (pos.diff(-1) != 1).cumsum(-1) scans a bool tensor: TVM's LLVM
    # codegen fails on it ("MatchesCode(kDLFloat)") unless normalize casts it first.
    assert art.report["artifact"]["normalized"].get("scan-dtype", 0) >= 1
    assert art.report["verification"]["relative_error"] < 1e-4
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(9))
    got, = art(ids)
    _close(got, model(ids).detach().numpy())


# --------------------------------------------------------------------------- tuning
def test_plan_tunes_heaviest_tasks_first():
    from gradrewrite.backends.tvm.tuning import Task, plan

    tasks = [Task("big", 1, 8e6, "a", None), Task("mid", 2, 2e6, "b", None),
             Task("small", 5, 2e5, "c", None), Task("tiny", 1, 1e3, "e", None),
             Task("copy", 3, 0.0, "d", None)]
    chosen, per_iter = plan(tasks, 8)            # 4 trials each for the two heaviest
    assert [t.name for t in chosen] == ["big", "mid"] and per_iter == 4
    chosen, per_iter = plan(tasks, 24)           # the heaviest 99% of the FLOPs
    assert [t.name for t in chosen] == ["big", "mid", "small"] and per_iter == 4
    chosen, per_iter = plan(tasks, 400)          # enough for every computing task; copies never
    assert [t.name for t in chosen] == ["big", "mid", "small", "tiny"] and per_iter == 50
    chosen, per_iter = plan(tasks, 2)
    assert [t.name for t in chosen] == ["big"] and per_iter == 2
    assert plan(tasks, 0) == ([], 0)


def test_budget_of_two_trials_per_task_tunes_every_computing_task():
    from gradrewrite.backends.tvm.tuning import Task, plan, trials_floor

    tasks = [Task("big", 1, 8e6, "a", None), Task("mid", 2, 2e6, "b", None),
             Task("small", 5, 2e5, "c", None), Task("tiny", 1, 1e3, "e", None),
             Task("copy", 3, 0.0, "d", None)]
    assert trials_floor(tasks, 8) == 1 and trials_floor(tasks, 7) == 4   # 4 computing tasks
    chosen, per_iter = plan(tasks, 8, trials_floor(tasks, 8))           # none left unscheduled
    assert [t.name for t in chosen] == ["big", "mid", "small", "tiny"] and per_iter == 1
    chosen, per_iter = plan(tasks, 7, trials_floor(tasks, 7))           # too few: the heaviest
    assert [t.name for t in chosen] == ["big"] and per_iter == 4


def _linear_task():
    from gradrewrite.backends.tvm import tuning
    from gradrewrite.backends.tvm.importer import import_graph
    from gradrewrite.backends.tvm.relax_passes import preprocess
    from gradrewrite.backends.tvm.targets import make_target

    g = gr.capture(torch.nn.Linear(16, 8).eval(), (torch.randn(2, 16),))
    target = make_target("llvm", num_cores=2)
    mod = preprocess(import_graph(g).mod)
    return mod, target, tuning.extract_tasks(mod, target)


@pytest.mark.slow
def test_light_cpu_tasks_get_single_threaded_schedules():
    import dataclasses

    from gradrewrite.backends.tvm import tuning

    _, target, tasks = _linear_task()
    tuning.lazy_intrinsics(target)      # as tune() does: skips importing the GPU intrinsics (~30 s)
    from tvm.s_tir import meta_schedule as ms

    task = tasks[0]
    assert task.flops < tuning.SERIAL_BELOW_FLOPS
    ctx = ms.TuneContext(mod=task.extracted.dispatched[0], target=target,
                         space_generator=tuning.space_generator(task, target),
                         search_strategy=ms.search_strategy.ReplayTrace(), task_name=task.name)
    designs = ctx.generate_design_space()
    assert designs and not any("meta_schedule.parallel" in str(d.trace) for d in designs)
    heavy = dataclasses.replace(task, flops=tuning.SERIAL_BELOW_FLOPS)
    assert tuning.space_generator(heavy, target) == "post-order-apply"


def _records(cache: Path) -> int:
    files = list(cache.glob("*/database_tuning_record.json"))
    assert len(files) == 1
    return sum(1 for line in files[0].read_text().splitlines() if line.strip())


@pytest.mark.slow
def test_tuning_cache_reused_with_zero_new_trials(cnn, tmp_path):
    model, graph = cnn
    cache = tmp_path / "cache"
    events: list[dict] = []
    opts = {"target": "llvm", "tune_trials": 4, "tune_cache": str(cache), "progress": events.append}
    first = gr.compile(graph, tmp_path / "a", backend="tvm", backend_options=opts)
    tuning = first.report["artifact"]["tuning"]
    assert tuning["new_trials"] >= 4 and not tuning["reused_cache"]
    assert tuning["tasks_tuned"] == [events[0]["tasks"][0]] and "conv2d" in tuning["tasks_tuned"][0]
    assert [e["event"] for e in events][0] == "start" and events[-1]["event"] == "done"
    assert any(e["event"] == "batch" and e["best_us"] for e in events)
    n_records = _records(cache)
    assert n_records >= 4
    assert first.report["verification"]["relative_error"] < RTOL

    events.clear()
    second = gr.compile(graph, tmp_path / "b", backend="tvm", backend_options=opts)
    tuning2 = second.report["artifact"]["tuning"]
    assert tuning2["new_trials"] == 0 and tuning2["reused_cache"]
    assert tuning2["cache_key"] == tuning["cache_key"] == second.report["artifact"]["cache_key"]
    assert [e["event"] for e in events] == ["reuse"]
    assert _records(cache) == n_records
    x = torch.randn(1, 3, 32, 32)
    _close(second(x)[0], model(x).detach().numpy())
    state = json.loads((cache / tuning["cache_key"] / "tuning.json").read_text())
    assert state["trials"] == 4 and len(state["history"]) == 1

    # A record whose trace no longer replays (as evolutionary search can commit) is dropped
    # when the database opens, instead of the whole cache being refused.
    records = cache / tuning["cache_key"] / "database_tuning_record.json"
    index, body = json.loads(records.read_text().splitlines()[0])
    get_loops = next(inst for inst in body[0][0] if inst[0] == "GetLoops")
    get_loops[3].append("l_extra")
    with records.open("a") as f:
        f.write(json.dumps([index, body]) + "\n")
    third = gr.compile(graph, tmp_path / "c", backend="tvm", backend_options=opts)
    assert third.report["artifact"]["tuning"]["reused_cache"] and _records(cache) == n_records
    _close(third(x)[0], model(x).detach().numpy())

    (records.parent / "database_workload.json").write_text("not json\n")
    with pytest.raises(BackendError, match="cannot open the TVM tuning database.*delete"):
        gr.compile(graph, tmp_path / "d", backend="tvm", backend_options=opts)


def test_unwritable_tuning_cache_is_a_user_error(tmp_path):
    not_a_dir = tmp_path / "cache"
    not_a_dir.write_text("")
    g = gr.capture(torch.nn.Linear(4, 3).eval(), (torch.randn(2, 4),))
    with pytest.raises(BackendError, match="cannot create the TVM tuning cache"):
        gr.compile(g, tmp_path / "o", backend="tvm",
                   backend_options={"tune_trials": 2, "tune_cache": str(not_a_dir)})


@pytest.mark.slow
def test_candidate_build_past_the_time_limit_is_skipped_not_hung(tmp_path, monkeypatch, caplog):
    from gradrewrite.backends.tvm import tuning

    monkeypatch.setattr(tuning, "BUILD_TIMEOUT_S", 1e-3)   # every build "hangs"
    model = torch.nn.Linear(16, 8).eval()
    x = torch.randn(2, 16)
    g = gr.capture(model, (x,))
    with caplog.at_level(logging.INFO, logger="gradrewrite.tvm"):
        art = gr.compile(g, tmp_path / "o", backend="tvm",
                         backend_options={"tune_trials": 2, "tune_cache": str(tmp_path / "cache")})
    assert "build passed 0.001 s; skipped" in caplog.text
    assert art.report["artifact"]["tuning"]["new_trials"] == 2   # counted, then built from defaults
    _close(art(x)[0], model(x).detach().numpy())
