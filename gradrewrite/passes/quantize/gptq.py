"""Error-compensating weight quantization (GPTQ / OBQ family) for ``quantize(method=gptq)``.

For a linear layer ``y = x W^T`` the layer's reconstruction loss over calibration inputs
``X`` is ``||X W^T - X Q^T||^2 = sum_rows (w - q) H (w - q)^T / 2`` with ``H = 2 X^T X / n``.
Columns (input features) are quantized one at a time; the rounding error of column ``j``
is spread over the columns not yet quantized with the row ``j`` of the upper Cholesky
factor ``U`` of ``H^-1`` (``H^-1 = U^T U``):

    err = (w_j - q_j) / U[j, j];   W[:, j+1:] -= err * U[j, j+1:]

which is the optimal (OBS) update of the remaining weights when column ``j`` is fixed.
Updates are applied lazily per block of ``block`` columns (same result, fewer passes
over W). ``damp`` adds ``damp * mean(diag H)`` to the diagonal (``damp="auto"``, the
pass's default, picks it per layer by cross-validation on the calibration samples:
``choose_damp``); inputs that are always 0 get ``H[j, j] = 1``.

Groups: without ``act_order`` a group's fp16 scale and zero point are computed when
its first column is reached, from the then-current (already error-updated) weights. With
``act_order`` columns are visited in decreasing ``diag(H)`` (``visiting_order``); by
default the groups keep the storage layout (``group`` consecutive input features,
MatMulNBits), so their scales and zero points are computed once, before any update, from
the original weights ("static groups"). ``act_groups=ordered`` makes the groups follow the
visiting order instead: the layer is quantized as the problem permuted by that order
(``permuted_problem``: ``W[:, p]``, ``H[p][:, p]``, groups of consecutive permuted
columns, parameters set as each group is reached), and reads its input permuted the same
way (``weight_only.permuted_input``), so the stored form is still plain consecutive groups.

Outliers (GWQ / SpQR-style): entries in the outlier mask are left out of the group ranges,
are not quantized (their rounding error is 0, so they push no error onto other columns)
and are stored in fp16 with the value they hold when their column is reached, i.e. they
keep absorbing the updates of earlier columns like any unquantized weight.

Storage is exactly ``weight_only.quantize_groupwise``'s: packed codes, fp16 scales, packed
zero points and fp16 sparse outliers, so every backend runs the result unchanged.

The Hessian of one layer at a time is summed from the layer's input on the calibration
samples (``HessianSums``), with the earlier layers already quantized: layers are processed
in graph order. Where those inputs come from (the whole graph run up to the layer,
``layer_hessian``, or one decoder layer at a time) is ``gptq_calibration.py``'s business.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence

import torch
import torch.fx as fx

from ...errors import PassError
from ...rewrite.calibration import progress as iterate
from ...rewrite.graph import Graph
from ...rewrite.quant_ops import GROUPWISE_LINEAR, groupwise_weight, pack_bits
from .outliers import store_outliers
from .weight_only import GroupwiseWeight, group_params


class _Reached(Exception):
    pass


class QuantizedRunner(fx.Interpreter):
    """Runs graph nodes with the already quantized layers as float linears: each
    ``groupwise_linear``'s weight is dequantized once (cached in ``weights``), not per sample."""

    def __init__(self, gm: fx.GraphModule, weights: dict | None = None):
        super().__init__(gm)
        self.weights = {} if weights is None else weights   # dequantized weights of quantized layers

    def call_function(self, target, args, kwargs):
        if target is GROUPWISE_LINEAR:
            key = id(args[1])
            if key not in self.weights:
                self.weights[key] = groupwise_weight(*args[1:4], *args[5:11])
            return torch.nn.functional.linear(args[0], self.weights[key].to(args[0].dtype), args[4])
        return super().call_function(target, args, kwargs)


class _UpTo(QuantizedRunner):
    """Runs the graph until ``node`` is computed, hands its value to ``fn`` and stops."""

    def __init__(self, gm: fx.GraphModule, node: fx.Node, fn, weights: dict | None = None):
        super().__init__(gm, weights)
        self.node, self.fn = node, fn

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        if n is self.node:
            self.fn(value)
            raise _Reached
        return value


class HessianSums:
    """``2 X^T X / n`` of one layer input from its values on the samples, in sample order:
    rows of X = every position of the last dimension (real tokens only, given a
    ``padding.PaddingRows``), summed in float64 for the whole set and for its two halves
    (even / odd sample index), which ``damp="auto"`` cross-validates on."""

    def __init__(self, padding=None):
        self.padding = padding
        self.sums: list = [None, None]
        self.rows = [0, 0]

    def add(self, index: int, v: torch.Tensor) -> None:
        x = (self.padding.rows(v.detach()) if self.padding else v.detach().reshape(-1, v.shape[-1])).double()
        part = index % 2
        if self.sums[part] is None:
            self.sums[part] = x.T @ x
        else:   # in place: one pass over the K x K sum, no temporary
            self.sums[part].addmm_(x.T, x)
        self.rows[part] += x.shape[0]

    def result(self, node: fx.Node) -> tuple[torch.Tensor, int, list[tuple[torch.Tensor, int]]]:
        """(H [K, K] float64, rows n, [(H, n) of each half])."""
        sums = self.sums
        if sums[0] is None:
            raise PassError(f"the graph never computed {node.name} on the calibration data",
                            "report this model", pass_name="quantize")
        if sums[1] is None:
            sums[1] = torch.zeros_like(sums[0])
        total = sums[0] + sums[1]
        n = self.rows[0] + self.rows[1]
        halves = [(2.0 * s / max(1, r), r) for s, r in zip(sums, self.rows)]
        return 2.0 * total / max(1, n), n, halves


def layer_hessian(graph: Graph, node: fx.Node, samples: Sequence[tuple], progress=None,
                  description: str = "", weights: dict | None = None,
                  padding=None) -> tuple[torch.Tensor, int, list[tuple[torch.Tensor, int]]]:
    """``HessianSums`` of the values ``node`` takes on ``samples``, the graph run from its
    inputs up to ``node`` once per sample (the whole-graph calibration)."""
    sums = HessianSums(padding)
    index = {"i": 0}
    runner = _UpTo(graph.gm, node, lambda v: sums.add(index["i"], v), weights)
    with torch.no_grad():
        for i, sample in enumerate(iterate(progress, description,
                                           padding.track(samples) if padding else samples)):
            index["i"] = i
            try:
                runner.run(*sample)
            except _Reached:
                pass
    return sums.result(node)


DAMP_CANDIDATES = (0.01, 0.03, 0.1, 0.3)
DAMP_ROWS = 128   # output rows the cross-validation quantizes


def choose_damp(w: torch.Tensor, h: torch.Tensor, halves: Sequence[tuple[torch.Tensor, int]],
                bits: int, group: int, *, outliers: torch.Tensor | None = None, block: int = 128,
                act_order: bool = False, clip: bool = False,
                dtype: torch.dtype = torch.float32,
                factors: FactorCache | None = None) -> tuple[float, dict[str, float]]:
    """``damp="auto"``: the dampening whose GPTQ, fitted on one half of the calibration
    samples, leaves the least output error on the other half (two folds, summed).

    Dampening is the only regulariser of GPTQ's least-squares fit: with few calibration
    rows per input feature the fit follows the sample (a small damp overfits, the held-out
    error grows) and with many a large damp throws information away. Which one is right
    depends on the layer and the data, so it is measured, not guessed. The folds share the
    full Hessian's column order and static groups; all candidates run as one batch, on
    ``DAMP_ROWS`` evenly spread output rows. ``factors`` shares the inverse-Hessian factors
    with the next layer that reads the same input (q/k/v, gate/up)."""
    if any(r == 0 for _, r in halves):      # one sample: nothing to hold out
        return DAMP_CANDIDATES[0], {}
    w0 = w.detach().to(dtype)
    keep0 = outliers.bool() if outliers is not None else torch.zeros(w0.shape, dtype=torch.bool)
    if w0.shape[0] > DAMP_ROWS:   # rows are independent given H: a spread of them estimates the error
        rows = torch.linspace(0, w0.shape[0] - 1, DAMP_ROWS).round().long()
        w0, keep0 = w0[rows], keep0[rows]
    setup = _Setup(w0, keep0, h.detach().double(), bits, group, act_order, clip, dtype)
    perm = setup.perm
    problems = [(d, fold, fit, held) for d in DAMP_CANDIDATES
                for fold, (fit, held) in enumerate(((halves[0][0], halves[1][0]), (halves[1][0], halves[0][0])))]
    # a batch of problems costs B * (N*K + K*K) floats: keep it near 256 MB
    per = (w0.numel() * 4 + h.shape[0] ** 2) * 4
    chunk = max(1, min(len(problems), (256 << 20) // max(1, per)))
    errors = {f"{d:g}": 0.0 for d in DAMP_CANDIDATES}
    inv = torch.argsort(perm)
    # float32 is plenty to rank dampenings, and twice as fast; each half ordered once
    fits = {id(m): (lambda f: f if setup.identity else f[perm][:, perm])(_undead(m.float())) for m, _ in halves}
    for c0 in range(0, len(problems), chunk):
        part = problems[c0:c0 + chunk]
        us = [_cached(factors, ("fold", fold, d, act_order),
                      lambda fit=fit, d=d: _inverse_cholesky(fits[id(fit)], d)[0].to(dtype))
              for d, fold, fit, _ in part]
        q_deq = _columns(setup, torch.stack(us), block)[0]
        for (d, _, _, held), q in zip(part, q_deq):
            diff = q[:, inv].double() - w0.double()
            errors[f"{d:g}"] += float(((diff @ held) * diff).sum())
    best = min(errors, key=errors.get)
    ref = errors[best] or 1.0
    return float(best), {k: round(v / ref, 4) for k, v in errors.items()}


class FactorCache:
    """Inverse-Hessian factors of one calibration input, for the layers that read it
    (q/k/v share one Hessian, gate/up another): each factorisation is O(K^3), the bulk of
    GPTQ's time on wide layers. ``keep`` is set by the caller only while another layer of
    the same input follows, so a lone layer's factors are freed as they are used."""

    def __init__(self):
        self.entries: dict = {}
        self.keep = False

    def clear(self) -> None:
        self.entries.clear()


def _cached(cache: FactorCache | None, key, make):
    if cache is None:
        return make()
    hit = cache.entries.get(key)
    if hit is None:
        hit = make()
        if cache.keep:
            cache.entries[key] = hit
    return hit


def _inverse_cholesky(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor ``U`` of ``(H + d I)^-1`` (``= U^T U``); the dampening is raised
    until H is positive definite. Returns the factor and the relative dampening used.

    One factorisation and one triangular inverse: with ``J`` the reversal permutation and
    ``J H J = M M^T`` (M lower), ``H = R R^T`` for the upper ``R = J M J``, so
    ``H^-1 = R^-T R^-1`` and ``U = R^-1 = J M^-1 J``."""
    mean_diag = float(torch.diagonal(h).mean())
    flipped = torch.flip(h, (0, 1))   # J H J: reversing a diagonal shift leaves it where it was
    for attempt in range(8):
        d = damp * (10 ** attempt)
        shifted = flipped.clone()
        shifted.diagonal().add_(torch.tensor(d * mean_diag, dtype=h.dtype))
        m, info = torch.linalg.cholesky_ex(shifted)
        del shifted
        if int(info) == 0:
            u = torch.flip(_lower_inverse(m), (0, 1))
            if bool(torch.isfinite(u).all()):
                return u, d
    raise PassError("the layer's input Hessian is not positive definite even with strong "
                    "dampening", "pass more calibration samples or a larger damp",
                    pass_name="quantize")


def _lower_inverse(m: torch.Tensor) -> torch.Tensor:
    """Inverse of a lower-triangular ``m`` by halves: ``[[A, 0], [C, D]]^-1 = [[A^-1, 0],
    [-D^-1 C A^-1, D^-1]]``. The products run as GEMMs (~2/3 K^3 flops), where a
    triangular solve against the identity is a K^3 TRSM: ~3x faster at K = 8192."""
    k = m.shape[0]
    if k <= 256:
        return torch.linalg.solve_triangular(m, torch.eye(k, dtype=m.dtype), upper=False)
    h = k // 2
    a_inv, d_inv = _lower_inverse(m[:h, :h]), _lower_inverse(m[h:, h:])
    out = torch.zeros_like(m)
    out[:h, :h], out[h:, h:] = a_inv, d_inv
    out[h:, :h] = -(d_inv @ (m[h:, :h] @ a_inv))
    return out


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, bits: int, group: int, *,
                  outliers: torch.Tensor | None = None, damp: float = 0.01, block: int = 128,
                  act_order: bool = False, clip: bool = False,
                  dtype: torch.dtype = torch.float32,
                  factors: FactorCache | None = None) -> tuple[GroupwiseWeight, dict[str, Any]]:
    """GPTQ of a ``[N, K]`` weight with input Hessian ``h`` ``[K, K]``.

    Returns the stored form (same as ``quantize_groupwise``) and statistics:
    ``hessian_error`` = ``tr((W - Q) H (W - Q)^T) / tr(W H W^T)`` (the layer's relative
    output error on the calibration inputs, squared) and the dampening used."""
    w0 = w.detach().to(dtype)
    n, k = w0.shape
    n_groups = math.ceil(k / group)
    keep0 = outliers.bool() if outliers is not None else torch.zeros(n, k, dtype=torch.bool)
    h_plain = h.detach().double()
    setup = _Setup(w0, keep0, h_plain, bits, group, act_order, clip, dtype)
    u, used_damp = _cached(factors, ("full", damp, act_order), lambda: _inverse_cholesky(
        setup.h if setup.identity else setup.h[setup.perm][:, setup.perm], damp))
    q_deq, codes, scales, zeros = _columns(setup, u.to(dtype)[None], block)
    q_deq, codes, scales, zeros = q_deq[0], codes[0], scales[0], zeros[0]

    inv = torch.argsort(setup.perm)
    q_final = q_deq[:, inv]
    pad = n_groups * group - k
    codes_p = torch.cat([codes, zeros.round().to(codes.dtype).repeat_interleave(group, 1)[:, k:]], 1) \
        if pad else codes
    values, cols, counts = store_outliers(q_final.float(), keep0)
    q = GroupwiseWeight(pack_bits(codes_p.reshape(n, n_groups, group), bits), scales.contiguous(),
                        pack_bits(zeros.round().contiguous(), bits), values, cols, counts, bits, group, k)
    stats = {"hessian_error": hessian_relative_error(w0, q_final, h_plain),
             "damp": used_damp, "act_order": act_order, "block": block}
    return q, stats


def visiting_order(h: torch.Tensor) -> torch.Tensor:
    """act_order's column order: decreasing input energy ``diag(H)`` (ties: lower index first)."""
    return torch.argsort(torch.diagonal(h), descending=True, stable=True)


def permuted_problem(w: torch.Tensor, h: torch.Tensor, halves, outliers: torch.Tensor | None,
                     order: torch.Tensor):
    """A layer's GPTQ problem with its input features in ``order``: weight columns, both
    Hessian axes (the full one and each half) and the outlier mask permuted alike; the
    error ``tr((W-Q) H (W-Q)^T)`` is unchanged by it."""
    ph = lambda m: m[order][:, order]
    return (w[:, order], ph(h), [(ph(m), r) for m, r in halves],
            None if outliers is None else outliers[:, order])


def _undead(h: torch.Tensor) -> torch.Tensor:
    """A copy of ``h`` whose always-zero inputs get ``H[j, j] = 1`` (they stay factorisable)."""
    h = h.clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    return h


class _Setup:
    """What every GPTQ run of one layer shares: column order, outliers, static groups."""

    def __init__(self, w0, keep0, h, bits, group, act_order, clip, dtype):
        n, k = w0.shape
        self.w0, self.bits, self.group, self.act_order, self.clip, self.dtype = \
            w0, bits, group, act_order, clip, dtype
        self.n_groups = math.ceil(k / group)
        self.h = _undead(h)
        self.static = None
        if act_order:
            self.perm = visiting_order(h)
            pad = self.n_groups * group - k
            wp = torch.nn.functional.pad(w0, (0, pad)).reshape(n, self.n_groups, group)
            kp = torch.nn.functional.pad(keep0, (0, pad)).reshape(n, self.n_groups, group)
            if clip:
                hd = torch.nn.functional.pad(torch.diagonal(h).to(dtype), (0, pad)).reshape(self.n_groups, group)
                parts = [clipped_group_params(wp[:, g], kp[:, g], bits, hd[g]) for g in range(self.n_groups)]
                s16, z = torch.stack([a for a, _ in parts], 1), torch.stack([b for _, b in parts], 1)
            else:
                s16, z = group_params(wp, kp, bits)             # static groups, original weights
            self.static = (s16, z.to(dtype))
        else:
            self.perm = torch.arange(k)
        self.identity = not act_order   # the column order is the weight's own
        self.keep = keep0[:, self.perm]
        self.hdiag = torch.diagonal(h)[self.perm].to(dtype)


def _columns(setup: _Setup, u: torch.Tensor, block: int):
    """The column loop on a batch of problems: ``u [B, K, K]`` (the permuted inverse-Hessian
    factors, e.g. one per dampening) against the same weight. Returns the dequantized
    weights (permuted order), codes (uint8, original order), fp16 scales and zero points,
    each with the batch dimension first. One Python loop serves the whole batch.

    The loop works on the transposed weight ``[B, K, N]``: GPTQ visits input columns one
    at a time, and a column of ``W [N, K]`` is N strided elements, while a row of ``W^T``
    is contiguous (on CPU the strided form was ~20x slower on an 8192 x 3072 layer)."""
    bsz = u.shape[0]
    n, k = setup.w0.shape
    dtype = setup.dtype
    keep_t = setup.keep.t().contiguous()                   # [K, N], permuted order
    if setup.static is not None:
        scales = setup.static[0].t()[None].repeat(bsz, 1, 1)    # [B, G, N]
        zeros = setup.static[1].t()[None].repeat(bsz, 1, 1)
    else:
        scales = torch.zeros(bsz, setup.n_groups, n, dtype=torch.float16)
        zeros = torch.zeros(bsz, setup.n_groups, n, dtype=dtype)
    w_t = setup.w0[:, setup.perm].t()[None].repeat(bsz, 1, 1)   # [B, K, N]
    q_t = torch.zeros_like(w_t)
    codes_t = torch.zeros(bsz, k, n, dtype=torch.uint8)    # original column order
    cols_orig = setup.perm.tolist()
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        w1 = w_t[:, b0:b1].clone()
        e1 = torch.empty_like(w1)
        u1 = u[:, b0:b1, b0:b1]
        with _one_thread():
            _block_columns(setup, w1, e1, u1, w_t, b0, b1, keep_t, scales, zeros, q_t, codes_t, cols_orig)
        w_t[:, b0:b1] = w1
        if b1 < k:
            w_t[:, b1:] -= u[:, b0:b1, b1:].transpose(1, 2) @ e1
    return q_t.transpose(1, 2), codes_t.transpose(1, 2), scales.transpose(1, 2), zeros.transpose(1, 2)


@contextlib.contextmanager
def _one_thread():
    """The per-column steps are many small ops: split over threads they gain little on a
    quiet machine and stall on a busy one (an op waits for a descheduled worker: 15x
    slower on 2 cores beside another job), so they run on one thread; the block's
    trailing update (a GEMM) keeps them all."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _block_columns(setup, w1, e1, u1, w_t, b0, b1, keep_t, scales, zeros, q_t, codes_t, cols_orig):
    """GPTQ's columns ``b0:b1`` of one block, in place: quantize each column, spread its
    error over the block's later columns (``w1``), record the scaled errors (``e1``)."""
    bits, group, dtype = setup.bits, setup.group, setup.dtype
    qmax = (1 << bits) - 1
    for i in range(b1 - b0):
        col = cols_orig[b0 + i]
        g = col // group
        if setup.static is None and col % group == 0:
            # group starts: range of the current (updated) weights of its columns;
            # with power-of-two block and group the group lies inside this block or
            # starts with it, so no update is pending for its columns
            ahead = group - (b1 - b0 - i)   # columns of the group past this block
            span = w1[:, i:i + group] if ahead <= 0 else torch.cat([w1[:, i:], w_t[:, b1:b1 + ahead]], 1)
            span = span.transpose(1, 2).contiguous()        # [B, N, g]
            kspan = keep_t[b0 + i:b0 + i + span.shape[2]].t()[None]
            s16, z = (clipped_group_params(span, kspan, bits, setup.hdiag[b0 + i:b0 + i + span.shape[2]])
                      if setup.clip else group_params(span, kspan, bits))
            scales[:, g], zeros[:, g] = s16, z.to(dtype)
        s = scales[:, g].to(dtype)
        z = zeros[:, g]
        wc = w1[:, i]
        code = torch.clamp(torch.round(wc / s) + z, 0, qmax)
        deq = (code - z) * s
        kc = keep_t[b0 + i]
        deq = torch.where(kc, wc, deq)               # outliers: not quantized, error 0
        codes_t[:, col] = torch.where(kc, z, code).to(torch.uint8)
        q_t[:, b0 + i] = deq
        err = (wc - deq) / u1[:, i, i, None]
        w1[:, i + 1:] -= u1[:, i, i + 1:, None] * err[:, None, :]
        e1[:, i] = err


CLIP_FACTORS = tuple(1.0 - 0.025 * i for i in range(17))   # keep 100% .. 60% of the range


def clipped_group_params(span: torch.Tensor, keep: torch.Tensor, bits: int,
                         hdiag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of each row's group ``span [..., N, g]`` with the range shrunk by the
    factor (``CLIP_FACTORS``) whose rounding error, weighted by the inputs' energy
    ``diag(H)``, is least: a wide range wastes levels on a few large weights that the
    error compensation can absorb. Outliers (``keep``) stay out of the range and the error.

    The group's range is found once: the range of ``span * f`` is ``f`` times it (a positive
    factor keeps the order, so the rounded products' min/max are the rounded min/max's
    products), the arithmetic ``group_params`` would do per factor. Only the rounding error
    is measured per factor, on contiguous tensors (with a transposed ``keep`` and the range per
    factor, this search was half of GPTQ's time on an 8192 x 3072 layer; now a fifth as long)."""
    qmax = (1 << bits) - 1
    has_keep = bool(keep.any())
    keep = keep.expand_as(span).contiguous() if has_keep else None
    lo0 = (torch.where(keep, torch.inf, span) if has_keep else span).amin(-1)
    hi0 = (torch.where(keep, -torch.inf, span) if has_keep else span).amax(-1)
    best = best_s = best_z = None
    for f in CLIP_FACTORS:
        lo, hi = (lo0 * f).clamp(max=0), (hi0 * f).clamp(min=0)
        scale = ((hi - lo) / qmax).clamp(min=1e-7)
        s16 = (scale.float() * (1 + 2 ** -10)).to(torch.float16)   # group_params' rounding, exactly
        s = s16.float()
        z = torch.clamp(torch.round(-lo.float() / s), 0, qmax)
        sx, zx = s[..., None], z[..., None]
        d = span - (torch.clamp(torch.round(span / sx) + zx, 0, qmax) - zx) * sx
        if has_keep:
            d = torch.where(keep, 0.0, d)
        err = (d.square_() * hdiag).sum(-1)
        if best is None:
            best, best_s, best_z = err, s16, z
        else:   # the first factor with the least error wins ties
            better = err < best
            best = torch.where(better, err, best)
            best_s, best_z = torch.where(better, s16, best_s), torch.where(better, z, best_z)
    return best_s, best_z


def hessian_relative_error(w: torch.Tensor, w_q: torch.Tensor, h: torch.Tensor) -> float:
    """``tr((W - Q) H (W - Q)^T) / tr(W H W^T)``: a reported statistic, so the products run
    in float32 (an fp64 N x K x K product took as long as GPTQ itself on an MLP layer) and
    only the sums in float64."""
    hf = h.float()
    d, wf = (w_q.float() - w.float()), w.float()
    ref = float(((wf @ hf) * wf).double().sum())
    return float(((d @ hf) * d).double().sum()) / ref if ref > 0 else 0.0


__all__ = ["FactorCache", "layer_hessian", "HessianSums", "QuantizedRunner", "gptq_quantize", "hessian_relative_error", "choose_damp", "DAMP_CANDIDATES",
           "visiting_order", "permuted_problem"]
