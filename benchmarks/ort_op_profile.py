"""Where ONNX Runtime spends a model's time, by kind of node: its own profiler on the graph
it runs after its optimizations (fusions, NCHWc / NHWC layouts), so an int8 artifact and
its fp32 twin can be compared class by class (which layers gain from int8 and which do
not). Used by ``inference_int8.py --parts profile``.
"""
from __future__ import annotations

import collections
import json
import tempfile
from pathlib import Path

import numpy as np


def _node_class(op: str, attrs: dict) -> str:
    """A conv's class by shape (depthwise, pointwise, other kernels); any other node by op."""
    if "Conv" not in op:
        return op
    if attrs.get("group", 1) > 1:
        return "conv depthwise"
    k = attrs.get("kernel_shape")
    return "conv 1x1" if list(k or []) == [1, 1] else f"conv {'x'.join(map(str, k or []))}"


def op_class_times(models: dict[str, Path], inputs: list[np.ndarray], threads: int = 1, runs: int = 30,
                   warmup: int = 5) -> dict[str, dict[str, dict]]:
    """Per model of ``models`` (label -> ONNX path): median microseconds per run of each of its
    node classes under ORT's CPU provider with ``threads`` intra-op threads, from ORT's
    per-node profile. The models' runs alternate (one run of each in turn, the first ``warmup``
    left out of the medians), so a change of the machine's load falls on all of them alike."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        sessions, graphs = {}, {}
        for label, path in models.items():
            optimized = Path(tmp) / f"{label}-optimized.onnx"
            opts = ort.SessionOptions()
            opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            opts.log_severity_level = 3
            opts.optimized_model_filepath = str(optimized)   # the graph the profile's node names refer to
            opts.enable_profiling = True
            opts.profile_file_prefix = str(Path(tmp) / f"{label}-profile")
            sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            graphs[label] = onnx.load(str(optimized), load_external_data=False).graph
            sessions[label] = (sess, dict(zip([i.name for i in sess.get_inputs()], inputs)))
        for _ in range(warmup + runs):
            for sess, feed in sessions.values():
                sess.run(None, feed)
        events = {label: json.loads(Path(sess.end_profiling()).read_text())
                  for label, (sess, _) in sessions.items()}
    return {label: _classes(graphs[label], events[label], warmup) for label in models}


def _classes(graph, events: list[dict], warmup: int) -> dict[str, dict]:
    import onnx

    classes = {n.name: _node_class(n.op_type, {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute})
               for n in graph.node}
    ops = {n.name: n.op_type for n in graph.node}
    per_node = collections.defaultdict(list)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_node[e["name"][:-len("_kernel_time")]].append(e["dur"])
    out: dict[str, dict] = {}
    for name, durs in per_node.items():
        c = out.setdefault(classes.get(name, name), {"us": 0.0, "nodes": 0, "ops": set()})
        c["us"] += float(np.median(durs[warmup:] or durs))   # the first runs warm caches
        c["nodes"] += 1
        c["ops"].add(ops.get(name, "?"))
    return {k: {"us": v["us"], "nodes": v["nodes"], "ops": sorted(v["ops"])} for k, v in out.items()}


def compare_rows(fp32: dict[str, dict], int8: dict[str, dict]) -> list[list]:
    """Rows (class, fp32 us, int8 us, fp32/int8, share of the int8 time, int8 nodes, ORT ops),
    the int8 artifact's classes by time."""
    total8 = sum(v["us"] for v in int8.values()) or 1.0
    rows = []
    for k in sorted(set(fp32) | set(int8), key=lambda k: -(int8.get(k, {}).get("us", 0.0))):
        a, b = fp32.get(k, {}).get("us"), int8.get(k, {}).get("us")
        ops = sorted(set(fp32.get(k, {}).get("ops", [])) | set(int8.get(k, {}).get("ops", [])))
        rows.append([k, round(a, 1) if a else "-", round(b, 1) if b else "-",
                     f"{a / b:.2f}x" if a and b else "-", f"{100 * (b or 0) / total8:.1f} %",
                     int8.get(k, {}).get("nodes", 0), ", ".join(ops)])
    return rows
