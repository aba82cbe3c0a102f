"""2-D pooling over NCHW tensors: max (its indices only when unused), average and
adaptive average pooling."""
from __future__ import annotations

from typing import Any

import torch.fx as fx

from ...program import Val
from .base import Unsupported, aten, float_in, handles, pair, pool_shape, shape_of
from .lowerer import Lowerer


@handles(aten.max_pool2d.default, aten.max_pool2d_with_indices.default)
def _max_pool(lw: Lowerer, node: fx.Node) -> Any:
    a = list(node.args) + [None] * 6
    x = float_in(lw, a[0])
    if len(x.shape) != 4:
        raise Unsupported("only NCHW pooling")
    k = pair(a[1])
    s = pair(a[2]) if a[2] else k
    p, d = pair(a[3] or 0), pair(a[4] or 1)
    shape = shape_of(node) if node.target == aten.max_pool2d.default else \
        tuple(int(v) for v in node.meta["val"][0].shape)
    y = lw.new(shape, "f32")
    lw.emit("gr_max_pool2d_f32", "gr_pool.c",
            f"{{ {pool_shape(x, shape, k, s, p, d)}\n  gr_max_pool2d_f32(&s, {x.ptr()}, {y.out()}); }}", [x], [y])
    if node.target == aten.max_pool2d_with_indices.default:
        if len(node.users) != 1 or any(u.args[1] != 0 for u in node.users):
            raise Unsupported("max pool indices are used")
        return (y, None)
    return y


@handles(aten.avg_pool2d.default)
def _avg_pool(lw: Lowerer, node: fx.Node) -> Val:
    a = list(node.args) + [None] * 8
    x = float_in(lw, a[0])
    k = pair(a[1])
    s = pair(a[2]) if a[2] else k
    p = pair(a[3] or 0)
    cip = 1 if a[5] is None else int(bool(a[5]))
    div = int(a[6] or 0)
    ys = shape_of(node)
    y = lw.new(ys, "f32")
    lw.emit("gr_avg_pool2d_f32", "gr_pool.c",
            f"{{ {pool_shape(x, ys, k, s, p, (1, 1), cip, div)}\n  gr_avg_pool2d_f32(&s, {x.ptr()}, {y.out()}); }}",
            [x], [y])
    return y


@handles(aten.adaptive_avg_pool2d.default, aten._adaptive_avg_pool2d.default)
def _adaptive_avg(lw: Lowerer, node: fx.Node) -> Val:
    x = float_in(lw, node.args[0])
    ys = shape_of(node)
    if len(x.shape) != 4:
        raise Unsupported("only NCHW pooling")
    y = lw.new(ys, "f32")
    lw.emit("gr_adaptive_avg_pool2d_f32", "gr_pool.c",
            f"gr_adaptive_avg_pool2d_f32({x.ptr()}, {y.out()}, {x.shape[0] * x.shape[1]}, {x.shape[2]}, "
            f"{x.shape[3]}, {ys[2]}, {ys[3]});", [x], [y])
    return y
