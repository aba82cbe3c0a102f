"""GPU 2:4 path: run 2:4-sparse linear layers on sparse tensor cores, where it pays.

``to_semi_structured(graph)`` looks at every ``aten.linear`` whose stored weight is 2:4
sparse along its input features (what ``nm-sparsity(n=2, m=4)`` produces), times a
dense and a semi-structured sparse matmul on that layer's weight shape with a
representative input (the layer's own input shape from the graph), and swaps the
weight for ``torch.sparse.to_sparse_semi_structured`` form only when the sparse matmul
is at least ``min_speedup`` times faster and gives the same result.

Requirements (from ``torch/sparse/semi_structured.py`` in torch 2.13): a CUDA device;
2-D contiguous CUDA weights; dtype and shape per the kernel backend's
``_DTYPE_SHAPE_CONSTRAINTS`` (read from the class at run time) — cuSPARSELt (used when
``torch.backends.cusparselt.is_available()``): fp16/bf16 with rows and columns
multiples of 16, int8 multiples of 32; CUTLASS otherwise: fp16/bf16 rows multiple of
32 and columns of 64, int8 16 x 128, fp32 32 x 32. Only floating-point weights are
timed (int8 layers are reported ineligible: F.linear has no dense int8 CUDA kernel to
time against). Move the graph to the GPU in the
target dtype first, e.g. ``graph.gm.to("cuda", torch.float16)``; weights elsewhere are
reported ineligible, never moved.

A converted graph runs in PyTorch (``graph(...)`` / ``graph.gm``); converted weights are
tensor subclasses that ONNX export does not know, so lower to ORT/TVM from the dense
graph. This module needs a CUDA GPU to do anything: on a machine without one it returns
``{"available": False, "reason": "no CUDA device"}``. It is exercised only on GPU
machines.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from ...rewrite.graph import Graph, module_path, tensor_meta
from ...rewrite.nm_masks import to_groups

aten = torch.ops.aten


def to_semi_structured(graph: Graph, *, min_speedup: float = 1.0, iters: int = 50,
                       warmup: int = 5) -> dict[str, Any]:
    """Convert the 2:4 linear weights that run faster sparse; a report per layer.

    Report: ``{"available", "backend", "device", "min_speedup", "converted": count,
    "layers": [{"path", "weight", "shape", "dtype", "eligible", "reason", "dense_ms",
    "sparse_ms", "speedup", "converted"}]}`` (times are per matmul, median of ``iters``).
    """
    if not torch.cuda.is_available():
        return {"available": False, "reason": "no CUDA device"}
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return {"available": False, "reason": "this torch has no torch.sparse.to_sparse_semi_structured"}
    sparse_cls = _sparse_class()
    if sparse_cls is None:
        return {"available": False, "reason": "no semi-structured sparse kernel backend in this torch"}
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return {"available": False,
                "reason": f"sparse tensor cores need compute capability >= 8.0, this GPU has {major}.{minor}"}

    layers: list[dict[str, Any]] = []
    for node in graph.call_nodes():
        if node.target != aten.linear.default:
            continue
        entry: dict[str, Any] = {"path": module_path(node), "eligible": False, "converted": False}
        layers.append(entry)
        w_node = node.args[1] if len(node.args) > 1 else None
        if not (isinstance(w_node, fx.Node) and w_node.op == "get_attr"):
            entry["reason"] = "weight is not a stored weight"
            continue
        w = graph.attr(w_node)
        entry.update(weight=str(w_node.target), shape=list(w.shape),
                     dtype=str(w.dtype).removeprefix("torch."))
        reason = _ineligible(w, w_node, sparse_cls)
        if reason:
            entry["reason"] = reason
            continue
        entry["eligible"] = True
        bias = graph.attr(node.args[2]) if len(node.args) > 2 and isinstance(node.args[2], fx.Node) \
            and node.args[2].op == "get_attr" else None
        x = _representative_input(node, w)
        try:
            sparse_w = sparse_cls.from_dense(w.detach().contiguous())
            dense_ms, dense_out = _time(lambda: F.linear(x, w, bias), iters, warmup)
            sparse_ms, sparse_out = _time(lambda: F.linear(x, sparse_w, bias), iters, warmup)
        except (RuntimeError, NotImplementedError) as exc:  # a kernel the backend lacks
            entry["reason"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            continue
        speedup = dense_ms / sparse_ms if sparse_ms > 0 else 0.0
        entry.update(dense_ms=round(dense_ms, 5), sparse_ms=round(sparse_ms, 5),
                     speedup=round(speedup, 3), input_shape=list(x.shape))
        if not _same(dense_out, sparse_out):
            entry["reason"] = "sparse result differs from dense"
        elif speedup < min_speedup:
            entry["reason"] = f"speedup {speedup:.2f}x < min_speedup {min_speedup:g}x"
        else:
            _bind(graph, w_node, sparse_w)
            entry["converted"] = True
            node.meta.setdefault("gradrewrite", {})["semi_structured"] = sparse_cls.BACKEND
    report = {"available": True, "backend": sparse_cls.BACKEND,
              "device": torch.cuda.get_device_name(), "min_speedup": min_speedup,
              "converted": sum(e["converted"] for e in layers), "layers": layers}
    graph.meta["semi_structured"] = {k: v for k, v in report.items() if k != "layers"}
    return report


def _sparse_class():
    sparse = torch.sparse
    try:
        if torch.backends.cusparselt.is_available():
            return sparse.SparseSemiStructuredTensorCUSPARSELT
    except AttributeError:
        pass
    return getattr(sparse, "SparseSemiStructuredTensorCUTLASS", None)


def is_nm(w: torch.Tensor, n: int, m: int, kind: str = "linear") -> bool:
    """At most n nonzeros in every group of m along the reduction dim (K % m == 0)."""
    g = to_groups(w != 0, kind)
    if g.shape[1] % m:
        return False
    return bool((g.reshape(g.shape[0], -1, m).sum(-1) <= n).all())


def _ineligible(w: torch.Tensor, w_node: fx.Node, sparse_cls) -> str | None:
    if len(w_node.users) != 1:
        return "weight shared with another layer"
    if w.dim() != 2:
        return f"weight is {w.dim()}-D, not 2-D"
    if not w.is_cuda:
        return f"weight is on {w.device}; move the graph to CUDA first (graph.gm.to('cuda', torch.float16))"
    constraints = sparse_cls._DTYPE_SHAPE_CONSTRAINTS
    if not w.dtype.is_floating_point:
        return (f"dtype {str(w.dtype).removeprefix('torch.')}: integer weights are not timed "
                "(CUDA has no dense int8 linear to compare with); use fp16 or bf16")
    if w.dtype not in constraints:
        names = ", ".join(str(d).removeprefix("torch.") for d in constraints)
        return f"dtype {str(w.dtype).removeprefix('torch.')} not supported by {sparse_cls.BACKEND} ({names})"
    c = constraints[w.dtype]
    rows, cols = w.shape
    if rows < c.sparse_min_rows or rows % c.sparse_min_rows or cols < c.sparse_min_cols \
            or cols % c.sparse_min_cols:
        return (f"shape {rows}x{cols} is not a multiple of {c.sparse_min_rows}x{c.sparse_min_cols} "
                f"({sparse_cls.BACKEND}, {str(w.dtype).removeprefix('torch.')})")
    if not is_nm(w, 2, 4, "linear"):
        return "weight is not 2:4 sparse (run nm-sparsity(n=2, m=4) first)"
    return None


def _representative_input(node: fx.Node, w: torch.Tensor) -> torch.Tensor:
    """A random input shaped like the layer's own (symbolic sizes -> 1)."""
    shape, _ = tensor_meta(node.args[0]) if isinstance(node.args[0], fx.Node) else (None, None)
    shape = [s if isinstance(s, int) else 1 for s in (shape or [1, w.shape[1]])]
    gen = torch.Generator(device=w.device).manual_seed(0)
    if w.dtype.is_floating_point:
        return torch.randn(shape, generator=gen, device=w.device, dtype=w.dtype)
    return torch.randint(-8, 8, shape, generator=gen, device=w.device, dtype=w.dtype)


def _time(fn, iters: int, warmup: int) -> tuple[float, torch.Tensor]:
    with torch.no_grad():
        out = fn()
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(max(1, iters)):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2], out


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to accumulation-order rounding (fp32 sparse kernels may use TF32)."""
    if a.shape != b.shape:
        return False
    eps = 2.0 ** -10 if a.dtype == torch.float32 else torch.finfo(a.dtype).eps
    a, b = a.float(), b.float()
    scale = a.abs().max().item() or 1.0
    return bool((a - b).abs().max().item() <= 8 * eps * scale * math.sqrt(a.shape[-1] or 1))


def _bind(graph: Graph, w_node: fx.Node, sparse_w: torch.Tensor) -> None:
    """Bind the sparse weight under the dense one's name (the tutorial's
    ``linear.weight = nn.Parameter(to_sparse_semi_structured(w))``)."""
    owner_path, _, leaf = str(w_node.target).rpartition(".")
    owner = graph.gm.get_submodule(owner_path) if owner_path else graph.gm
    if leaf in owner._parameters:
        owner._parameters[leaf] = torch.nn.Parameter(sparse_w, requires_grad=False)
    else:
        owner._buffers[leaf] = sparse_w


__all__ = ["to_semi_structured", "is_nm"]
