"""ONNX file -> ``nn.Module``, so ONNX models enter the same ATen FX pipeline as PyTorch.

Design
------
``onnx_to_module`` reads the file, checks it (file, protobuf, ops, input shapes) and
raises ``InputError`` for anything a user must fix. It then *plans* the graph by running
every node once, eagerly, on seeded example inputs:

* A value is **static** when it is known without the inputs: ``Constant`` outputs,
  non-float initializers, ``Shape``/``Size`` outputs (input shapes are fixed) and the
  result of any node whose inputs are all static. Static nodes are folded away here;
  shape subgraphs (``Shape -> Gather -> Concat -> Reshape``) therefore reach
  ``forward`` as plain Python ints, which is what ``torch.export`` needs.
* Float initializers are **parameters** (BatchNorm statistics: buffers); values
  computed from the inputs or parameters are **runtime**.

Each remaining node becomes a ``_Step`` that ``forward`` interprets in topological
order through a dispatch table ``{op_type: handler}`` of short torch functions. A step
runs *inside* the submodule named after its ONNX node (``OnnxScope``), so
``torch.export`` records ``nn_module_stack`` entries whose paths are the ONNX layer
names, and the weights a step reads live on that submodule: float initializers as
parameters, static tensors it needs at run time as buffers. Shape-like operands
(``Reshape`` shape, ``Slice`` starts, axes …) are passed as Python lists instead, and a
one-element constant in an element-wise op becomes a Python scalar (``x / 8.0``), as
in a PyTorch-written model.

Module-path rule (ONNX node -> dotted module path)
--------------------------------------------------
1. The torch dynamo exporter's ``pkg.torch.onnx.name_scopes`` metadata, when present,
   names the innermost module directly (``['', 'fc', 'linear']`` -> ``fc``). In such a
   file, a node an onnxscript rule fused (Conv+BatchNorm) takes the module of its
   ``*.weight`` initializer (``features.0.weight`` -> ``features.0``), and a node the
   optimizer created without metadata takes its nearest consumer's module, else its
   producer's.
2. A name with ``/`` (the TorchScript exporter's ``/features/features.0/Conv``): drop
   the leading ``/`` and the last component (the op's own name); each remaining
   component is a module name, and one that repeats its parent's name as a dotted
   prefix (``features`` then ``features.0``) replaces it, so ``/features/features.0/Conv``
   -> ``features.0`` and ``/layers.0/mlp/mlp.2/MatMul`` -> ``layers.0.mlp.2``. ``/Flatten``
   -> the root (``""``).
3. Any other name is itself the path (dots split levels): ``conv1`` -> ``conv1``.
4. An unnamed node is ``node_<index>``.
Each component is sanitized to ``[A-Za-z0-9_]`` (``_`` suffix if it clashes with an
``nn.Module`` attribute); two different ONNX scopes that sanitize alike get ``_1``,
``_2`` … suffixes. Nodes with the same path share one submodule, like a PyTorch module
whose forward runs several ops.

Weights are named after the initializer minus the module path (``fc.weight`` on ``fc``
-> ``weight``), else by role (Conv/Gemm/MatMul/norm inputs: ``weight``, ``bias``,
``running_mean`` …), else after the ONNX value. A weight read by several modules is
copied into each (exporters deduplicate equal initializers; passes must be able to
rewrite one layer alone).

Limits: static shapes only (dynamic input dims must be given), default-domain ops of
opset 11 or newer (tested with 13-21), no control flow (If/Loop/Scan), inference
semantics (Dropout is the identity, BatchNormalization uses running statistics).
"""
from __future__ import annotations

import ast
import functools
import inspect
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from .graph import InputSpec

__all__ = ["onnx_to_module", "SUPPORTED_OPS", "OnnxModule", "OnnxScope"]

_PT2_HINT = "export the model from PyTorch as .pt2 instead (torch.export.save)"
_MIN_OPSET = 11

_DTYPES: dict[int, torch.dtype] = {
    1: torch.float32, 2: torch.uint8, 3: torch.int8, 4: torch.uint16, 5: torch.int16,
    6: torch.int32, 7: torch.int64, 9: torch.bool, 10: torch.float16, 11: torch.float64,
    12: torch.uint32, 13: torch.uint64, 16: torch.bfloat16,
}


# ============================================================================ steps
@dataclass
class _Step:
    """One ONNX node as ``forward`` runs it.

    ``sources`` says where each input comes from: ``("env", value_name)`` a runtime
    tensor, ``("attr", name)`` a parameter/buffer of the step's module, ``("py", value)``
    a Python constant, ``("none", None)`` an omitted optional input.
    """

    index: int
    name: str
    op_type: str
    attrs: dict[str, Any]
    opset: int
    scope: str
    sources: tuple
    outputs: tuple[str, ...]

    def attr(self, key: str, default: Any = None) -> Any:
        return self.attrs.get(key, default)


def _run_step(module: nn.Module, step: _Step, runtime: Sequence[torch.Tensor]) -> tuple:
    it = iter(runtime)
    args = []
    for kind, value in step.sources:
        if kind == "env":
            args.append(next(it))
        elif kind == "attr":
            args.append(getattr(module, value))
        elif kind == "py":
            args.append(value)
        else:
            args.append(None)
    out = HANDLERS[step.op_type](step, *args)
    return out if isinstance(out, tuple) else (out,)


class OnnxScope(nn.Module):
    """The module an ONNX layer's ops run in; holds that layer's weights."""

    def forward(self, step: _Step, *runtime: torch.Tensor) -> tuple:
        return _run_step(self, step, runtime)


class OnnxModule(nn.Module):
    """Interprets the planned ONNX steps; see the module docstring."""

    def __init__(self, input_names: list[str], steps: list[_Step], outputs: list[tuple]):
        super().__init__()
        self._input_names = input_names
        self._steps = steps
        self._outputs = outputs  # ("env", name) or ("attr", root attribute)

    def forward(self, *inputs: torch.Tensor):
        env = dict(zip(self._input_names, inputs))
        for step in self._steps:
            runtime = [env[v] for kind, v in step.sources if kind == "env"]
            if step.scope:
                outs = self.get_submodule(step.scope)(step, *runtime)
            else:  # a root-level op, e.g. legacy "/Flatten": no submodule call
                outs = _run_step(self, step, runtime)
            for name, value in zip(step.outputs, outs):
                if name:
                    env[name] = value
        results = tuple(env[v] if kind == "env" else getattr(self, v)
                        for kind, v in self._outputs)
        return results[0] if len(results) == 1 else results


    def __reduce_ex__(self, protocol):
        # The per-instance class _with_signature makes is not importable: rebuild it.
        return _restore, (getattr(self, "_arg_names", None), self.__dict__)


def _with_signature(module: OnnxModule, names: list[str]) -> OnnxModule:
    """Give ``forward`` named parameters so exported placeholders carry the ONNX input
    names (``input_1``) rather than ``args_0``."""
    def forward(self, *inputs):
        return OnnxModule.forward(self, *inputs)

    params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD)
              for n in ["self", *names]]
    forward.__signature__ = inspect.Signature(params)
    module.__class__ = type("OnnxModule", (OnnxModule,),
                            {"forward": forward, "__module__": __name__})
    module._arg_names = list(names)
    return module


def _restore(names: list[str] | None, state: dict) -> OnnxModule:
    module = OnnxModule.__new__(OnnxModule)
    module.__dict__.update(state)
    return _with_signature(module, names) if names is not None else module


# ============================================================================ helpers
def _ints(v: Any) -> list[int]:
    """A shape-like operand (tensor at plan time, Python list in forward) as ints."""
    if isinstance(v, torch.Tensor):
        v = v.tolist()
    if isinstance(v, (list, tuple)):
        return [int(i) for i in v]
    return [int(v)]


def _num(v: Any) -> Any:
    """A scalar operand as a Python number."""
    if isinstance(v, torch.Tensor):
        return v.reshape(-1)[0].item()
    if isinstance(v, (list, tuple)):
        return _num(v[0])
    return v


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _opt_axes(n: _Step, given: Any, key: str = "axes") -> list[int] | None:
    """Axes from the input (newer opsets) or the attribute (older ones)."""
    if given is not None:
        return _ints(given)
    return list(n.attr(key)) if n.attr(key) is not None else None


def _unsupported(n: _Step, what: str) -> InputError:
    return InputError(f"ONNX node {n.name!r} ({n.op_type}) uses {what}, which is not supported",
                      _PT2_HINT)


def _torch_pad(begins: Sequence[int], ends: Sequence[int]) -> list[int]:
    """ONNX [b1..bn, e1..en] over the trailing dims -> F.pad's last-dim-first pairs."""
    out: list[int] = []
    for b, e in zip(reversed(begins), reversed(ends)):
        out += [b, e]
    return out


def _spatial_pads(n: _Step, spatial: Sequence[int], kernel: Sequence[int],
                  strides: Sequence[int], dilations: Sequence[int]) -> tuple[list, list]:
    """(begins, ends) padding of a conv/pool, resolving ``auto_pad``."""
    nd = len(spatial)
    mode = n.attr("auto_pad", "NOTSET")
    if mode == "VALID":
        return [0] * nd, [0] * nd
    if mode in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for size, k, s, d in zip(spatial, kernel, strides, dilations):
            out = -(-size // s)
            total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
            small = total // 2
            # SAME_UPPER puts the odd extra pixel at the end, SAME_LOWER at the start.
            begins.append(small if mode == "SAME_UPPER" else total - small)
            ends.append(total - small if mode == "SAME_UPPER" else small)
        return begins, ends
    pads = list(n.attr("pads", [0] * (2 * nd)))
    return pads[:nd], pads[nd:]


def _by_rank(fns: tuple[Callable, ...], nd: int, n: _Step) -> Callable:
    if not 1 <= nd <= len(fns):
        raise _unsupported(n, f"{nd}-D spatial input")
    return fns[nd - 1]


# ============================================================================ handlers
# Each handler takes (step, *inputs) in ONNX input order and returns a tensor or a
# tuple of output tensors. Shape-like inputs arrive as Python values in forward and as
# real tensors when a node is folded, so handlers read them with _ints / _num.

def _conv(n, x, w, b=None):
    nd = w.ndim - 2
    strides = list(n.attr("strides", [1] * nd))
    dil = list(n.attr("dilations", [1] * nd))
    begins, ends = _spatial_pads(n, x.shape[2:], w.shape[2:], strides, dil)
    if begins != ends:  # torch convs pad symmetrically; pad the odd side explicitly
        x = F.pad(x, _torch_pad(begins, ends))
        begins = [0] * nd
    conv = _by_rank((F.conv1d, F.conv2d, F.conv3d), nd, n)
    return conv(x, w, b, strides, begins, dil, n.attr("group", 1))


def _conv_transpose(n, x, w, b=None):
    nd = w.ndim - 2
    strides = list(n.attr("strides", [1] * nd))
    dil = list(n.attr("dilations", [1] * nd))
    out_pad = list(n.attr("output_padding", [0] * nd))
    group = n.attr("group", 1)
    full = [(i - 1) * s + (k - 1) * d + 1 + p
            for i, s, k, d, p in zip(x.shape[2:], strides, w.shape[2:], dil, out_pad)]
    out_shape = n.attr("output_shape")
    mode = n.attr("auto_pad", "NOTSET")
    if out_shape is None and mode in ("SAME_UPPER", "SAME_LOWER"):
        out_shape = [i * s for i, s in zip(x.shape[2:], strides)]
    if out_shape is not None:
        sizes = list(out_shape)[-nd:]
        totals = [max(0, f - o) for f, o in zip(full, sizes)]
        # The spec (and ONNX Runtime) put the odd pixel at the start unless SAME_UPPER.
        begins = [t // 2 if mode == "SAME_UPPER" else t - t // 2 for t in totals]
        ends = [t - bg for t, bg in zip(totals, begins)]
    else:
        pads = list(n.attr("pads", [0] * (2 * nd)))
        begins, ends = pads[:nd], pads[nd:]
        sizes = [f - bg - en for f, bg, en in zip(full, begins, ends)]
    fn = _by_rank((F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d), nd, n)
    native = (begins == ends and min(begins) >= 0
              and sizes == [f - 2 * bg for f, bg in zip(full, begins)]
              and all(p < max(s, d) for p, s, d in zip(out_pad, strides, dil)))
    if native:  # what F.conv_transpose computes with symmetric padding
        return fn(x, w, b, strides, begins, out_pad, group, dil)
    # Asymmetric padding or a larger output_shape: compute the unpadded result, then
    # crop it (or extend it with zero rows) to the wanted window.
    y = fn(x, w, None, strides, 0, 0, group, dil)
    for axis, (lo, size) in enumerate(zip(begins, sizes)):
        dim = axis + 2
        extra_lo, extra_hi = max(0, -lo), max(0, lo + size - y.shape[dim])
        if extra_lo or extra_hi:
            y = F.pad(y, [0, 0] * (y.ndim - dim - 1) + [extra_lo, extra_hi])
            lo += extra_lo
        y = y.narrow(dim, lo, size)
    if b is not None:
        y = y + b.reshape([1, -1] + [1] * nd)
    return y


def _gemm(n, a, b, c=None):
    alpha, beta = n.attr("alpha", 1.0), n.attr("beta", 1.0)
    if n.attr("transA", 0):
        a = a.transpose(0, 1)
    trans_b = n.attr("transB", 0)
    # The common PyTorch Linear form maps to aten.linear, the op passes know as "linear".
    if trans_b and alpha == 1.0 and beta == 1.0 and (
            c is None or (c.ndim == 1 and c.shape[0] == b.shape[0])):
        return F.linear(a, b, c)
    b = b.transpose(0, 1) if trans_b else b
    if c is None or beta == 0.0:
        y = torch.mm(a, b)
        return y * alpha if alpha != 1.0 else y
    return torch.addmm(c, a, b, beta=beta, alpha=alpha)


def _div(n, a, b):
    if not a.dtype.is_floating_point and not isinstance(b, float):
        return torch.div(a, b, rounding_mode="trunc")  # ONNX integer Div truncates
    return a / b


def _pow(n, a, b):
    y = torch.pow(a, b)
    return y if y.dtype == a.dtype else y.to(a.dtype)  # ONNX Pow keeps the base's type


def _mod(n, a, b):
    return torch.fmod(a, b) if n.attr("fmod", 0) else torch.remainder(a, b)


def _hard_sigmoid(n, x):
    alpha, beta = n.attr("alpha", 0.2), n.attr("beta", 0.5)
    if np.float32(alpha) == np.float32(1 / 6) and beta == 0.5:
        return F.hardsigmoid(x)
    return torch.clamp(x * alpha + beta, 0.0, 1.0)


def _prelu(n, x, slope):
    if x.ndim >= 2 and (slope.numel() == 1 or (
            slope.shape[0] == x.shape[1] and slope.numel() == x.shape[1]
            and slope.ndim == x.ndim - 1)):
        return F.prelu(x, slope.reshape(-1))
    return torch.where(x >= 0, x, x * slope)


def _clip(n, x, lo=None, hi=None):
    if lo is None and hi is None:
        return x
    return torch.clamp(x, lo, hi)


def _softmax_fn(fn: Callable) -> Callable:
    def handler(n, x):
        if n.opset >= 13:
            return fn(x, dim=n.attr("axis", -1))
        # Before opset 13 the input is coerced to 2-D at ``axis`` (default 1).
        axis = _axis(n.attr("axis", 1), x.ndim)
        rows = math.prod(x.shape[:axis])
        return fn(x.reshape(rows, -1), dim=1).reshape(x.shape)
    return handler


def _batch_norm(n, x, scale, bias, mean, var):
    if n.attr("training_mode", 0):
        raise _unsupported(n, "training_mode=1")
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, n.attr("epsilon", 1e-5))


def _layer_norm(n, x, scale, bias=None):
    axis = _axis(n.attr("axis", -1), x.ndim)
    eps = n.attr("epsilon", 1e-5)
    shape = tuple(x.shape[axis:])
    if tuple(scale.shape) == shape and (bias is None or tuple(bias.shape) == shape):
        return F.layer_norm(x, shape, scale, bias, eps)
    dims = tuple(range(axis, x.ndim))  # broadcastable scale/bias: spell it out
    mean = x.mean(dim=dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps) * scale
    return y + bias if bias is not None else y


def _instance_norm(n, x, scale, bias):
    return F.instance_norm(x, weight=scale, bias=bias, eps=n.attr("epsilon", 1e-5))


def _pool_params(n, x):
    kernel = list(n.attr("kernel_shape"))
    nd = len(kernel)
    strides = list(n.attr("strides", [1] * nd))
    dil = list(n.attr("dilations", [1] * nd))
    begins, ends = _spatial_pads(n, x.shape[2:], kernel, strides, dil)
    return nd, kernel, strides, dil, begins, ends


def _max_pool(n, x):
    nd, kernel, strides, dil, begins, ends = _pool_params(n, x)
    if len(n.outputs) > 1 and n.outputs[1]:
        raise _unsupported(n, "the Indices output")
    ceil = bool(n.attr("ceil_mode", 0))
    pool = _by_rank((F.max_pool1d, F.max_pool2d, F.max_pool3d), nd, n)
    if begins != ends or any(p > k // 2 for p, k in zip(begins, kernel)):
        x = F.pad(x, _torch_pad(begins, ends), value=float("-inf"))
        begins = [0] * nd
    return pool(x, kernel, strides, begins, dil, ceil)


def _avg_pool(n, x):
    nd, kernel, strides, dil, begins, ends = _pool_params(n, x)
    if any(d != 1 for d in dil):
        raise _unsupported(n, "dilations")
    ceil = bool(n.attr("ceil_mode", 0))
    include = bool(n.attr("count_include_pad", 0))
    pool = _by_rank((F.avg_pool1d, F.avg_pool2d, F.avg_pool3d), nd, n)
    if begins == ends and all(p <= k // 2 for p, k in zip(begins, kernel)):
        return pool(x, kernel, strides, begins, ceil, include)
    pads = _torch_pad(begins, ends)
    y = pool(F.pad(x, pads), kernel, strides, 0, ceil, True)
    if include:
        return y
    # Exclude the padding from each window's count: divide by the pooled valid mask.
    ones = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype)
    return y / pool(F.pad(ones, pads), kernel, strides, 0, ceil, True)


def _flatten(n, x):
    axis = _axis(n.attr("axis", 1), x.ndim)
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


def _reshape(n, x, shape):
    shape = _ints(shape)
    if not n.attr("allowzero", 0):  # 0 copies the input's dim unless allowzero=1
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _transpose(n, x):
    perm = n.attr("perm")
    return x.permute(list(perm) if perm is not None else list(range(x.ndim))[::-1])


def _squeeze(n, x, axes=None):
    axes = _opt_axes(n, axes)
    if not axes:
        return torch.squeeze(x)
    return torch.squeeze(x, tuple(_axis(a, x.ndim) for a in axes))


def _unsqueeze(n, x, axes=None):
    axes = _opt_axes(n, axes)
    rank = x.ndim + len(axes)
    for a in sorted(_axis(a, rank) for a in axes):
        x = x.unsqueeze(a)
    return x


def _concat(n, *xs):
    return torch.cat(list(xs), n.attr("axis"))


def _split(n, x, split=None):
    axis = _axis(n.attr("axis", 0), x.ndim)
    dim = x.shape[axis]
    sizes = _ints(split) if split is not None else n.attr("split")
    if not sizes:
        parts = n.attr("num_outputs") or len(n.outputs)
        chunk = -(-dim // parts)  # opset 18: equal chunks, the last one smaller
        sizes = [min(chunk, dim - i * chunk) for i in range(parts)]
    return tuple(torch.split(x, list(sizes), axis))


def _slice(n, x, starts, ends, axes=None, steps=None):
    starts, ends = _ints(starts), _ints(ends)
    axes = _ints(axes) if axes is not None else list(range(len(starts)))
    steps = _ints(steps) if steps is not None else [1] * len(starts)
    for st, en, ax, sp in zip(starts, ends, axes, steps):
        ax = _axis(ax, x.ndim)
        dim = x.shape[ax]
        st, en = st + dim if st < 0 else st, en + dim if en < 0 else en
        if sp > 0:
            st, en = min(max(st, 0), dim), min(max(en, 0), dim)
        else:  # torch slicing has no negative steps: flip, then slice forwards
            st, en = min(max(st, 0), dim - 1), min(max(en, -1), dim - 1)
            x = x.flip(ax)
            st, en, sp = dim - 1 - st, dim - 1 - en, -sp
        if (st, en, sp) == (0, dim, 1):
            continue
        index = [slice(None)] * ax + [slice(st, max(st, en), sp)]
        x = x[tuple(index)]
    return x


def _gather(n, x, idx):
    axis = _axis(n.attr("axis", 0), x.ndim)
    dim = x.shape[axis]
    if isinstance(idx, int):  # a scalar constant index: a plain select
        return x.select(axis, idx + dim if idx < 0 else idx)
    if isinstance(idx, list):  # constant indices
        shape = np.shape(idx)
        flat = [i + dim if i < 0 else i for i in np.reshape(idx, -1).tolist()]
        if len(shape) == 1 and flat == list(range(flat[0], flat[0] + len(flat))):
            return x.narrow(axis, flat[0], len(flat))  # a contiguous run: a slice
        idx = torch.tensor(flat, dtype=torch.int64).reshape(shape)
    elif axis == 0 and x.ndim == 2 and x.dtype.is_floating_point:
        # A token lookup; like PyTorch it assumes non-negative ids.
        return F.embedding(idx, x)
    else:
        idx = torch.where(idx < 0, idx + dim, idx)
    picked = torch.index_select(x, axis, idx.reshape(-1))
    return picked.reshape(list(x.shape[:axis]) + list(idx.shape) + list(x.shape[axis + 1:]))


def _shape(n, x):
    rank = x.ndim
    start, end = n.attr("start", 0), n.attr("end", rank)
    start = min(max(_axis(start, rank), 0), rank)
    end = min(max(_axis(end, rank), 0), rank)
    return torch.tensor(list(x.shape)[start:end], dtype=torch.int64)


def _constant(n):
    for key in ("value", "value_float", "value_int", "value_floats", "value_ints"):
        if key in n.attrs:
            value = n.attrs[key]
            if isinstance(value, torch.Tensor):
                return value
            dtype = torch.float32 if "float" in key else torch.int64
            return torch.tensor(value, dtype=dtype)
    raise _unsupported(n, f"attribute {sorted(n.attrs)}")


def _constant_of_shape(n, shape):
    value = n.attr("value")
    if value is None:
        value = torch.zeros(1, dtype=torch.float32)
    return torch.full(_ints(shape), value.reshape(-1)[0].item(), dtype=value.dtype)


def _cast(n, x):
    to = n.attr("to")
    if to not in _DTYPES:
        raise _unsupported(n, f"Cast to ONNX type {to}")
    return x.to(_DTYPES[to])


def _dropout(n, x, ratio=None, training_mode=None):
    # Inference: the identity. The optional mask output is all ones.
    if len(n.outputs) > 1 and n.outputs[1]:
        return x, torch.ones_like(x, dtype=torch.bool)
    return x


def _expand(n, x, shape):
    target = torch.broadcast_shapes(tuple(x.shape), tuple(_ints(shape)))
    return x if tuple(target) == tuple(x.shape) else x.expand(target)


def _reduce(fn: Callable, axes_from_input_since: int) -> Callable:
    def handler(n, x, axes=None):
        axes = _opt_axes(n, axes if n.opset >= axes_from_input_since else None)
        keep = bool(n.attr("keepdims", 1))
        if not axes:
            if n.attr("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.ndim))
        return fn(x, [_axis(a, x.ndim) for a in axes], keep)
    return handler


def _mean(x, dims, keep):
    if x.dtype.is_floating_point:
        return x.mean(dim=dims, keepdim=keep)
    return x.double().mean(dim=dims, keepdim=keep).to(x.dtype)


def _prod(x, dims, keep):
    for d in sorted(dims, reverse=True):
        x = x.prod(dim=d, keepdim=keep)
    return x


def _range(n, start, limit, delta):
    dtype = start.dtype if isinstance(start, torch.Tensor) else torch.int64
    return torch.arange(_num(start), _num(limit), _num(delta), dtype=dtype)


def _tile(n, x, repeats):
    return x.repeat(_ints(repeats))


def _pad(n, x, pads, value=None, axes=None):
    pads = _ints(pads)
    axes = [_axis(a, x.ndim) for a in _ints(axes)] if axes is not None else list(range(x.ndim))
    k = len(axes)
    begins, ends = [0] * x.ndim, [0] * x.ndim
    for i, a in enumerate(axes):
        begins[a], ends[a] = pads[i], pads[i + k]
    first = next((i for i in range(x.ndim) if begins[i] or ends[i]), x.ndim)
    mode = n.attr("mode", "constant")
    if mode == "constant":
        spec = _torch_pad(begins[first:], ends[first:])
        return F.pad(x, spec, value=_num(value) if value is not None else 0)
    # torch pads reflect/edge/wrap over the last 1-3 dims, counted per input rank.
    torch_mode = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}.get(mode)
    dims = next((d for d in {2: (1,), 3: (1, 2), 4: (2, 3), 5: (3,)}.get(x.ndim, ())
                 if d >= x.ndim - first), None)
    if torch_mode is None or dims is None or min(pads) < 0:
        raise _unsupported(n, f"mode={mode!r} on these axes")
    return F.pad(x, _torch_pad(begins[-dims:], ends[-dims:]), mode=torch_mode)


def _resize(n, x, roi=None, scales=None, sizes=None):
    mode = n.attr("mode", "nearest")
    coord = n.attr("coordinate_transformation_mode", "half_pixel")
    if n.attr("antialias", 0) or n.attr("keep_aspect_ratio_policy", "stretch") != "stretch":
        raise _unsupported(n, "antialias/keep_aspect_ratio_policy")
    axes = [_axis(a, x.ndim) for a in n.attr("axes", range(x.ndim))]
    scale = [1.0] * x.ndim
    out = list(x.shape)
    scales = scales.tolist() if isinstance(scales, torch.Tensor) else scales
    given_scales = bool(scales)  # an empty scales input means "use sizes"
    if given_scales:
        for a, s in zip(axes, scales):
            scale[a], out[a] = float(s), int(math.floor(x.shape[a] * s))
    elif sizes is not None:
        for a, s in zip(axes, _ints(sizes)):
            out[a], scale[a] = s, s / x.shape[a]
    else:
        raise _unsupported(n, "neither scales nor sizes")
    if mode == "nearest":
        return _resize_nearest(n, x, coord, scale, out)
    if mode != "linear":
        raise _unsupported(n, f"mode={mode!r}")
    spatial = range(2, x.ndim)
    if any(out[a] != x.shape[a] for a in (0, 1)) or not 1 <= x.ndim - 2 <= 3:
        raise _unsupported(n, "linear resizing of the batch/channel axes")
    if coord == "align_corners":
        align = True
    elif coord == "half_pixel" or (coord == "pytorch_half_pixel" and
                                   all(out[a] > 1 for a in spatial)):
        align = False
    else:
        raise _unsupported(n, f"linear mode with coordinate_transformation_mode={coord!r}")
    torch_mode = ("linear", "bilinear", "trilinear")[x.ndim - 3]
    if given_scales and not align:  # ONNX maps coordinates with the given scale
        return F.interpolate(x, scale_factor=[scale[a] for a in spatial], mode=torch_mode,
                             align_corners=False)
    return F.interpolate(x, size=[out[a] for a in spatial], mode=torch_mode,
                         align_corners=align)


def _resize_nearest(n, x, coord, scale, out):
    nearest = n.attr("nearest_mode", "round_prefer_floor")
    spatial = list(range(2, x.ndim))
    if all(out[a] == x.shape[a] for a in (0, 1)) and 1 <= len(spatial) <= 3:
        # The two ONNX variants F.interpolate computes natively.
        if coord == "asymmetric" and nearest == "floor":
            return F.interpolate(x, size=[out[a] for a in spatial], mode="nearest")
        if coord in ("half_pixel", "pytorch_half_pixel") and nearest == "round_prefer_ceil" \
                and all(out[a] > 1 for a in spatial):
            return F.interpolate(x, size=[out[a] for a in spatial], mode="nearest-exact")
    # Anything else: precompute source indices per axis, then gather.
    for a in range(x.ndim):
        if out[a] == x.shape[a] and scale[a] == 1.0:
            continue
        idx = [_nearest_src(i, x.shape[a], out[a], scale[a], coord, nearest, n)
               for i in range(out[a])]
        x = torch.index_select(x, a, torch.tensor(idx, dtype=torch.int64))
    return x


def _nearest_src(i: int, size: int, out: int, scale: float, coord: str, nearest: str,
                 n: _Step) -> int:
    if coord == "asymmetric":
        src = i / scale
    elif coord == "half_pixel":
        src = (i + 0.5) / scale - 0.5
    elif coord == "pytorch_half_pixel":
        src = (i + 0.5) / scale - 0.5 if out > 1 else 0.0
    elif coord == "align_corners":
        src = i * (size - 1) / (out - 1) if out > 1 else 0.0
    elif coord == "tf_half_pixel_for_nn":
        src = (i + 0.5) / scale
    else:
        raise _unsupported(n, f"coordinate_transformation_mode={coord!r}")
    rounders = {"floor": math.floor, "ceil": math.ceil,
                "round_prefer_floor": lambda v: math.ceil(v - 0.5),
                "round_prefer_ceil": lambda v: math.floor(v + 0.5)}
    if nearest not in rounders:
        raise _unsupported(n, f"nearest_mode={nearest!r}")
    return min(max(int(rounders[nearest](src)), 0), size - 1)


def _cumsum(n, x, axis):
    axis = _axis(_ints(axis)[0], x.ndim)
    if n.attr("reverse", 0):
        x = x.flip(axis)
    y = torch.cumsum(x, axis)
    if n.attr("exclusive", 0):  # shift by one: [0, x0, x0+x1, ...]
        y = torch.cat([torch.zeros_like(y.narrow(axis, 0, 1)),
                       y.narrow(axis, 0, y.shape[axis] - 1)], axis)
    return y.flip(axis) if n.attr("reverse", 0) else y


def _trilu(n, x, k=None):
    k = _ints(k)[0] if k is not None else 0
    return torch.triu(x, k) if n.attr("upper", 1) else torch.tril(x, k)


def _variadic(fn: Callable) -> Callable:
    def handler(n, *xs):
        return functools.reduce(fn, xs)
    return handler


def _mean_of(n, *xs):
    return functools.reduce(torch.add, xs) / len(xs)


def _arg(fn: Callable) -> Callable:
    def handler(n, x):
        axis = _axis(n.attr("axis", 0), x.ndim)
        keep = bool(n.attr("keepdims", 1))
        if n.attr("select_last_index", 0):
            return x.shape[axis] - 1 - fn(x.flip(axis), axis, keep)
        return fn(x, axis, keep)
    return handler


def _unary(fn: Callable) -> Callable:
    return lambda n, x: fn(x)


def _binary(fn: Callable) -> Callable:
    return lambda n, a, b: fn(a, b)


HANDLERS: dict[str, Callable] = {
    "Conv": _conv, "ConvTranspose": _conv_transpose, "Gemm": _gemm,
    "MatMul": _binary(torch.matmul),
    "Add": _binary(lambda a, b: a + b), "Sub": _binary(lambda a, b: a - b),
    "Mul": _binary(lambda a, b: a * b), "Div": _div, "Pow": _pow, "Mod": _mod,
    "Sqrt": _unary(torch.sqrt), "Exp": _unary(torch.exp), "Log": _unary(torch.log),
    "Neg": _unary(torch.neg), "Abs": _unary(torch.abs),
    "Reciprocal": _unary(torch.reciprocal), "Floor": _unary(torch.floor),
    "Ceil": _unary(torch.ceil), "Round": _unary(torch.round), "Sign": _unary(torch.sign),
    "Sin": _unary(torch.sin), "Cos": _unary(torch.cos),
    "Relu": _unary(F.relu), "Sigmoid": _unary(torch.sigmoid), "Tanh": _unary(torch.tanh),
    "Erf": _unary(torch.erf), "Softplus": _unary(F.softplus),
    "Softsign": _unary(F.softsign), "Mish": _unary(F.mish),
    "LeakyRelu": lambda n, x: F.leaky_relu(x, n.attr("alpha", 0.01)),
    "Elu": lambda n, x: F.elu(x, n.attr("alpha", 1.0)),
    "Gelu": lambda n, x: F.gelu(x, approximate=n.attr("approximate", "none")),
    "HardSigmoid": _hard_sigmoid, "HardSwish": _unary(F.hardswish), "PRelu": _prelu,
    "Clip": _clip,
    "Softmax": _softmax_fn(F.softmax), "LogSoftmax": _softmax_fn(F.log_softmax),
    "BatchNormalization": _batch_norm, "LayerNormalization": _layer_norm,
    "InstanceNormalization": _instance_norm,
    "MaxPool": _max_pool, "AveragePool": _avg_pool,
    "GlobalAveragePool": lambda n, x: x.mean(dim=tuple(range(2, x.ndim)), keepdim=True),
    "GlobalMaxPool": lambda n, x: x.amax(dim=tuple(range(2, x.ndim)), keepdim=True),
    "Flatten": _flatten, "Reshape": _reshape, "Transpose": _transpose,
    "Squeeze": _squeeze, "Unsqueeze": _unsqueeze, "Concat": _concat, "Split": _split,
    "Slice": _slice, "Gather": _gather, "Shape": _shape,
    "Size": lambda n, x: torch.tensor(x.numel(), dtype=torch.int64),
    "Constant": _constant, "ConstantOfShape": _constant_of_shape, "Cast": _cast,
    "CastLike": lambda n, x, like: x.to(like.dtype),
    "Identity": _unary(lambda x: x), "Dropout": _dropout, "Expand": _expand,
    "Where": lambda n, c, a, b: torch.where(c, a, b),
    "Equal": _binary(torch.eq), "Less": _binary(torch.lt), "Greater": _binary(torch.gt),
    "LessOrEqual": _binary(torch.le), "GreaterOrEqual": _binary(torch.ge),
    "Not": _unary(torch.logical_not), "And": _binary(torch.logical_and),
    "Or": _binary(torch.logical_or), "Xor": _binary(torch.logical_xor),
    "ReduceMean": _reduce(_mean, 18), "ReduceSum": _reduce(
        lambda x, d, k: x.sum(dim=d, keepdim=k).to(x.dtype), 13),
    "ReduceMax": _reduce(lambda x, d, k: x.amax(dim=d, keepdim=k), 18),
    "ReduceMin": _reduce(lambda x, d, k: x.amin(dim=d, keepdim=k), 18),
    "ReduceProd": _reduce(_prod, 18),
    "ArgMax": _arg(torch.argmax), "ArgMin": _arg(torch.argmin),
    "Range": _range, "Tile": _tile, "Pad": _pad, "Resize": _resize,
    "Einsum": lambda n, *xs: torch.einsum(n.attr("equation"), *xs),
    "CumSum": _cumsum, "Trilu": _trilu,
    "Min": _variadic(torch.minimum), "Max": _variadic(torch.maximum),
    "Sum": _variadic(torch.add), "Mean": _mean_of,
}
SUPPORTED_OPS: tuple[str, ...] = tuple(sorted(HANDLERS))

# How each input reaches a handler in forward (default: a tensor).
#   "static": must be known at import time; passed as a Python list/number.
#   "scalar": a one-element constant that does not change the result's shape or type
#             is passed as a Python number; otherwise a tensor.
#   "index":  a constant Gather index is passed as a Python int / nested list.
_STATIC = {
    "Reshape": {1}, "Unsqueeze": {1}, "Squeeze": {1}, "Slice": {1, 2, 3, 4},
    "Expand": {1}, "Tile": {1}, "Pad": {1, 2, 3}, "Split": {1}, "ReduceMean": {1},
    "ReduceSum": {1}, "ReduceMax": {1}, "ReduceMin": {1}, "ReduceProd": {1},
    "CumSum": {1}, "Trilu": {1}, "Resize": {1, 2, 3}, "ConstantOfShape": {0},
    "Range": {0, 1, 2}, "Dropout": {1, 2},
}
_SCALAR = {
    "Add": {0, 1}, "Mul": {0, 1}, "Sub": {1}, "Div": {1}, "Pow": {1}, "Mod": {1},
    "Where": {1, 2}, "Equal": {1}, "Less": {1}, "Greater": {1}, "LessOrEqual": {1},
    "GreaterOrEqual": {1}, "Clip": {1, 2},
}
# Readable parameter names for well-known weight positions.
_ROLES = {
    "Conv": (None, "weight", "bias"), "ConvTranspose": (None, "weight", "bias"),
    "Gemm": (None, "weight", "bias"), "MatMul": (None, "weight"), "PRelu": (None, "weight"),
    "BatchNormalization": (None, "weight", "bias", "running_mean", "running_var"),
    "LayerNormalization": (None, "weight", "bias"),
    "InstanceNormalization": (None, "weight", "bias"), "Gather": ("weight", None),
}


# ============================================================================ loading
def onnx_to_module(path: str | Path, *, input_shapes: dict[str, Sequence[int]]
                   | Sequence[Sequence[int]] | None = None,
                   seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Load an ONNX file and return an eval-mode nn.Module computing the same function,
    plus example inputs (random, seeded, of the graph's input shapes/dtypes).

    ``input_shapes`` fixes dynamic input dimensions: ``{input_name: shape}`` or one shape
    per graph input, in order. Raises ``InputError`` for anything the user must fix.
    """
    path = Path(path)
    model = _load(path)
    graph = model.graph
    _check_ops(path, model)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < _MIN_OPSET:
        raise InputError(f"{path.name} uses ONNX opset {opset}; opset {_MIN_OPSET} or newer "
                         "is needed",
                         "upgrade it with onnx.version_converter.convert_version(model, 17)")
    initializers = {t.name: _tensor(t, path) for t in graph.initializer}
    specs = _input_specs(path, graph, initializers, input_shapes)
    gen = torch.Generator().manual_seed(seed)
    example = tuple(spec.random(gen) for spec in specs)
    try:
        module = _Planner(path, graph, opset, initializers, specs).build(example)
    except InputError as exc:
        problem = _checker_problem(model)
        if problem:  # a malformed file: report the root cause
            raise InputError(f"{path.name} is not a valid ONNX model: {problem}",
                             "re-export the model or repair it (onnx.checker.check_model)"
                             ) from exc
        raise
    return module.eval(), example


def _load(path: Path):
    import onnx
    from google.protobuf.message import DecodeError

    if not path.exists():
        raise InputError(f"ONNX file {str(path)!r} does not exist", "check the path")
    if not path.is_file():
        raise InputError(f"{str(path)!r} is not a file", "pass an .onnx model file")
    try:
        with open(path, "rb") as fh:
            head = fh.read(64)
    except OSError as exc:
        raise InputError(f"cannot read {str(path)!r}: {exc.strerror or exc}",
                         "check the file's permissions") from exc
    if head.startswith(b"PK\x03\x04"):
        raise InputError(f"{path.name} is a zip archive (a PyTorch .pt/.pt2 file?), not ONNX",
                         "give it its real extension (.pt2) or pass an .onnx file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, UnicodeDecodeError) as exc:
        # Every ONNX file starts with the ir_version field (byte 0x08).
        if head.startswith(b"\x08"):
            raise InputError(f"{path.name} is truncated or corrupt (the ONNX protobuf does not "
                             "parse)", "re-export the model, or check the copy/download "
                             "completed") from exc
        kind = "a text file" if _looks_like_text(head) else "unrecognised binary data"
        raise InputError(f"{path.name} is {kind}, not an ONNX model",
                         "pass a model saved with onnx.save or torch.onnx.export") from exc
    if not model.graph.node and not model.graph.output or model.ir_version <= 0:
        raise InputError(f"{path.name} is not an ONNX model (no graph found in the file)",
                         "pass a model saved with onnx.save or torch.onnx.export")
    try:  # weights stored next to the model (model.onnx.data)
        from onnx.external_data_helper import load_external_data_for_model
        load_external_data_for_model(model, str(path.parent))
    except (OSError, ValueError, onnx.checker.ValidationError) as exc:
        raise InputError(f"cannot read the external weight data of {path.name}: "
                         f"{_first_line(exc)}",
                         "keep the .data file(s) the model references next to it") from exc
    if model.functions:  # model-local functions: inline them so every node is an ONNX op
        import onnx.inliner
        model = onnx.inliner.inline_local_functions(model)
    return model


def _looks_like_text(head: bytes) -> bool:
    for cut in range(4):  # the 64-byte head may end inside a multi-byte character
        try:
            text = head[:len(head) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
        return all(c.isprintable() or c.isspace() for c in text)
    return False


def _check_ops(path: Path, model) -> None:
    """Scan the whole graph and report every unsupported op at once."""
    counts: Counter[str] = Counter()
    example: dict[str, str] = {}
    for i, node in enumerate(model.graph.node):
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
        if key not in HANDLERS:
            counts[key] += 1
            example.setdefault(key, node.name or f"node_{i}")
    if counts:
        listing = ", ".join(f"{op} ({c} node{'s' if c > 1 else ''}, e.g. {example[op]!r})"
                            for op, c in sorted(counts.items()))
        raise InputError(f"{path.name} uses {len(counts)} unsupported ONNX op type"
                         f"{'s' if len(counts) > 1 else ''}: {listing}",
                         f"{_PT2_HINT}; supported ops: {', '.join(SUPPORTED_OPS)}")


def _checker_problem(model) -> str | None:
    """onnx.checker's complaint, if any. It is stricter than ONNX Runtime (it wants every
    value's shape, for one), so a complaint only counts when the import fails too."""
    import onnx
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        return _first_line(exc)
    except ValueError:  # over 2 GB in memory: the checker cannot take it
        return None
    return None


def _tensor(t, path: Path) -> torch.Tensor:
    from onnx import numpy_helper

    if t.data_type not in _DTYPES:
        raise InputError(f"tensor {t.name!r} in {path.name} has ONNX type {t.data_type}, "
                         "which is not supported", _PT2_HINT)
    arr = numpy_helper.to_array(t)
    if t.data_type == 16:  # numpy has no bfloat16: reinterpret the bits
        return torch.from_numpy(np.ascontiguousarray(arr).view(np.uint16).copy()).view(
            torch.bfloat16)
    return torch.from_numpy(np.array(arr, copy=True))


def _input_specs(path: Path, graph, initializers: dict, input_shapes) -> list[InputSpec]:
    inputs = [v for v in graph.input if v.name not in initializers]
    names = [v.name for v in inputs]
    given: dict[str, tuple[int, ...]] = {}
    if isinstance(input_shapes, dict):
        unknown = sorted(set(input_shapes) - set(names))
        if unknown:
            raise InputError(f"{path.name} has no input named {', '.join(unknown)}",
                             f"its inputs are: {', '.join(names)}")
        given = {k: tuple(int(d) for d in v) for k, v in input_shapes.items()}
    elif input_shapes is not None:
        shapes = list(input_shapes)
        if len(shapes) != len(names):
            raise InputError(f"{path.name} has {len(names)} input(s) ({', '.join(names)}) but "
                             f"{len(shapes)} --input shape(s) were given",
                             "pass one --input per model input, in order")
        given = {n: tuple(int(d) for d in s) for n, s in zip(names, shapes)}

    high = _index_bounds(graph, initializers)
    specs = []
    for v in inputs:
        tt = v.type.tensor_type
        if not v.type.HasField("tensor_type") or tt.elem_type not in _DTYPES:
            raise InputError(f"input {v.name!r} of {path.name} is not a numeric tensor",
                             _PT2_HINT)
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim] \
            if tt.HasField("shape") else None
        shape = given.get(v.name)
        if shape is None:
            if dims is None or None in dims:
                shown = "x".join("?" if d is None else str(d) for d in dims or [])
                example = "x".join(str(d or 1) for d in dims or [1])
                raise InputError(f"input {v.name!r} of {path.name} has dynamic dimensions "
                                 f"({shown or 'unknown rank'})",
                                 "pass the input shapes with --input, one per model input in "
                                 f"order ({', '.join(names)}), e.g. --input {example}")
        elif dims is not None and (len(dims) != len(shape) or any(
                d is not None and d != s for d, s in zip(dims, shape))):
            fixed = "x".join("?" if d is None else str(d) for d in dims)
            raise InputError(f"input {v.name!r} of {path.name} has shape {fixed}; --input gave "
                             f"{'x'.join(map(str, shape))}",
                             "give a shape that matches the model's fixed dimensions")
        specs.append(InputSpec(v.name, tuple(shape if shape is not None else dims),
                               _DTYPES[tt.elem_type],
                               high.get(v.name)))
    return specs


def _index_bounds(graph, initializers: dict) -> dict[str, int]:
    """Integer inputs used directly as Gather indices are drawn below the table size."""
    bounds: dict[str, int] = {}
    for node in graph.node:
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[0] in initializers:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            size = int(initializers[node.input[0]].shape[axis])
            bounds[node.input[1]] = min(size, bounds.get(node.input[1], size))
    return bounds


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


# ============================================================================ naming
_NAME_SCOPES = "pkg.torch.onnx.name_scopes"
_FUSED_BY = "pkg.onnxscript.rewriter.rule_name"


def _meta_scope(node) -> list[str] | None:
    """The innermost module the dynamo exporter recorded for a node, if any."""
    props = {p.key: p.value for p in node.metadata_props}
    if _NAME_SCOPES not in props:
        return None
    try:
        scopes = ast.literal_eval(props[_NAME_SCOPES])
    except (ValueError, SyntaxError):
        return None
    # ['', 'layers.0', 'layers.0.attn', 'matmul']: the last entry is the op itself.
    return [p for p in str(scopes[-2]).split(".") if p] if len(scopes) >= 3 else []


def _name_scope(name: str, index: int) -> list[str]:
    """The module path of a node from its name alone (rules 2-4)."""
    if not name:
        return [f"node_{index}"]
    if "/" not in name:
        return [p for p in name.split(".") if p]
    parts: list[str] = []
    for comp in name.strip("/").split("/")[:-1]:
        if parts and comp.startswith(parts[-1] + "."):
            parts[-1] = comp  # "features" then "features.0": the child repeats its parent
        elif comp:
            parts.append(comp)
    return [p for part in parts for p in part.split(".") if p]


def _raw_scopes(nodes: list[tuple[int, Any]], params: set[str]) -> dict[int, list[str]]:
    """Raw module-path components for every node (see the module docstring)."""
    meta = {i: _meta_scope(node) for i, node in nodes}
    if all(m is None for m in meta.values()):
        return {i: _name_scope(node.name, i) for i, node in nodes}
    # A dynamo export. A node an optimizer rule fused (Conv+BatchNorm) is recorded in
    # the last fused op's module; its weight's PyTorch name says which layer it is.
    for i, node in nodes:
        if any(p.key == _FUSED_BY for p in node.metadata_props):
            weight = next((x for x in node.input if x in params and x.endswith(".weight")), None)
            if weight:
                meta[i] = weight.split(".")[:-1]
    # Nodes an optimizer created without metadata join their nearest consumer's module
    # (``qkv(x).split()`` runs in attn), else their producer's.
    producer = {o: i for i, node in nodes for o in node.output}
    consumers: dict[int, list[int]] = {}
    for i, node in nodes:
        for x in node.input:
            if x in producer:
                consumers.setdefault(producer[x], []).append(i)
    by_index = dict(nodes)
    for i, node in nodes:
        if meta[i] is not None:
            continue
        frontier, seen, found = list(consumers.get(i, [])), set(), None
        while frontier and found is None:
            j = frontier.pop(0)
            if j in seen:
                continue
            seen.add(j)
            found = meta[j]
            frontier += consumers.get(j, [])
        if found is None:
            found = next((meta[producer[x]] for x in by_index[i].input
                          if x in producer and meta[producer[x]] is not None), None)
        meta[i] = found if found is not None else _name_scope(node.name, i)
    return meta


def _clean(comp: str) -> str:
    comp = re.sub(r"[^0-9A-Za-z_]", "_", comp) or "_"
    while hasattr(OnnxModule, comp) or hasattr(OnnxScope, comp):
        comp += "_"  # "forward", "training", "eval" … are nn.Module attributes
    return comp


class _ScopeNames:
    """Raw ONNX scopes -> unique, valid dotted module paths."""

    def __init__(self):
        self._paths: dict[tuple[str, ...], str] = {}
        self._owner: dict[str, tuple[str, ...]] = {}

    def path(self, raw: list[str]) -> str:
        key = tuple(raw)
        if key in self._paths:
            return self._paths[key]
        parent = self.path(raw[:-1]) if len(raw) > 1 else ""
        base = _clean(raw[-1]) if raw else ""
        leaf, i = base, 0
        while f"{parent}.{leaf}".lstrip(".") in self._owner:
            i += 1
            leaf = f"{base}_{i}"
        path = f"{parent}.{leaf}".lstrip(".")
        self._paths[key], self._owner[path] = path, key
        return path


def _attr_tail(value_name: str) -> str:
    tail = value_name.rsplit("/", 1)[-1].replace("onnx::", "")
    m = re.match(r"(.+)_output_(\d+)$", tail)
    if m:
        tail = m[1] if m[2] == "0" else f"{m[1]}_{m[2]}"
    return tail


# ============================================================================ planning
class _Planner:
    """Runs the graph once eagerly to fold static values and lay out the module."""

    def __init__(self, path: Path, graph, opset: int, initializers: dict,
                 specs: list[InputSpec]):
        self.path, self.graph, self.opset = path, graph, opset
        self.params_src = {k: v for k, v in initializers.items() if v.is_floating_point()}
        self.static: dict[str, torch.Tensor] = {
            k: v for k, v in initializers.items() if not v.is_floating_point()}
        self.specs = specs
        self.runtime: dict[str, torch.Tensor] = {}
        self.root = OnnxModule([], [], [])
        self.names = _ScopeNames()
        self.shared: set[str] = set()  # float initializers already placed on a module
        self.attr_of: dict[tuple[str, str], str] = {}  # (scope, value) -> attribute name

    # ------------------------------------------------------------------ driver
    def build(self, example: tuple[torch.Tensor, ...]) -> OnnxModule:
        input_names = [s.name for s in self.specs]
        self.runtime.update(zip(input_names, example))
        nodes = self._toposort()
        self.raw_scopes = _raw_scopes(nodes, set(self.params_src))
        used = {i for _, node in nodes for i in node.input if i}
        used |= {o.name for o in self.graph.output}
        steps = []
        with torch.no_grad():
            for index, node in nodes:
                step = self._plan_node(index, node, used)
                if step is not None:
                    steps.append(step)
        outputs = [self._output_source(o.name) for o in self.graph.output]
        self.root._input_names = input_names
        self.root._steps = steps
        self.root._outputs = outputs
        arg_names = _arg_names(input_names)
        return _with_signature(self.root, arg_names)

    def _toposort(self) -> list[tuple[int, Any]]:
        """Nodes in dependency order (ONNX requires it; tolerate files that don't)."""
        known = set(self.params_src) | set(self.static) | set(self.runtime) | {""}
        pending = list(enumerate(self.graph.node))
        ordered = []
        while pending:
            rest = []
            for index, node in pending:
                if all(i in known for i in node.input):
                    ordered.append((index, node))
                    known.update(node.output)
                else:
                    rest.append((index, node))
            if len(rest) == len(pending):
                index, node = rest[0]
                missing = next(i for i in node.input if i not in known)
                raise InputError(f"{self.path.name}: node {node.name or f'node_{index}'!r} "
                                 f"reads {missing!r}, which nothing produces",
                                 "the graph is broken or has a cycle; re-export the model")
            pending = rest
        return ordered

    # ------------------------------------------------------------------ one node
    def _plan_node(self, index: int, node, used: set[str]) -> _Step | None:
        name = node.name or f"node_{index}"
        step = _Step(index, name, node.op_type, self._attrs(node), self.opset,
                     "", (), tuple(node.output))
        ins = list(node.input)
        if node.op_type == "Identity" and ins[0] in self.params_src:
            # Exporters alias deduplicated weights through Identity: give the alias its
            # own parameter so each layer keeps its own weight.
            self.params_src[node.output[0]] = self.params_src[ins[0]].clone()
            return None
        if node.op_type in ("Shape", "Size") or all(
                not i or i in self.static for i in ins):
            args = [self._value(i) if i else None for i in ins]
            outs = self._call(step, args)
            self.static.update((o, t) for o, t in zip(node.output, outs) if o)
            return None

        step.scope = self.names.path(self.raw_scopes[index])
        owner = self._module(step.scope)
        decided = [self._decide(step, pos, inp, ins) for pos, inp in enumerate(ins)]
        # Run the node eagerly with exactly the kinds of arguments forward will pass.
        outs = self._call(step, [value for _, value in decided])
        for pos, out in enumerate(node.output):
            if out and out in used and pos >= len(outs):
                raise _unsupported(step, f"output #{pos}")
        step.sources = tuple(
            ("attr", self._register(step, owner, pos, inp, value)) if kind == "attr"
            else (kind, inp if kind == "env" else value)
            for pos, (inp, (kind, value)) in enumerate(zip(ins, decided)))
        self.runtime.update((o, t) for o, t in zip(node.output, outs) if o)
        return step

    def _decide(self, step: _Step, pos: int, inp: str, ins: list[str]) -> tuple[str, Any]:
        """How input ``pos`` reaches the handler: (kind, value) with kind one of
        "none", "env" (runtime tensor), "py" (Python constant), "attr" (weight)."""
        if not inp:
            return "none", None
        value = self._value(inp)
        if pos in _STATIC.get(step.op_type, ()):
            if inp in self.runtime:
                raise InputError(
                    f"ONNX node {step.name!r} ({step.op_type}) takes input #{pos} ({inp!r}) "
                    "as a shape/axes argument computed from the model inputs at run time; "
                    "only statically known values are supported", _PT2_HINT)
            return "py", value.tolist()
        if inp in self.runtime:
            return "env", value
        if step.op_type == "Gather" and pos == 1:
            return "py", value.tolist()
        if self._py_scalar(step, pos, value, ins):
            return "py", value.reshape(-1)[0].item()
        return "attr", value

    def _value(self, name: str) -> torch.Tensor:
        for table in (self.runtime, self.static, self.params_src):
            if name in table:
                return table[name]
        raise KeyError(name)

    def _py_scalar(self, step: _Step, pos: int, value: torch.Tensor, ins: list[str]) -> bool:
        """Pass a one-element constant as a Python number when that cannot change the
        result's shape or dtype: a runtime operand already has both."""
        if pos not in _SCALAR.get(step.op_type, ()) or value.numel() != 1:
            return False
        if step.op_type == "Clip":
            return True
        values = [self._value(i) for i in ins if i]
        out_shape = torch.broadcast_shapes(*[v.shape for v in values])
        peers = [self.runtime[i] for p, i in enumerate(ins) if p != pos and i in self.runtime]
        return any(p.shape == out_shape and (
            p.dtype == value.dtype or (step.op_type == "Pow" and p.dtype.is_floating_point))
            for p in peers)

    def _register(self, step: _Step, owner: nn.Module, pos: int, inp: str,
                  val: torch.Tensor) -> str:
        """Put a weight (float initializer or a float constant in a weight slot) on the
        step's module as a parameter, any other constant (and BatchNorm statistics) as
        a buffer."""
        key = (step.scope, inp)
        if key in self.attr_of:
            return self.attr_of[key]
        name = self._attr_name(step, owner, pos, inp)
        roles = _ROLES.get(step.op_type, ())
        if inp not in self.params_src and val.is_floating_point() and pos < len(roles) \
                and roles[pos]:
            # A weight stored as a Constant node (or folded from one) is still a weight.
            self.params_src[inp] = val
        if inp in self.params_src:
            # Each module gets its own copy of a weight several modules read: exporters
            # deduplicate equal initializers (all-ones LayerNorm weights), and a pass
            # rewriting one layer must not change another.
            data = self.params_src[inp]
            if inp in self.shared:
                data = data.clone()
            self.shared.add(inp)
            if roles[pos:pos + 1] in (("running_mean",), ("running_var",)):
                owner.register_buffer(name, data)  # statistics are buffers, as in PyTorch
            else:
                owner.register_parameter(name, nn.Parameter(data, requires_grad=False))
        else:
            owner.register_buffer(name, val)
        self.attr_of[key] = name
        return name

    def _attr_name(self, step: _Step, owner: nn.Module, pos: int, inp: str) -> str:
        prefix = step.scope + "." if step.scope else ""
        roles = _ROLES.get(step.op_type, ())
        if prefix and inp.startswith(prefix):
            base = inp[len(prefix):]
        elif pos < len(roles) and roles[pos]:
            base = roles[pos]
        else:
            base = _attr_tail(inp)
        base = re.sub(r"[^0-9A-Za-z_]", "_", base) or "const"
        if base[0].isdigit():
            base = "c" + base
        name, i = base, 0
        while hasattr(owner, name):
            i += 1
            name = f"{base}_{i}"
        return name

    def _module(self, path: str) -> nn.Module:
        module: nn.Module = self.root
        for part in path.split(".") if path else []:
            child = module._modules.get(part)
            if child is None:
                child = OnnxScope()
                module.add_module(part, child)
            module = child
        return module

    def _output_source(self, name: str) -> tuple:
        if name in self.runtime:
            return ("env", name)
        fake = _Step(-1, "output", "Identity", {}, self.opset, "", (), ())
        return ("attr", self._register(fake, self.root, 0, name, self._value(name)))

    def _call(self, step: _Step, args: list) -> tuple:
        while args and args[-1] is None:  # trailing omitted optional inputs
            args.pop()
        try:
            out = HANDLERS[step.op_type](step, *args)
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"cannot import ONNX node {step.name!r} ({step.op_type}) of "
                             f"{self.path.name}: {_first_line(exc)}", _PT2_HINT) from exc
        return out if isinstance(out, tuple) else (out,)

    def _attrs(self, node) -> dict[str, Any]:
        from onnx import AttributeProto, helper

        attrs = {}
        for a in node.attribute:
            if a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS,
                          AttributeProto.SPARSE_TENSOR, AttributeProto.SPARSE_TENSORS):
                raise _unsupported(_Step(0, node.name, node.op_type, {}, 0, "", (), ()),
                                   f"attribute {a.name!r} of type {a.type}")
            value = helper.get_attribute_value(a)
            if a.type == AttributeProto.FLOAT:  # float32 attrs: shortest repr (1e-05)
                value = float(str(np.float32(value)))
            elif a.type == AttributeProto.FLOATS:
                value = [float(str(np.float32(v))) for v in value]
            elif a.type == AttributeProto.TENSOR:
                value = _tensor(value, self.path)
            elif isinstance(value, bytes):
                value = value.decode()
            elif isinstance(value, list) and value and isinstance(value[0], bytes):
                value = [v.decode() for v in value]
            attrs[a.name] = value
        return attrs


def _arg_names(names: list[str]) -> list[str]:
    """ONNX input names as unique Python identifiers (``input.1`` -> ``input_1``)."""
    out: list[str] = []
    for name in names:
        ident = re.sub(r"[^0-9A-Za-z_]", "_", name) or "input"
        if ident[0].isdigit() or ident in ("self",) or not ident.isidentifier() \
                or __import__("keyword").iskeyword(ident):
            ident = "input_" + ident
        base, i = ident, 0
        while ident in out:
            i += 1
            ident = f"{base}_{i}"
        out.append(ident)
    return out
