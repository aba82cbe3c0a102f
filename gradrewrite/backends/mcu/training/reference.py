"""The integer reference of an int8 training step: what the generated C must compute,
bit for bit, written in numpy/torch.

It runs the step's device form (``device_form.device_form``) with

- every int8 layer in integer arithmetic (``int8.run_layer``, as the inference check);
- every fp32 reduction (``kernels/gr_train_s8.c``, ``gr_train.c``, ``gr_reduce_f32``)
  as the C loop runs it: one float32 accumulator per output, the terms added in the
  kernel's order, each product rounded to float32 (the builds use -ffp-contract=off);
- exp/log as ``gr_expf`` / ``gr_logf``, the same float32 operations;
- a float classifier head (``float_head.py``) in the float kernels' order, its weight and
  bias updated as ``gr_sgd_f32`` does (w - lr * g, each operation rounded to float32);
- elementwise ops and data movement through torch (one IEEE operation per element:
  the same bits);
- the integer updates: delta = lr * (g * f[row]), w += rint(-delta) (ties to even) or
  floor(-delta + u) with u from the xorshift32 stream of ``gr_sgd_s8`` / ``gr_sgd_s32``,
  saturated.

``reference_steps`` returns the loss of each step and the trained parameters in their
storage form (int8 / int32 / float32), comparable with what the device reads back.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from ....errors import VerificationError
from ....rewrite.graph import Graph
from ....rewrite import int8_layers as int8
from .codegen import rng_seed
from .device_form import bias_bound, bounded_layers, device_form, linear_bwd_input, linear_bwd_weight
from .float_head import float_linear
from .host import run_train_host
from .lowering.patterns import param_attr, update_chain, update_factor

aten = torch.ops.aten
F32 = np.float32


# ------------------------------------------------------------------ exp / log as gr_expf / gr_logf
def gr_expf(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, F32)
    with np.errstate(over="ignore", invalid="ignore"):
        k = np.floor(x * F32(float.fromhex("0x1.715476p+0")) + F32(0.5))
        r = (x - k * F32(float.fromhex("0x1.62e4p-1"))) - k * F32(float.fromhex("0x1.7f7d1cp-20"))
        p = F32(float.fromhex("0x1.6c16c2p-10"))
        for c in ("0x1.111112p-7", "0x1.555556p-5", "0x1.555556p-3", "0x1p-1", "0x1p+0", "0x1p+0"):
            p = p * r + F32(float.fromhex(c))
        y = np.ldexp(p, np.clip(k, -200, 200).astype(np.int32)).astype(F32)
    y = np.where(x > F32(88.0), F32(np.inf), y)
    return np.where(x < F32(-87.0), F32(0.0), y).astype(F32)


def gr_logf(x: np.ndarray) -> np.ndarray:
    m, e = np.frexp(np.asarray(x, F32))
    m = m.astype(F32)
    low = m < F32(float.fromhex("0x1.6a09e6p-1"))
    m = np.where(low, m * F32(2.0), m).astype(F32)
    e = np.where(low, e - 1, e).astype(F32)
    f = m - F32(1.0)
    s = f / (F32(2.0) + f)
    z = s * s
    p = F32(float.fromhex("0x1.c71c72p-3"))
    for c in ("0x1.24924ap-2", "0x1.99999ap-2", "0x1.555556p-1", "0x1p+1"):
        p = p * z + F32(float.fromhex(c))
    return (e * F32(float.fromhex("0x1.62e4p-1")) + (e * F32(float.fromhex("0x1.7f7d1cp-20")) + s * p)).astype(F32)


# ------------------------------------------------------------------ squeeze-excitation gates, as the kernels
GATES = {   # gr_sigmoid_tr_f32 (gr_expf), gr_sigmoid_bwd_f32, gr_hardsigmoid_bwd_f32; hardswish and
            # hardsigmoid themselves reach the step decomposed (add, clamp, mul, div; where)
    aten.sigmoid.default: lambda x: (F32(1.0) / (F32(1.0) + gr_expf(-x))).astype(F32),
    aten.sigmoid_backward.default: lambda g, y: ((g * (F32(1.0) - y)).astype(F32) * y).astype(F32),
    aten.hardsigmoid_backward.default: lambda g, x: np.where((x > F32(-3.0)) & (x < F32(3.0)),
                                                             g * (F32(1.0) / F32(6.0)), F32(0.0)).astype(F32),
}


# ------------------------------------------------------------------ fp32 reductions in the kernels' order
def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(F32)
    mx = x.max(axis=-1, keepdims=True)
    acc = np.zeros(x.shape[:-1], F32)
    for j in range(x.shape[-1]):
        acc = acc + gr_expf(x[..., j] - mx[..., 0])
    return ((x - mx) - gr_logf(acc)[..., None]).astype(F32)


def log_softmax_bwd(g: np.ndarray, logp: np.ndarray) -> np.ndarray:
    acc = np.zeros(g.shape[:-1], F32)
    for j in range(g.shape[-1]):
        acc = acc + g[..., j]
    return (g - gr_expf(logp) * acc[..., None]).astype(F32)


def nll(logp: np.ndarray, target: np.ndarray, ignore: int, mean: bool) -> tuple[np.ndarray, np.ndarray]:
    acc, tw = F32(0.0), F32(0.0)
    for i, t in enumerate(target):
        if t == ignore:
            continue
        acc = F32(acc - logp[i, t])
        tw = F32(tw + F32(1.0))
    return np.asarray(acc / tw if mean else acc, F32), np.asarray(tw, F32)


def nll_bwd(g: np.ndarray, target: np.ndarray, tw: np.ndarray, c: int, ignore: int, mean: bool) -> np.ndarray:
    d = F32(-g.reshape(-1)[0] / tw.reshape(-1)[0]) if mean else F32(-g.reshape(-1)[0])
    out = np.zeros((len(target), c), F32)
    for i, t in enumerate(target):
        if t != ignore:
            out[i, t] = d
    return out


def reduce(x: np.ndarray, dims: list[int], mean: bool) -> np.ndarray:
    """gr_reduce_f32: a sequential sum over the (adjacent) reduced axes."""
    dims = sorted(d % x.ndim for d in dims)
    outer, red = x.shape[:dims[0]], x.shape[dims[0]:dims[-1] + 1]
    inner = x.shape[dims[-1] + 1:]
    v = x.reshape(int(np.prod(outer, dtype=np.int64)), int(np.prod(red, dtype=np.int64)), -1)
    acc = np.zeros((v.shape[0], v.shape[2]), F32)
    for r in range(v.shape[1]):
        acc = acc + v[:, r, :]
    if mean:
        acc = acc / F32(v.shape[1])
    return acc.reshape(*outer, *inner).astype(F32)


def _masked_add(acc: np.ndarray, term: np.ndarray, valid) -> np.ndarray:
    return np.where(valid, acc + term, acc).astype(F32)


def conv_bwd_input(gy: np.ndarray, w: np.ndarray, xshape, c: dict, o0: int = 0, o1: int | None = None,
                   gx: np.ndarray | None = None) -> np.ndarray:
    """gr_conv2d_bwd_input_ws8_f32: per input element, output channels of its group in
    order, then ky, kx; w is the float weight (int8 * scale) of filters o0..o1-1."""
    n, cin, h, wd = xshape
    oc_all, oh, ow = gy.shape[1:]
    groups = c["groups"]
    cpg, opg = cin // groups, oc_all // groups
    o1 = oc_all if o1 is None else o1
    kh, kw = w.shape[2:]
    (sh, sw), (ph, pw), (dh, dw) = c["stride"], c["padding"], c["dilation"]
    acc = np.zeros((n, groups, cpg, h, wd), F32) if gx is None else gx.reshape(n, groups, cpg, h, wd).copy()
    iy = np.arange(h)[:, None]
    ix = np.arange(wd)[None, :]
    for j in range(opg):
        ocs = np.arange(groups) * opg + j                       # this j-th channel of every group
        live = (ocs >= o0) & (ocs < o1)
        if not live.any():
            continue
        for ky in range(kh):
            ty = iy + ph - ky * dh
            oy = ty // sh
            vy = (ty >= 0) & (ty % sh == 0) & (oy < oh)
            for kx in range(kw):
                tx = ix + pw - kx * dw
                ox = tx // sw
                vx = (tx >= 0) & (tx % sw == 0) & (ox < ow)
                valid = vy & vx                                   # (h, w)
                oyc, oxc = np.clip(oy, 0, oh - 1), np.clip(ox, 0, ow - 1)
                g = gy[:, ocs][:, :, oyc, oxc]                    # (n, groups, h, w)
                wv = np.zeros((groups, cpg), F32)
                wv[live] = w[ocs[live] - o0, :, ky, kx]
                term = g[:, :, None] * wv[None, :, :, None, None]
                acc = _masked_add(acc, term, valid[None, None, None] & live[None, :, None, None, None])
    return acc.reshape(n, cin, h, wd)


def conv_bwd_weight(gy: np.ndarray, x: np.ndarray, wshape, c: dict, k: int) -> np.ndarray:
    """gr_conv2d_bwd_weight_xs8_f32: per weight, images, then oy, ox in order."""
    n, cin, h, wd = x.shape
    oh, ow = gy.shape[2:]
    groups = c["groups"]
    cpg, opg = cin // groups, wshape[0] // groups
    kh, kw = wshape[2:]
    (sh, sw), (ph, pw), (dh, dw) = c["stride"], c["padding"], c["dilation"]
    chan = (np.arange(k) // opg)[:, None] * cpg + np.arange(cpg)[None, :]   # input channel per (oc, ic)
    acc = np.zeros((k, cpg, kh, kw), F32)
    ky, kx = np.arange(kh)[:, None], np.arange(kw)[None, :]
    for b in range(n):
        for oy in range(oh):
            iy = oy * sh - ph + ky * dh
            for ox in range(ow):
                ix = ox * sw - pw + kx * dw
                valid = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < wd)      # (kh, kw)
                xv = x[b][chan][:, :, np.clip(iy, 0, h - 1), np.clip(ix, 0, wd - 1)]   # (k, cpg, kh, kw)
                term = gy[b, :k, oy, ox][:, None, None, None] * xv
                acc = _masked_add(acc, term, valid[None, None])
    return acc


def conv_bwd_bias(gy: np.ndarray, k: int) -> np.ndarray:
    acc = np.zeros(k, F32)
    v = gy[:, :k].reshape(gy.shape[0], k, -1)
    for b in range(v.shape[0]):
        for j in range(v.shape[2]):
            acc = acc + v[b, :, j]
    return acc


def lin_fwd(x: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    """gr_linear_tr_f32 (the float head): the bias (or 0), then each product in input order."""
    x = x.reshape(-1, w.shape[1])
    acc = np.zeros((x.shape[0], w.shape[0]), F32) if b is None else \
        np.broadcast_to(b.astype(F32), (x.shape[0], w.shape[0])).copy()
    for i in range(w.shape[1]):
        acc = acc + x[:, i:i + 1] * w[:, i][None, :]
    return acc


def lin_bwd_input(g: np.ndarray, w: np.ndarray) -> np.ndarray:
    acc = np.zeros((g.shape[0], w.shape[1]), F32)
    for o in range(w.shape[0]):
        acc = acc + g[:, o:o + 1] * w[o][None, :]
    return acc


def lin_bwd_weight(g: np.ndarray, x: np.ndarray) -> np.ndarray:
    acc = np.zeros((g.shape[1], x.shape[1]), F32)
    for r in range(g.shape[0]):
        acc = acc + g[r][:, None] * x[r][None, :]
    return acc


# ------------------------------------------------------------------ integer updates
class Rounding:
    """Stochastic rounding's u (w += floor(-delta + u)): gr_sgd_*'s xorshift32 draws in C order."""

    def __init__(self, mode: str, seed: int):
        self.mode, self.state = mode, rng_seed(seed)

    def offsets(self, n: int) -> np.ndarray:
        out, x = np.empty(n, F32), self.state
        for i in range(n):
            x ^= (x << 13) & 0xFFFFFFFF
            x ^= x >> 17
            x ^= (x << 5) & 0xFFFFFFFF
            out[i] = F32(x >> 8) * F32(2.0 ** -24)
        self.state = x
        return out


def int_update(w: np.ndarray, g: np.ndarray, f: np.ndarray, lr: float, lo: int, hi: int,
               rnd: Rounding) -> np.ndarray:
    rows = w.shape[0]
    gg = g.reshape(rows, -1).astype(F32)
    delta = F32(lr) * (gg * f.reshape(rows, 1))
    if rnd.mode == "stochastic":
        v = np.floor(-delta.reshape(-1) + rnd.offsets(delta.size)).astype(np.float64)
    else:  # nearbyintf: ties to even
        v = np.rint(-delta.reshape(-1)).astype(np.float64)
    v = np.where(np.isnan(v), 0, np.clip(v, -2.0 ** 32, 2.0 ** 32)).astype(np.int64)
    return np.clip(w.reshape(-1).astype(np.int64) + v, lo, hi).astype(w.dtype).reshape(w.shape)


# ------------------------------------------------------------------ the step
@dataclasses.dataclass
class _Layer:
    ql: int8.QLayer
    w_attr: str | None
    b_attr: str | None


def reference_steps(dgraph: Graph, x: np.ndarray, labels: np.ndarray, steps: int, lr: float,
                    *, rounding: str = "nearest", seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``steps`` int8 training steps on one batch -> (losses, {path: parameter as stored})."""
    ts = dgraph.meta["train_step"]
    trained = {info["attr"]: path for path, info in ts["params"].items() if info.get("trained")}
    wmap = dgraph.meta.get("int8_train", {}).get("weights", {})
    layers = {}
    state: dict[str, np.ndarray] = {}        # trained attr -> stored value (whole parameter)
    store: dict[str, tuple] = {}             # trained attr -> (lo, hi, storage factor)
    for head, ql in bounded_layers(int8.find(dgraph)).items():
        w_attr = b_attr = None
        if ql.kind in ("conv", "linear"):
            w_attr = wmap.get(str(ql.layer.args[1].args[0].target))
            b = ql.layer.args[2] if len(ql.layer.args) > 2 else None
            b_attr = str(b.target) if isinstance(b, fx.Node) else None
            if w_attr in trained:
                state[w_attr] = ql.weight.numpy().copy()
                store[w_attr] = (-127, 127, np.ones(ql.weight.shape[0]))
            if b_attr in trained:
                state[b_attr] = ql.bias_q.copy()
                store[b_attr] = (-bias_bound(ql), bias_bound(ql), 1.0 / (float(ql.x.args[1]) * ql.w_scales))
        layers[head] = _Layer(ql, w_attr, b_attr)
    for attr in trained:
        if attr not in state:
            state[attr] = dgraph.attr(attr).detach().float().numpy().copy()
    rnd = Rounding(rounding, seed)
    losses = []
    memo: dict[fx.Node, tuple] = {}  # frozen int8 layers: (inputs, output) of the last step
    for _ in range(steps):
        losses.append(_one_step(dgraph, layers, state, store, trained, x, labels, lr, rnd, memo))
    out = {}
    for attr, path in trained.items():
        rows = ts["params"][path].get("rows")
        v = state[attr]
        out[path] = v[:rows] if rows is not None and rows < v.shape[0] else v
    return np.asarray(losses, F32), out


def _frozen_layer(memo: dict, n: fx.Node, ql: int8.QLayer, inputs: list) -> torch.Tensor:
    """A frozen int8 layer's output; the same inputs as at the last step (the batch is the
    same, and every layer before the first trained one is frozen) give the same output."""
    last = memo.get(n)
    if last is not None and all(a is b or torch.equal(a, b) for a, b in zip(last[0], inputs)):
        return last[1]
    out = int8.run_layer(ql, *inputs)
    memo[n] = (inputs, out)
    return out


def _one_step(dgraph, layers, state, store, trained, x, labels, lr, rnd, memo) -> float:
    loss_name = dgraph.meta["train_step"]["loss"]
    env: dict[fx.Node, Any] = {}
    loss = None

    def a(v):
        return fx.node.map_arg(v, lambda n: env[n])

    def np32(t):
        return t.detach().numpy().astype(F32) if isinstance(t, torch.Tensor) else np.asarray(t, F32)

    phs = iter((torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(labels))))
    for n in dgraph.gm.graph.nodes:
        if n.op == "placeholder":
            env[n] = next(phs)
            continue
        if n.op == "get_attr":
            t = str(n.target)
            int32_bias = t in store and store[t][0] != -127  # the graph's float bias; its int32 goes to the layer
            env[n] = torch.from_numpy(state[t].astype(F32)) if t in state and not int32_bias else dgraph.attr(n).detach()
            continue
        if n.op == "output":
            break
        if n in layers:
            lay = layers[n]
            ql = lay.ql
            if lay.w_attr in state:
                ql = dataclasses.replace(ql, weight=torch.from_numpy(state[lay.w_attr]))
            if lay.b_attr in state:
                ql = dataclasses.replace(ql, bias_q=state[lay.b_attr])
            inputs = [env[i] for i in ql.inputs]
            env[n] = int8.run_layer(ql, *inputs) if lay.w_attr in state or lay.b_attr in state \
                else _frozen_layer(memo, n, ql, inputs)
            continue
        chain = update_chain(n)
        if chain is not None:
            w_node, g_node, factors, _, _ = chain
            attr = param_attr(w_node)
            g = np32(env[g_node])
            v = state[attr]
            rows = g.shape[0] if g.ndim else 1
            if attr in store:
                lo, hi, storage = store[attr]
                f = update_factor(dgraph, factors, storage, rows)
                v[:rows] = int_update(v[:rows], g, f, lr, lo, hi, rnd)
            else:
                v[:rows] = (v[:rows] - F32(lr) * g.reshape(v[:rows].shape)).astype(F32)
            env[n] = torch.from_numpy(v[:rows].astype(F32))
            continue
        tgt = n.target
        args = a(n.args)
        if tgt == aten._log_softmax.default:
            env[n] = torch.from_numpy(log_softmax(np32(args[0])))
        elif tgt == aten._log_softmax_backward_data.default:
            env[n] = torch.from_numpy(log_softmax_bwd(np32(args[0]), np32(args[1])))
        elif tgt == aten.nll_loss_forward.default:
            l_, tw = nll(np32(args[0]), args[1].numpy(), int(args[4]), int(args[3]) == 1)
            env[n] = (torch.from_numpy(l_), torch.from_numpy(tw))
        elif tgt == aten.nll_loss_backward.default:
            env[n] = torch.from_numpy(nll_bwd(np32(args[0]), args[2].numpy(), np32(args[6]),
                                              int(n.meta["val"].shape[1]), int(args[5]), int(args[4]) == 1))
        elif tgt in GATES:
            env[n] = torch.from_numpy(GATES[tgt](*(np32(v) for v in args)))
        elif tgt in (aten.mean.dim, aten.sum.dim_IntList):
            dims = list(args[1]) if args[1] else list(range(args[0].dim()))
            r = reduce(np32(args[0]), dims, tgt == aten.mean.dim)
            env[n] = torch.from_numpy(r).reshape(tuple(n.meta["val"].shape))
        elif tgt == aten.convolution_backward.default:
            env[n] = _conv_backward(n, args)
        elif tgt is float_linear:
            r = lin_fwd(np32(args[0]), np32(args[1]), None if args[2] is None else np32(args[2]))
            env[n] = torch.from_numpy(r).reshape(tuple(n.meta["val"].shape))
        elif tgt is linear_bwd_input:
            env[n] = torch.from_numpy(lin_bwd_input(np32(args[0]), np32(args[1])))
        elif tgt is linear_bwd_weight:
            env[n] = torch.from_numpy(lin_bwd_weight(np32(args[0]), np32(args[1])))
        else:
            with torch.no_grad():
                env[n] = tgt(*args, **a(n.kwargs))
        if n.name == loss_name:
            loss = float(env[n])
    return loss


def _conv_backward(n: fx.Node, args) -> tuple:
    gy = args[0].detach().numpy().astype(F32)
    x = args[1].detach().numpy().astype(F32)
    w = args[2].detach().numpy().astype(F32)
    c = {"stride": tuple(args[4]), "padding": tuple(args[5]), "dilation": tuple(args[6]), "groups": int(args[9])}
    mask = list(args[10])
    k = gy.shape[1]
    gx = torch.from_numpy(conv_bwd_input(gy, w, x.shape, c)) if mask[0] else None
    gw = torch.from_numpy(conv_bwd_weight(gy, x, w.shape, c, k)) if mask[1] else None
    gb = torch.from_numpy(conv_bwd_bias(gy, k)) if mask[2] else None
    return (gx, gw, gb)


def check_int8_step(graph: Graph, project, facts: dict[str, Any], *, steps: int = 2,
                    device: Graph | None = None) -> dict[str, Any]:
    """The host build of an int8 training step against ``reference_steps`` on a seeded
    batch: every loss and trained parameter bit for bit, or a VerificationError.
    ``device``: the step's device form when the caller has it (the lowering's; it is not
    changed by lowering), else made here."""
    x, labels = (t.numpy() for t in graph.random_inputs(11))
    losses, got = run_train_host(project, x, labels, steps, facts["lr"])
    ref_losses, ref = reference_steps(device if device is not None else device_form(graph), x, labels, steps,
                                      facts["lr"],
                                      rounding=facts.get("rounding", "nearest"), seed=facts.get("seed", 0))
    differ = {p: int(np.count_nonzero(got[p] != ref[p])) for p in ref}
    bad = {p: n for p, n in differ.items() if n}
    if bad or not np.array_equal(losses, ref_losses):
        detail = ", ".join(f"{p}: {n} values" for p, n in bad.items()) or "the losses"
        raise VerificationError(f"the int8 training step differs from the integer reference ({detail})",
                                "this is a code generator or kernel bug; compile with --backend torch meanwhile")
    return {"steps": steps, "bit_exact": True, "values": int(sum(v.size for v in ref.values())),
            "losses": [float(v) for v in losses]}
