"""The GWQ outlier term on ONNX Runtime CPU: which ONNX form costs least next to MatMulNBits.

One graph per candidate holds ``COPIES`` independent layers on the same input (so Python's
``session.run`` overhead is amortised); every candidate of one (layer, input shape,
threads) cell is timed round-robin in one process (``_report.interleaved_medians``).
Layers: 512x512, 1536x512 (N x K) and 512x1536, weights with heavy-tailed per-column
scales, the top 1% by magnitude kept as fp16 outliers. Inputs: batch-1 decode [1, 1, K]
and a prompt [1, 64, K]. Forms of ``y += x @ S^T`` (S the outliers):

- ``csr_cumsum``: gather x^T rows, Mul, CumSum, difference at the row pointers (the form
  exported before this benchmark);
- ``scatter_elements``: gather x along K, Mul, ScatterElements(reduction=add) into y;
- ``scatter_nd``: gather x^T rows, Mul, ScatterND(reduction=add) into y^T;
- ``ell``: rows padded to the longest row's count: Gather x along K with [N, c] indices,
  Mul by [N, c] values, ReduceSum over c, Add (padding reads column 0 times 0);
- ``sparse_to_dense``: ``com.microsoft.SparseToDenseMatMul`` with S as a sparse
  initializer (COO, int64 indices: 64 bits per index in the file);

plus references: fp32 MatMul, MatMulNBits alone (4-bit, accuracy_level 0 and 4).
A second table times 2-, 3- and 8-bit layers: MatMulNBits at its own width, and the codes
widened once at session load into a 4-bit MatMulNBits (the form the ORT backend emits for
3 bits), and the old per-call 3-bit unpacking. Index arrays are fed the way each form
needs them at run time (the ORT backend derives them at load from the compact stored
form); ``index_bits_per_outlier`` is what the form would need in the file as given.

    nice -n 10 python benchmarks/quant_sparse_term.py [--quick] [--runs 200]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import _report  # noqa: E402

COPIES = 8
GROUP = 32
FRACTION = 0.01
LAYERS = [(512, 512), (1536, 512), (512, 1536)]      # (N, K)
SHAPES = {"decode": 1, "prompt": 64}
FORMS = ["csr_cumsum", "scatter_elements", "scatter_nd", "ell_gather", "ell_gather_elements", "ell_rows",
         "sparse_to_dense"]


# ----------------------------------------------------------------------------- weights
def _layer(n: int, k: int, seed: int):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)) * np.exp(rng.standard_normal(k) * 0.7)[None, :] * 0.02
    w = w.astype(np.float32)
    count = int(round(FRACTION * n * k))
    flat = np.argpartition(-np.abs(w).ravel(), count)[:count]
    mask = np.zeros(n * k, dtype=bool)
    mask[flat] = True
    return w, mask.reshape(n, k)


def _nbits(w: np.ndarray, bits: int, mask: np.ndarray):
    """Asymmetric group quantization in MatMulNBits layout (outliers -> the zero point)."""
    n, k = w.shape
    g = -(-k // GROUP)
    wp = np.zeros((n, g * GROUP), np.float32)
    wp[:, :k] = np.where(mask, 0, w)
    wg = wp.reshape(n, g, GROUP)
    lo, hi = np.minimum(wg.min(-1), 0), np.maximum(wg.max(-1), 0)
    qmax = (1 << bits) - 1
    scale = np.maximum((hi - lo) / qmax, 1e-7).astype(np.float16)
    zero = np.clip(np.round(-lo / scale.astype(np.float32)), 0, qmax)
    codes = np.clip(np.round(wg / scale.astype(np.float32)[..., None]) + zero[..., None], 0, qmax)
    return _pack(codes.astype(np.uint8), bits), scale, _pack(zero.astype(np.uint8), bits)


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """LSB-first bit stream of the last axis, as uint8 (MatMulNBits / quant_ops layout)."""
    stream = ((codes[..., None] >> np.arange(bits)) & 1).reshape(*codes.shape[:-1], -1)
    pad = (-stream.shape[-1]) % 8
    stream = np.pad(stream, [(0, 0)] * (stream.ndim - 1) + [(0, pad)])
    stream = stream.reshape(*stream.shape[:-1], -1, 8)
    return (stream << np.arange(8)).sum(-1).astype(np.uint8)


# ----------------------------------------------------------------------------- graphs
class G:
    """A tiny ONNX graph builder: unique names, initializers, nodes."""

    def __init__(self):
        self.nodes, self.inits, self.count = [], [], 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, value, hint="c") -> str:
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, *inputs: str, domain: str = "", **attrs) -> str:
        out = self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], domain=domain, **attrs))
        return out

    def model(self, k: int, m: int, outputs: list[tuple[str, int]], sparse=()) -> bytes:
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, m, k])   # static, as exported
        outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o, _ in outputs]
        graph = helper.make_graph(self.nodes, "g", [x], outs, self.inits, sparse_initializer=list(sparse))
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid("com.microsoft", 1)])
        m.ir_version = 9
        return m.SerializeToString()


def _matmulnbits(g: G, x: str, packed, scales, zeros, bits: int, n: int, k: int, level: int = 0) -> str:
    return g.op("MatMulNBits", x, g.const(packed, "B"), g.const(scales.astype(np.float32).ravel(), "s"),
                g.const(zeros.ravel(), "zp"), domain="com.microsoft", K=k, N=n, bits=bits,
                block_size=GROUP, accuracy_level=level)


def _sparse_term(g: G, form: str, x: str, y: str, w: np.ndarray, mask: np.ndarray, m: int):
    """``y + x @ S^T`` in the given form; returns (output, index bits per outlier as fed)."""
    n, k = w.shape
    rows, cols = mask.nonzero()
    vals = w[rows, cols].astype(np.float16).astype(np.float32)
    counts = np.bincount(rows, minlength=n)
    nnz = len(vals)
    if form == "csr_cumsum":
        rowptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        xt = g.op("Transpose", g.op("Reshape", x, g.const(np.array([-1, k]))), perm=[1, 0])
        picked = g.op("Mul", g.op("Gather", xt, g.const(cols.astype(np.int32)), axis=0),
                      g.const(vals[:, None]))
        zero_row = g.op("Mul", g.op("Slice", picked, g.const(np.array([0])), g.const(np.array([1]))),
                        g.const(np.float32(0)))
        run = g.op("CumSum", g.op("Concat", zero_row, picked, axis=0), g.const(np.int64(0)))
        term = g.op("Sub", g.op("Gather", run, g.const(rowptr[1:]), axis=0),
                    g.op("Gather", run, g.const(rowptr[:-1]), axis=0))
        flat = g.op("Add", g.op("Reshape", y, g.const(np.array([-1, n]))), g.op("Transpose", term, perm=[1, 0]))
        return g.op("Reshape", flat, g.op("Shape", y)), 32 + 32 * (n + 1) / nnz
    if form == "scatter_elements":
        picked = g.op("Mul", g.op("Gather", x, g.const(cols.astype(np.int64)), axis=2), g.const(vals))
        idx = g.op("Expand", g.const(rows.astype(np.int64)), g.op("Shape", picked))
        return g.op("ScatterElements", y, idx, picked, axis=2, reduction="add"), 128
    if form == "scatter_nd":
        xt = g.op("Transpose", g.op("Reshape", x, g.const(np.array([-1, k]))), perm=[1, 0])
        picked = g.op("Mul", g.op("Gather", xt, g.const(cols.astype(np.int64)), axis=0),
                      g.const(vals[:, None]))
        yt = g.op("Transpose", g.op("Reshape", y, g.const(np.array([-1, n]))), perm=[1, 0])
        upd = g.op("ScatterND", yt, g.const(rows.astype(np.int64)[:, None]), picked, reduction="add")
        return g.op("Reshape", g.op("Transpose", upd, perm=[1, 0]), g.op("Shape", y)), 128
    if form.startswith("ell"):
        c = int(counts.max())
        slot = np.arange(nnz) - np.concatenate([[0], np.cumsum(counts)])[rows]
        ell_cols = np.zeros((n, c), np.int32)
        ell_vals = np.zeros((n, c), np.float32)
        ell_cols[rows, slot], ell_vals[rows, slot] = cols, vals
        if form == "ell_gather":
            picked = g.op("Gather", x, g.const(ell_cols), axis=2)                      # [1, M, N, c]
            term = g.op("ReduceSum", g.op("Mul", picked, g.const(ell_vals)), g.const(np.array([-1])), keepdims=0)
        elif form == "ell_gather_elements":   # same-rank index array: ORT's cheaper per-element gather
            x2 = g.op("Reshape", x, g.const(np.array([m, k])))
            picked = g.op("GatherElements", x2, g.const(np.repeat(ell_cols.reshape(1, -1), m, 0).astype(np.int64)),
                          axis=1)
            term = g.op("ReduceSum", g.op("Reshape", g.op("Mul", picked, g.const(ell_vals.reshape(-1))),
                                          g.const(np.array([1, m, n, c]))), g.const(np.array([-1])), keepdims=0)
        else:                                   # ell_rows: rows of x^T (M contiguous floats per index)
            xt = g.op("Transpose", g.op("Reshape", x, g.const(np.array([-1, k]))), perm=[1, 0])
            picked = g.op("Gather", xt, g.const(np.ascontiguousarray(ell_cols.T)), axis=0)  # [c, N, M]
            summed = g.op("ReduceSum", g.op("Mul", picked, g.const(np.ascontiguousarray(ell_vals.T)[..., None])),
                          g.const(np.array([0])), keepdims=0)                                # [N, M]
            term = g.op("Reshape", g.op("Transpose", summed, perm=[1, 0]), g.op("Shape", y))
        return g.op("Add", y, term), 32 * n * c / nnz
    if form == "sparse_to_dense":
        name = g.name("S")
        sparse = helper.make_sparse_tensor(
            numpy_helper.from_array(vals, name),
            numpy_helper.from_array(np.stack([rows, cols], 1).astype(np.int64), name + "_idx"), [n, k])
        g.sparse.append(sparse)
        xt = g.op("Transpose", g.op("Reshape", x, g.const(np.array([-1, k]))), perm=[1, 0])
        term = g.op("Transpose", g.op("SparseToDenseMatMul", name, xt, domain="com.microsoft"), perm=[1, 0])
        flat = g.op("Add", g.op("Reshape", y, g.const(np.array([-1, n]))), term)
        return g.op("Reshape", flat, g.op("Shape", y)), 128
    raise ValueError(form)


def _unpack_to_4bit(g: G, packed: str, bits: int, length: int, zero: str | None, rank: int) -> str:
    """``bits``-bit streams [..., B] -> the same codes as a 4-bit stream [..., length/2]
    (standard ops only). With ``zero`` (a runtime value) ORT cannot fold it: per call."""
    nbytes = (length * bits + 7) // 8
    first = np.array([(i * bits) // 8 for i in range(length)])
    second = np.minimum(first + 1, nbytes - 1)
    shift = np.array([(i * bits) % 8 for i in range(length)], np.uint16)
    wide = g.op("Cast", packed, to=TensorProto.UINT16)
    if zero is not None:
        wide = g.op("BitwiseOr", wide, g.op("Cast", zero, to=TensorProto.UINT16))
    both = g.op("BitwiseOr", g.op("Gather", wide, g.const(first), axis=-1),
                g.op("BitShift", g.op("Gather", wide, g.const(second), axis=-1),
                     g.const(np.uint16(8)), direction="LEFT"))
    codes = g.op("BitwiseAnd", g.op("BitShift", both, g.const(shift), direction="RIGHT"),
                 g.const(np.uint16((1 << bits) - 1)))
    if length % 2:                    # a 4-bit stream holds an even number of codes
        codes = g.op("Pad", codes, g.const(np.array([0] * (2 * rank - 1) + [1])))
    lo = g.op("Gather", codes, g.const(np.arange(0, length, 2)), axis=-1)
    hi = g.op("Gather", codes, g.const(np.arange(1, length, 2)), axis=-1)
    return g.op("Cast", g.op("BitwiseOr", lo, g.op("BitShift", hi, g.const(np.uint16(4)), direction="LEFT")),
                to=TensorProto.UINT8)


def build(kind: str, n: int, k: int, m: int, copies: int = COPIES, bits: int = 4) -> tuple[bytes, float]:
    g = G()
    g.sparse = []
    outputs, index_bits = [], 0.0
    for i in range(copies):
        w, mask = _layer(n, k, 100 + i)
        if kind == "fp32":
            y = g.op("MatMul", "x", g.const(np.ascontiguousarray(w.T)))
        elif kind in ("nbits", "nbits_acc4"):
            y = _matmulnbits(g, "x", *_nbits(w, bits, mask), bits, n, k, 4 if kind == "nbits_acc4" else 0)
        elif kind in ("to4_at_load", "to4_per_call"):
            packed, scales, zeros = _nbits(w, bits, mask)
            zero = None
            if kind == "to4_per_call":       # a zero computed from x: nothing folds
                first = g.op("Slice", g.op("Reshape", "x", g.const(np.array([-1]))), g.const(np.array([0])),
                             g.const(np.array([1])))
                zero = g.op("Cast", g.op("Mul", g.op("Cast", g.op("IsNaN", first), to=TensorProto.INT64),
                                         g.const(np.array([0]))), to=TensorProto.UINT8)
            b4 = _unpack_to_4bit(g, g.const(packed, "B3"), bits, GROUP, zero, 3)
            zp4 = _unpack_to_4bit(g, g.const(zeros, "zp3"), bits, packed.shape[1], zero, 2)
            y = g.op("MatMulNBits", "x", b4, g.const(scales.astype(np.float32).ravel(), "s"),
                     g.op("Reshape", zp4, g.const(np.array([-1]))), domain="com.microsoft",
                     K=k, N=n, bits=4, block_size=GROUP)
        else:
            y = _matmulnbits(g, "x", *_nbits(w, 4, mask), 4, n, k)
            y, index_bits = _sparse_term(g, kind, "x", y, w, mask, m)
        outputs.append((y, n))
    return g.model(k, m, outputs, g.sparse), index_bits


def _session(model: bytes, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])


def _cell(kinds: dict[str, tuple[bytes, float]], k: int, m: int, threads: int, runs: int) -> dict:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, m, k)).astype(np.float32)
    sessions, failed = {}, {}
    for name, (model, _) in kinds.items():
        try:
            sessions[name] = _session(model, threads)
        except Exception as exc:     # e.g. a form ORT cannot load from a file
            failed[name] = {"error": str(exc).strip().splitlines()[0][:300]}
    outs = {name: s.run(None, {"x": x}) for name, s in sessions.items()}
    ref = outs.get("nbits") or outs.get("fp32")
    timed = _report.interleaved_medians({name: (lambda s=s: s.run(None, {"x": x}))
                                         for name, s in sessions.items()}, runs=runs, warmup=10)
    res = dict(failed)
    for name, t in timed.items():
        res[name] = {"median_ms": round(t["median_ms"], 4), "p10_ms": round(t["p10_ms"], 4),
                     "p90_ms": round(t["p90_ms"], 4)}
        if kinds[name][1]:
            res[name]["index_bits_per_outlier"] = round(kinds[name][1], 1)
        if ref is not None and name not in ("fp32",):
            res[name]["max_abs_vs_first"] = float(max(np.abs(a - b).max() for a, b in zip(outs[name], ref)))
    return res


MODEL = dict(vocab=512, d_model=512, n_layer=4, n_head=8, tie_weights=False)
MODEL_VARIANTS = {"fp32": ("", {}), "rtn4": ("quantize(bits=4,group=32)", {}),
                  "gwq4": ("quantize(bits=4,group=32,outliers=0.01,criterion=magnitude)", {}),
                  "gwq4_acc4": ("quantize(bits=4,group=32,outliers=0.01,criterion=magnitude)",
                                {"nbits_accuracy_level": 4}),
                  "rtn3": ("quantize(bits=3,group=32)", {}),
                  "gwq3": ("quantize(bits=3,group=32,outliers=0.01,criterion=magnitude)", {})}


def model_cells(runs: int) -> list[dict]:
    """The whole GPT (d=512, 4 blocks, MLP 4x, untied 512-token head) through the real
    pipeline and ORT backend: fp32 vs 4-/3-bit RTN vs GWQ with 1% outliers."""
    import shutil
    import tempfile

    import torch

    from examples.models import tiny_gpt
    from gradrewrite.backends.ort import make_session
    from gradrewrite.compiler import CompileOptions, compile_graph
    from gradrewrite.rewrite.capture import capture

    tmp = Path(tempfile.mkdtemp())
    out = []
    try:
        for label, seq in SHAPES.items():
            model, (ids,) = tiny_gpt(seq=seq, **MODEL)
            graph = capture(model, (ids,))
            paths = {}
            for name, (passes, options) in MODEL_VARIANTS.items():
                paths[name] = tmp / f"{name}_{seq}"
                compile_graph(graph.clone(), paths[name], CompileOptions(
                    passes=passes, backend="ort", backend_options=options, latency_runs=0))
            feed = ids.numpy()
            for threads in (1, 2):
                sessions = {n: make_session(p / "model.onnx", threads=threads) for n, p in paths.items()}
                timed = _report.interleaved_medians(
                    {n: (lambda s=s: s.run(None, {s.get_inputs()[0].name: feed})) for n, s in sessions.items()},
                    runs=runs, warmup=5)
                out.append({"input": label, "seq": seq, "threads": threads,
                            "latency": {n: round(t["median_ms"], 4) for n, t in timed.items()},
                            "file_bytes": {n: (p / "model.onnx").stat().st_size for n, p in paths.items()}})
                print("model", label, threads, out[-1]["latency"], flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", type=int, default=200)
    args = ap.parse_args()
    runs = 20 if args.quick else args.runs
    layers = LAYERS[:1] if args.quick else LAYERS
    cells, low_bit = [], []
    for n, k in layers:
        _, mask = _layer(n, k, 100)
        counts = np.bincount(mask.nonzero()[0], minlength=n)
        for label, m in SHAPES.items():
            kinds = {"fp32": build("fp32", n, k, m), "nbits": build("nbits", n, k, m),
                     "nbits_acc4": build("nbits_acc4", n, k, m)}
            kinds.update({form: build(form, n, k, m) for form in FORMS})
            bit_kinds = {"fp32": kinds["fp32"], "4bit_nbits": kinds["nbits"]}
            for bits in (2, 3, 8):
                if bits != 3:
                    bit_kinds[f"{bits}bit_nbits"] = build("nbits", n, k, m, bits=bits)
                if bits != 8:
                    bit_kinds[f"{bits}bit_to4_at_load"] = build("to4_at_load", n, k, m, bits=bits)
                if bits == 3:
                    bit_kinds["3bit_to4_per_call"] = build("to4_per_call", n, k, m, bits=bits)
            for threads in (1, 2):
                res = _cell(kinds, k, m, threads, runs)
                cells.append({"layer": f"{n}x{k}", "input": f"[1,{m},{k}]", "threads": threads,
                              "rows_max_outliers": int(counts.max()), "rows_mean_outliers": float(counts.mean()),
                              "latency": res})
                print(cells[-1]["layer"], label, threads, {a: b.get("median_ms") for a, b in res.items()}, flush=True)
                if label == "decode" or not args.quick:
                    res = _cell(bit_kinds, k, m, threads, runs)
                    low_bit.append({"layer": f"{n}x{k}", "input": f"[1,{m},{k}]", "threads": threads,
                                    "latency": res})
                    print("  bits", {a: b.get("median_ms") for a, b in res.items()}, flush=True)
    models = model_cells(max(20, runs // 4))
    base = lambda c: c["latency"]["nbits"]["median_ms"]
    rows = [[c["layer"], c["input"], c["threads"], round(c["latency"]["fp32"]["median_ms"], 3), round(base(c), 3),
             round(c["latency"]["nbits_acc4"]["median_ms"] / base(c), 2)]
            + [round(c["latency"][f]["median_ms"] / base(c), 2) if "median_ms" in c["latency"][f] else "fails"
               for f in FORMS] for c in cells]
    bit_rows = [[c["layer"], c["input"], c["threads"]] + [round(c["latency"][k]["median_ms"], 3) for k in
                                                           ("fp32", "2bit_nbits", "2bit_to4_at_load", "3bit_to4_at_load",
                                                            "3bit_to4_per_call", "4bit_nbits", "8bit_nbits")]
                for c in low_bit]
    data = {"title": "Outlier term and low-bit forms on ONNX Runtime",
            "config": {"copies_per_graph": COPIES, "group": GROUP, "outlier_fraction": FRACTION, "runs": runs},
            "cells": cells, "low_bit": low_bit, "model": models,
            "sections": [
                {"heading": "The outlier term: time relative to MatMulNBits alone",
                 "text": f"{COPIES} layers per graph on the same input, 4-bit g{GROUP}, 1% outliers (top "
                         "magnitude of heavy-tailed columns). fp32 and nbits in ms; the other columns are "
                         "ratios to nbits (MatMulNBits alone, accuracy_level 0): acc4 = accuracy_level 4 "
                         "(int8 activations), the rest = MatMulNBits + the sparse term in that form.",
                 "columns": ["layer NxK", "input", "threads", "fp32 ms", "nbits ms", "acc4 x"]
                 + [f"{f} x" for f in FORMS], "rows": rows},
                {"heading": "Low-bit widths: ms per graph",
                 "text": "nbits = MatMulNBits at that width; to4_at_load = codes stored at that width, "
                         "widened to a 4-bit MatMulNBits by an initializer-only subgraph ORT folds once at "
                         "session creation; 3bit per call = the same unpacking fed a runtime zero (nothing folds).",
                 "columns": ["layer NxK", "input", "threads", "fp32", "2-bit nbits", "2-bit to4 at load",
                             "3-bit to4 at load", "3-bit per call", "4-bit nbits", "8-bit nbits"],
                 "rows": bit_rows},
                {"heading": "Whole model: GPT d=512, 4 blocks, ms per forward",
                 "text": "Exported by the ORT backend (its outlier term and load-time widening); "
                         "x vs fp32 = fp32 / variant (above 1 = faster). gwq = 1% outliers (magnitude); "
                         "acc4 = nbits_accuracy_level=4 (opt-in, not exact).",
                 "columns": ["input", "threads"] + list(MODEL_VARIANTS) + ["gwq4 x vs fp32", "gwq4 / rtn4"],
                 "rows": [[c["input"], c["threads"]] + [c["latency"][v] for v in MODEL_VARIANTS]
                          + [round(c["latency"]["fp32"] / c["latency"]["gwq4"], 2),
                             round(c["latency"]["gwq4"] / c["latency"]["rtn4"], 2)] for c in models]}]}
    _report.publish("quant_sparse_term", data, quick=args.quick)


if __name__ == "__main__":
    main()
