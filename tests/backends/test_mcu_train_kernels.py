"""fp32 backward kernels (kernels/gr_train.c) built on the host, each against torch.autograd.

The kernels are compiled into a shared library and called through ctypes on numpy
buffers. Tolerance: 1e-5 absolute + 1e-5 relative (fp32 sums in a different order);
masks, index scatters and the SGD update are compared exactly.
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gradrewrite.backends.mcu.c_files import kernel_dir

TOL = dict(atol=1e-5, rtol=1e-5)
I32 = ctypes.c_int32


class ConvShape(ctypes.Structure):
    _fields_ = [(n, I32) for n in "n c h w oc oh ow kh kw sh sw ph pw dh dw groups".split()]


class PoolShape(ctypes.Structure):
    _fields_ = [(n, I32) for n in "nc h w oh ow kh kw sh sw ph pw dh dw count_include_pad divisor".split()]


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    d = tmp_path_factory.mktemp("gr_train")
    so = d / "libgrtrain.so"
    src = kernel_dir()
    subprocess.run([shutil.which("cc") or "gcc", "-std=c99", "-O2", "-Wall", "-Werror", "-shared", "-fPIC",
                    "-I", str(src), str(src / "gr_train.c"), "-lm", "-o", str(so)], check=True)
    return ctypes.CDLL(str(so))


def ptr(a: np.ndarray):
    assert a.flags.c_contiguous
    return a.ctypes.data_as(ctypes.c_void_p)


def f32(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().numpy(), dtype=np.float32)


def conv_case(n, c, oc, h, k, stride, pad, groups, dil=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, h, generator=g, requires_grad=True)
    w = torch.randn(oc, c // groups, k, k, generator=g, requires_grad=True)
    b = torch.randn(oc, generator=g, requires_grad=True)
    y = F.conv2d(x, w, b, stride, pad, dil, groups)
    gy = torch.randn(y.shape, generator=g)
    y.backward(gy)
    s = ConvShape(n, c, h, h, oc, y.shape[2], y.shape[3], k, k, stride, stride, pad, pad, dil, dil, groups)
    return x, w, b, gy, s


CONVS = [  # n, c, oc, h, k, stride, pad, groups, dilation
    (2, 3, 8, 9, 3, 1, 1, 1, 1), (1, 4, 6, 10, 3, 2, 1, 1, 1), (2, 8, 8, 7, 3, 1, 1, 8, 1),   # depthwise
    (1, 6, 4, 8, 3, 2, 0, 2, 1), (2, 5, 7, 6, 1, 1, 0, 1, 1), (1, 4, 4, 9, 3, 1, 2, 1, 2),    # groups, 1x1, dilation
]


@pytest.mark.parametrize("case", CONVS, ids=lambda c: "n{}c{}oc{}h{}k{}s{}p{}g{}d{}".format(*c))
def test_conv_backward(lib, case):
    x, w, b, gy, s = conv_case(*case)
    gx = np.empty(x.shape, np.float32)
    lib.gr_conv2d_bwd_input_f32(ctypes.byref(s), ptr(f32(gy)), ptr(f32(w)), ptr(gx))
    np.testing.assert_allclose(gx, x.grad.numpy(), **TOL)
    gw = np.empty(w.shape, np.float32)
    lib.gr_conv2d_bwd_weight_f32(ctypes.byref(s), I32(w.shape[0]), ptr(f32(gy)), ptr(f32(x)), ptr(gw))
    np.testing.assert_allclose(gw, w.grad.numpy(), **TOL)
    gb = np.empty(b.shape, np.float32)
    lib.gr_conv2d_bwd_bias_f32(I32(gy.shape[0]), I32(gy.shape[1]), I32(gy.shape[2] * gy.shape[3]), ptr(f32(gy)),
                               ptr(gb))
    np.testing.assert_allclose(gb, b.grad.numpy(), **TOL)


@pytest.mark.parametrize("k", [1, 3, 8])
def test_conv_weight_grad_partial_channels(lib, k):
    """Only the first k filters' gradients, from the first k channels of grad_output."""
    x, w, b, gy, s = conv_case(2, 4, 8, 8, 3, 1, 1, 1, seed=3)
    s.oc = k
    gw = np.empty((k, *w.shape[1:]), np.float32)
    lib.gr_conv2d_bwd_weight_f32(ctypes.byref(s), I32(k), ptr(f32(gy[:, :k])), ptr(f32(x)), ptr(gw))
    np.testing.assert_allclose(gw, w.grad[:k].numpy(), **TOL)
    gb = np.empty(k, np.float32)
    lib.gr_conv2d_bwd_bias_f32(I32(2), I32(k), I32(64), ptr(f32(gy[:, :k])), ptr(gb))
    np.testing.assert_allclose(gb, b.grad[:k].numpy(), **TOL)


def test_linear_backward(lib):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, generator=g, requires_grad=True)
    w = torch.randn(5, 7, generator=g, requires_grad=True)
    b = torch.randn(5, generator=g, requires_grad=True)
    gy = torch.randn(3, 5, generator=g)
    F.linear(x, w, b).backward(gy)
    gx, gw, gb = np.empty((3, 7), np.float32), np.empty((5, 7), np.float32), np.empty(5, np.float32)
    lib.gr_linear_bwd_input_f32(ptr(f32(gy)), ptr(f32(w)), ptr(gx), I32(3), I32(7), I32(5))
    lib.gr_linear_bwd_weight_f32(ptr(f32(gy)), ptr(f32(x)), ptr(gw), I32(3), I32(7), I32(5))
    lib.gr_linear_bwd_bias_f32(ptr(f32(gy)), ptr(gb), I32(3), I32(5))
    for got, want in ((gx, x.grad), (gw, w.grad), (gb, b.grad)):
        np.testing.assert_allclose(got, want.numpy(), **TOL)


def test_relu_relu6_backward(lib):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(200, generator=g) * 4
    x[:4] = torch.tensor([0.0, 6.0, -0.0, 3.0])  # the boundaries, as torch treats them
    gy = torch.randn(200, generator=g)
    out = np.empty(200, np.float32)
    y = torch.relu(x)
    lib.gr_threshold_bwd_f32(ptr(f32(gy)), ptr(f32(y)), ctypes.c_float(0.0), ptr(out), I32(200))
    np.testing.assert_array_equal(out, torch.ops.aten.threshold_backward(gy, y, 0).numpy())
    lib.gr_hardtanh_bwd_f32(ptr(f32(gy)), ptr(f32(x)), ctypes.c_float(0.0), ctypes.c_float(6.0), ptr(out), I32(200))
    np.testing.assert_array_equal(out, torch.ops.aten.hardtanh_backward(gy, x, 0.0, 6.0).numpy())


def test_gate_kernels_match_the_int8_reference_bit_for_bit(lib):
    """Squeeze-excitation gates as an int8 training step runs them: gr_sigmoid_tr_f32
    (gr_expf), gr_sigmoid_bwd_f32 and gr_hardsigmoid_bwd_f32 equal the integer
    reference's mirrors (training/reference.py GATES) bit for bit, on the boundaries
    (gr_expf's +-87/88 cut-offs, hardsigmoid's +-3) and NaN/inf; the sigmoid is within
    2 float steps (relative 2.4e-7) of torch's."""
    from gradrewrite.backends.mcu.training.reference import GATES

    aten = torch.ops.aten
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(400, generator=g) * 30).numpy().astype(np.float32)
    x[:12] = [0.0, -0.0, 3.0, -3.0, 87.0, -87.0, 88.0, -88.0, 87.5, -87.5, np.inf, -np.inf]
    gy = torch.randn(400, generator=g).numpy().astype(np.float32)
    out = np.empty(400, np.float32)
    lib.gr_sigmoid_tr_f32(ptr(x), ptr(out), I32(400))
    np.testing.assert_array_equal(out, GATES[aten.sigmoid.default](x))
    np.testing.assert_allclose(out, torch.sigmoid(torch.from_numpy(x)).numpy(), rtol=2.4e-7, atol=1e-38)
    y = out.copy()
    lib.gr_sigmoid_bwd_f32(ptr(gy), ptr(y), ptr(out), I32(400))
    np.testing.assert_array_equal(out, GATES[aten.sigmoid_backward.default](gy, y))
    lib.gr_hardsigmoid_bwd_f32(ptr(gy), ptr(x), ptr(out), I32(400))
    np.testing.assert_array_equal(out, GATES[aten.hardsigmoid_backward.default](gy, x))
    np.testing.assert_array_equal(out, aten.hardsigmoid_backward(torch.from_numpy(gy), torch.from_numpy(x)).numpy())


@pytest.mark.parametrize("op,cmp", [(0, "le"), (1, "ge"), (2, "lt"), (3, "gt")])
def test_where_compare_is_torch_where(lib, op, cmp):
    """gr_where_cmp_f32: where(x OP s, a, b) with either branch a tensor or a constant
    (hardswish / hardsigmoid backward as autograd decomposes them), exactly torch's, ties
    and NaN included."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(300, generator=g) * 4
    x[:4] = torch.tensor([3.0, -3.0, 6.0, float("nan")])
    a, b = torch.randn(300, generator=g), torch.randn(300, generator=g)
    out = np.empty(300, np.float32)
    for s in (3.0, 6.0, 0.0):
        mask = getattr(torch, cmp)(x, s)
        lib.gr_where_cmp_f32(I32(op), ptr(f32(x)), ctypes.c_float(s), ptr(f32(a)), ctypes.c_float(0.0), None,
                             ctypes.c_float(0.0), ptr(out), I32(300))
        np.testing.assert_array_equal(out, torch.where(mask, a, 0.0).numpy())
        lib.gr_where_cmp_f32(I32(op), ptr(f32(x)), ctypes.c_float(s), None, ctypes.c_float(2.5), ptr(f32(b)),
                             ctypes.c_float(0.0), ptr(out), I32(300))
        np.testing.assert_array_equal(out, torch.where(mask, 2.5, b).numpy())


@pytest.mark.parametrize("k,s,p,cip", [(2, 2, 0, True), (3, 2, 1, True), (3, 1, 1, False), (3, 2, 1, False)])
def test_avg_pool_backward(lib, k, s, p, cip):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 9, 9, generator=g, requires_grad=True)
    y = F.avg_pool2d(x, k, s, p, count_include_pad=cip)
    gy = torch.randn(y.shape, generator=g)
    y.backward(gy)
    shape = PoolShape(6, 9, 9, y.shape[2], y.shape[3], k, k, s, s, p, p, 1, 1, int(cip), 0)
    gx = np.empty(x.shape, np.float32)
    lib.gr_avg_pool2d_bwd_f32(ctypes.byref(shape), ptr(f32(gy)), ptr(gx))
    np.testing.assert_allclose(gx, x.grad.numpy(), **TOL)


@pytest.mark.parametrize("out", [(1, 1), (3, 2), (4, 4)])
def test_adaptive_avg_pool_backward(lib, out):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 7, 6, generator=g, requires_grad=True)
    y = F.adaptive_avg_pool2d(x, out)
    gy = torch.randn(y.shape, generator=g)
    y.backward(gy)
    gx = np.empty(x.shape, np.float32)
    lib.gr_adaptive_avg_pool2d_bwd_f32(ptr(f32(gy)), ptr(gx), I32(6), I32(7), I32(6), I32(out[0]), I32(out[1]))
    np.testing.assert_allclose(gx, x.grad.numpy(), **TOL)


def test_max_pool_indices_and_backward(lib):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 8, 8, generator=g)
    x[0, 0, 0, :2] = 5.0  # a tie: torch keeps the first
    x.requires_grad_(True)
    y, idx = F.max_pool2d(x, 3, 2, 1, return_indices=True)
    gy = torch.randn(y.shape, generator=g)
    y.backward(gy)
    shape = PoolShape(6, 8, 8, y.shape[2], y.shape[3], 3, 3, 2, 2, 1, 1, 1, 1, 1, 0)
    yo, io = np.empty(y.shape, np.float32), np.empty(y.shape, np.int64)
    lib.gr_max_pool2d_idx_f32(ctypes.byref(shape), ptr(f32(x)), ptr(yo), ptr(io))
    np.testing.assert_array_equal(yo, y.detach().numpy())
    np.testing.assert_array_equal(io, idx.numpy())
    gx = np.empty(x.shape, np.float32)
    lib.gr_max_pool2d_bwd_f32(ptr(f32(gy)), ptr(io), ptr(gx), I32(6), I32(64), I32(y.shape[2] * y.shape[3]))
    np.testing.assert_allclose(gx, x.grad.numpy(), **TOL)


def test_add_backward_broadcast(lib):
    g = torch.Generator().manual_seed(7)
    a = torch.randn(2, 4, 3, 3, generator=g, requires_grad=True)
    b = torch.randn(1, 4, 1, 1, generator=g, requires_grad=True)
    gy = torch.randn(2, 4, 3, 3, generator=g)
    (a + b).backward(gy)
    gb = np.empty(4, np.float32)
    lib.gr_add_bwd_reduce_f32(ptr(f32(gy)), ptr(gb), I32(2), I32(4), I32(9))
    np.testing.assert_allclose(gb, b.grad.reshape(-1).numpy(), **TOL)
    np.testing.assert_array_equal(a.grad.numpy(), gy.numpy())  # the full-shape operand passes gy through


def test_cross_entropy_forward_backward(lib):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(4, 10, generator=g, requires_grad=True)
    t = torch.tensor([3, 0, 9, 3])
    loss = F.cross_entropy(x, t)
    loss.backward()
    tn = np.ascontiguousarray(t.numpy())
    # fused softmax cross-entropy
    lv, gx = np.empty(1, np.float32), np.empty((4, 10), np.float32)
    lib.gr_softmax_xent_f32(ptr(f32(x)), ptr(tn), ptr(lv), ptr(gx), I32(4), I32(10))
    np.testing.assert_allclose(lv[0], loss.item(), **TOL)
    np.testing.assert_allclose(gx, x.grad.numpy(), **TOL)
    # the ATen decomposition the training graph holds: log_softmax, nll_loss, and back
    logp = F.log_softmax(x.detach(), 1)
    tw = np.empty(1, np.float32)
    lib.gr_nll_loss_f32(ptr(f32(logp)), ptr(tn), ptr(lv), ptr(tw), I32(4), I32(10), ctypes.c_int64(-100), I32(1))
    np.testing.assert_allclose(lv[0], loss.item(), **TOL)
    g_logp = np.empty((4, 10), np.float32)
    one = np.ones(1, np.float32)
    lib.gr_nll_loss_bwd_f32(ptr(one), ptr(tn), ptr(tw), ptr(g_logp), I32(4), I32(10), ctypes.c_int64(-100), I32(1))
    lib.gr_log_softmax_bwd_f32(ptr(g_logp), ptr(f32(logp)), ptr(gx), I32(4), I32(10))
    np.testing.assert_allclose(gx, x.grad.numpy(), **TOL)


def test_nll_loss_ignore_index(lib):
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(9), requires_grad=True)
    t = torch.tensor([1, -100, 4])
    logp = F.log_softmax(x, 1)
    loss = F.nll_loss(logp, t)
    logp.retain_grad()
    loss.backward()
    lv, tw, gl = np.empty(1, np.float32), np.empty(1, np.float32), np.empty((3, 5), np.float32)
    tn, lp = np.ascontiguousarray(t.numpy()), f32(logp)
    lib.gr_nll_loss_f32(ptr(lp), ptr(tn), ptr(lv), ptr(tw), I32(3), I32(5), ctypes.c_int64(-100), I32(1))
    assert tw[0] == 2.0
    np.testing.assert_allclose(lv[0], loss.item(), **TOL)
    lib.gr_nll_loss_bwd_f32(ptr(np.ones(1, np.float32)), ptr(tn), ptr(tw), ptr(gl), I32(3), I32(5),
                            ctypes.c_int64(-100), I32(1))
    np.testing.assert_array_equal(gl, logp.grad.numpy())


def test_sgd_in_place(lib):
    g = torch.Generator().manual_seed(10)
    p, grad = torch.randn(37, generator=g), torch.randn(37, generator=g)
    arr = f32(p).copy()
    lib.gr_sgd_f32(ptr(arr), ptr(f32(grad)), ctypes.c_float(0.05), I32(37))
    np.testing.assert_array_equal(arr, (p - grad * 0.05).numpy())  # same float32 ops as the torch update
