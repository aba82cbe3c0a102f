"""Views and data movement. Views (reshape, permute, transpose, expand, slice, select,
split) cost no kernel: each is a new strided ``Val`` on the same buffer, copied only when
a kernel needs contiguous data. Also identities (detach, dropout, clone), casts,
concatenation and the embedding lookup."""
from __future__ import annotations

import operator

import torch.fx as fx

from ...program import Val, contiguous_strides
from .base import Unsupported, aten, handles, kernel_dtype, shape_of, val_meta
from .lowerer import Lowerer


# ---- views: no kernel, a new strided Val on the same buffer
def _reshape_to(lw: Lowerer, v: Val, shape: tuple[int, ...]) -> Val:
    v = lw.contig(v)
    return Val(v.buf, shape, contiguous_strides(shape), v.offset)


@handles(aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
         aten.unflatten.int, aten.squeeze.default, aten.squeeze.dim, aten.squeeze.dims,
         aten.unsqueeze.default, aten.view_as.default)
def _view(lw: Lowerer, node: fx.Node) -> Val:
    v = lw.val(node.args[0])
    shape = shape_of(node)
    if v.is_contiguous():
        return Val(v.buf, shape, contiguous_strides(shape), v.offset)
    strides = _view_strides(v.shape, v.strides, shape)
    if strides is not None:
        return Val(v.buf, shape, strides, v.offset)
    return _reshape_to(lw, v, shape)


def _view_strides(old: tuple[int, ...], strides: tuple[int, ...], new: tuple[int, ...]):
    """Strides of ``new`` as a view of a strided tensor, or None when it needs a copy
    (the rule of torch's computeStride: split/merge only runs of dims that are
    contiguous with each other)."""
    if not old:
        return contiguous_strides(new)
    out = [0] * len(new)
    view_d = len(new) - 1
    base = strides[-1]
    t_numel = v_numel = 1
    for d in range(len(old) - 1, -1, -1):
        t_numel *= old[d]
        if d == 0 or (old[d - 1] != 1 and strides[d - 1] != t_numel * base):
            while view_d >= 0 and (v_numel < t_numel or new[view_d] == 1):
                out[view_d] = v_numel * base
                v_numel *= new[view_d]
                view_d -= 1
            if v_numel != t_numel:
                return None
            if d > 0:
                base = strides[d - 1]
                t_numel = v_numel = 1
    return tuple(out) if view_d == -1 else None


@handles(aten.permute.default, aten.transpose.int, aten.t.default, aten.numpy_T.default)
def _permute(lw: Lowerer, node: fx.Node) -> Val:
    v = lw.val(node.args[0])
    nd = len(v.shape)
    if node.target == aten.permute.default:
        perm = [int(p) % nd for p in node.args[1]]
    else:
        perm = list(range(nd))
        if node.target == aten.transpose.int:
            i, j = int(node.args[1]) % nd, int(node.args[2]) % nd
        else:
            i, j = 0, nd - 1
        if nd >= 2:
            perm[i], perm[j] = perm[j], perm[i]
    return Val(v.buf, tuple(v.shape[p] for p in perm), tuple(v.strides[p] for p in perm), v.offset)


@handles(aten.expand.default)
def _expand(lw: Lowerer, node: fx.Node) -> Val:
    v = lw.val(node.args[0])
    shape = shape_of(node)
    pad = len(shape) - len(v.shape)
    src_shape, src_strides = (1,) * pad + v.shape, (0,) * pad + v.strides
    strides = tuple(0 if s == 1 and d != 1 else st for s, st, d in zip(src_shape, src_strides, shape))
    return Val(v.buf, shape, strides, v.offset)


@handles(aten.slice.Tensor)
def _slice(lw: Lowerer, node: fx.Node) -> Val:
    v = lw.val(node.args[0])
    a = list(node.args) + [None] * 5
    dim = int(a[1] or 0) % len(v.shape)
    size = v.shape[dim]
    start = 0 if a[2] is None else int(a[2])
    step = int(a[4] or 1)
    start = max(0, min(size, start + size if start < 0 else start))
    shape = shape_of(node)
    strides = list(v.strides)
    strides[dim] *= step
    return Val(v.buf, shape, tuple(strides), v.offset + start * v.strides[dim])


@handles(aten.select.int)
def _select(lw: Lowerer, node: fx.Node) -> Val:
    v = lw.val(node.args[0])
    dim = int(node.args[1]) % len(v.shape)
    idx = int(node.args[2]) % v.shape[dim]
    shape = v.shape[:dim] + v.shape[dim + 1:]
    strides = v.strides[:dim] + v.strides[dim + 1:]
    return Val(v.buf, shape, strides, v.offset + idx * v.strides[dim])


@handles(aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default)
def _split(lw: Lowerer, node: fx.Node) -> tuple:
    v = lw.val(node.args[0])
    parts = [tuple(int(s) for s in t.shape) for t in node.meta["val"]]
    dim = int(node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)) % len(v.shape)
    out, start = [], 0
    for shape in parts:
        out.append(Val(v.buf, shape, v.strides, v.offset + start * v.strides[dim]))
        start += shape[dim]
    return tuple(out)


@handles(operator.getitem)
def _getitem(lw: Lowerer, node: fx.Node) -> Val:
    parent = lw.vals.get(node.args[0])
    if parent is None:
        raise Unsupported("item of an unsupported op")
    item = parent[node.args[1]]
    if item is None:
        raise Unsupported("this output of the op is not generated")
    return item


@handles(aten.alias.default, aten.detach.default, aten.dropout.default, aten.clone.default,
         aten.contiguous.default, aten.lift_fresh_copy.default, aten.feature_dropout.default)
def _identity(lw: Lowerer, node: fx.Node) -> Val:
    return lw.val(node.args[0])


@handles(aten._to_copy.default, aten.to.dtype, aten.type_as.default)
def _to(lw: Lowerer, node: fx.Node) -> Val:
    v = lw.val(node.args[0])
    dt = kernel_dtype(val_meta(node).dtype)
    if dt == v.dtype:
        return v
    if v.dtype == "i64" and dt == "f32":
        v = lw.contig(v)
        y = lw.new(v.shape, "f32")
        lw.emit("gr_cast_i64_f32", "gr_tensor.c", f"gr_cast_i64_f32({v.ptr()}, {y.out()}, {v.numel});", [v], [y])
        return y
    raise Unsupported(f"cast {v.dtype} -> {dt}")


@handles(aten.cat.default)
def _cat(lw: Lowerer, node: fx.Node) -> Val:
    ys = shape_of(node)
    dim = int(node.args[1] if len(node.args) > 1 else 0) % len(ys)
    parts = [lw.val(a) for a in node.args[0]]
    y = lw.new(ys, parts[0].dtype)
    start = 0
    for p in parts:
        if p.numel == 0:
            continue
        dst = Val(y.buf, p.shape, y.strides, start * y.strides[dim])
        lw.copy(p, dst, op="aten.cat")
        start += p.shape[dim]
    return y


@handles(aten.embedding.default)
def _embedding(lw: Lowerer, node: fx.Node) -> Val:
    table = lw.const_val(node.args[0], "f32")
    idx = lw.contig(lw.val(node.args[1]))
    if idx.dtype != "i64":
        raise Unsupported("embedding indices must be int64")
    ys = shape_of(node)
    y = lw.new(ys, "f32")
    lw.emit("gr_embedding_f32", "gr_tensor.c",
            f"gr_embedding_f32({table.ptr()}, {table.shape[1]}, {idx.ptr()}, {idx.numel}, {y.out()});", [idx], [y])
    return y
