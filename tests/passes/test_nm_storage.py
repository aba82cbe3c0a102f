"""Compressed N:M storage: round trips per value type, the documented byte layout, sizes."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import gradrewrite as gr
from gradrewrite.rewrite.nm_masks import check_nm, nm_mask, to_groups
from gradrewrite.rewrite.nm_storage import (
    bits_per_weight, layer_bits_per_weight, pack_nm, packed_bytes, unpack_nm,
)

CASES = [  # shape, kind, n, m
    ((8, 16), "linear", 2, 4),
    ((6, 12, 3, 3), "conv", 2, 4),          # conv2d: groups along input channels
    ((5, 16, 3), "conv", 1, 8),             # conv1d, 3-bit indices crossing bytes
    ((3, 4, 2, 2, 2), "conv", 2, 4),        # conv3d
    ((5, 10), "linear", 2, 4),              # padded: 4 + 4 + tail 2
    ((4, 7, 3), "conv", 3, 8),              # padded: one short group of 7
    ((3, 5), "linear", 3, 4),               # padded tail of 1 < n
    ((4, 12), "linear", 3, 16),             # K < m: one padded group
]


def masked(shape, kind, n, m, seed=0):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    mask = nm_mask(w, n, m, kind, pad=True)
    return w * mask, mask


@pytest.mark.parametrize("shape,kind,n,m", CASES)
def test_round_trip_fp32_exact(shape, kind, n, m):
    w, mask = masked(shape, kind, n, m)
    p = pack_nm(w, n, m, kind, mask=mask)
    assert p.values.shape == (p.rows, -(-p.k // m), n) and p.values.dtype == torch.float32
    assert p.indices.dtype == torch.uint8 and p.indices.dim() == 1
    assert p.pad == (-p.k) % m
    out = unpack_nm(p)
    assert out.shape == w.shape and out.dtype == torch.float32
    assert torch.equal(out, w)
    assert torch.equal(pack_nm(w, n, m, kind).indices, p.indices)   # mask from the nonzeros


@pytest.mark.parametrize("shape,kind,n,m", CASES)
def test_round_trip_fp16_exact_for_representable(shape, kind, n, m):
    w, mask = masked(shape, kind, n, m, seed=1)
    w = w.half().float()                                        # fp16-representable values
    p = pack_nm(w, n, m, kind, mask=mask, value_dtype="fp16")
    assert p.values.dtype == torch.float16
    assert torch.equal(unpack_nm(p), w)


@pytest.mark.parametrize("shape,kind,n,m", CASES)
def test_round_trip_int8_within_half_a_step(shape, kind, n, m):
    w, mask = masked(shape, kind, n, m, seed=2)
    p = pack_nm(w, n, m, kind, mask=mask, value_dtype="int8")
    assert p.values.dtype == torch.int8 and p.scales.shape == (p.rows,)
    out = unpack_nm(p)
    err = to_groups((out - w).abs(), kind)                       # [rows, K]
    assert bool((err <= p.scales[:, None] / 2 * (1 + 1e-6)).all())
    assert torch.equal(out != 0, (w != 0) & (out != 0))          # no weight appears from nothing
    assert bool((p.values.abs() <= 127).all())
    assert int(p.values.abs().amax()) == 127                     # symmetric: max maps to 127


@pytest.mark.parametrize("shape,kind,n,m", CASES)
@pytest.mark.parametrize("value_dtype", ["fp32", "fp16", "int8"])
def test_packed_size_equals_formula(shape, kind, n, m, value_dtype):
    w, mask = masked(shape, kind, n, m)
    p = pack_nm(w, n, m, kind, mask=mask, value_dtype=value_dtype)
    exact_bits = layer_bits_per_weight(shape, n, m, kind, value_dtype) * w.numel()
    assert packed_bytes(p) == math.ceil(exact_bits / 8 - 1e-9)   # only the index stream rounds
    count = p.rows * p.groups * n
    value_bytes = {"fp32": 4, "fp16": 2, "int8": 1}[value_dtype]
    assert p.values.numel() * value_bytes + p.indices.numel() + (
        4 * p.rows if value_dtype == "int8" else 0) == packed_bytes(p)
    assert p.indices.numel() == math.ceil(count * p.index_bits / 8)
    k = shape[1]
    if k % m == 0:                                              # unpadded: the plain formula
        vb = {"fp32": 32, "fp16": 16, "int8": 8}[value_dtype]
        bpw = bits_per_weight(n, m, vb, scale_bits_per_row=32 if value_dtype == "int8" else 0,
                              row_len=k)
        assert layer_bits_per_weight(shape, n, m, kind, value_dtype) == pytest.approx(bpw)


def test_bits_per_weight_values():
    assert bits_per_weight(2, 4, 16) == (2 * 16 + 2 * 2) / 4 == 9.0
    assert bits_per_weight(2, 4, 32) == 17.0
    assert bits_per_weight(1, 8, 16) == (16 + 3) / 8
    assert bits_per_weight(2, 4, 8, scale_bits_per_row=32, row_len=64) == 5.0 + 0.5
    assert bits_per_weight(4, 16, 8) == (4 * 8 + 4 * 4) / 16
    with pytest.raises(ValueError, match="row_len"):
        bits_per_weight(2, 4, 8, scale_bits_per_row=32)
    with pytest.raises(ValueError):
        bits_per_weight(4, 4, 16)


def test_byte_layout_linear_2_4():
    w = torch.tensor([[0.0, 1.5, 0.0, -2.0, 3.0, 0.0, 0.25, 0.0],
                      [0.0, 0.0, 0.0, 0.0, 0.0, 7.0, 0.0, 0.0]])
    p = pack_nm(w, 2, 4, "linear")
    assert p.values.tolist() == [[[1.5, -2.0], [3.0, 0.25]], [[0.0, 0.0], [0.0, 7.0]]]
    # indices row 0: [1, 3], [0, 2]; row 1: [0, 1] (all-zero group: lowest fill), [0, 1]
    assert p.decode_indices().tolist() == [[[1, 3], [0, 2]], [[0, 1], [0, 1]]]
    # 2 bits each, LSB first: byte0 = 1 | 3<<2 | 0<<4 | 2<<6, byte1 = 0 | 1<<2 | 0<<4 | 1<<6
    assert p.indices.tolist() == [1 | 3 << 2 | 0 << 4 | 2 << 6, 0 | 1 << 2 | 0 << 4 | 1 << 6]
    assert p.values.flatten().numpy().tobytes()[:4] == torch.tensor([1.5]).numpy().tobytes()


def test_byte_layout_3_bit_indices_cross_bytes():
    w = torch.zeros(1, 24)
    w[0, [5, 8 + 7, 16 + 2]] = 1.0                               # 1:8, positions 5, 7, 2
    p = pack_nm(w, 1, 8, "linear")
    assert p.decode_indices().flatten().tolist() == [5, 7, 2]
    bits = 5 | 7 << 3 | 2 << 6                                    # 9 bits, LSB first
    assert p.indices.tolist() == [bits & 0xFF, bits >> 8]


def test_conv_rows_are_kernel_positions_groups_input_channels():
    w = torch.zeros(1, 4, 1, 2)                                  # [O, I, kh, kw]
    w[0, 2, 0, 0], w[0, 3, 0, 0] = 1.0, 2.0                      # position (0,0): channels 2, 3
    w[0, 0, 0, 1], w[0, 1, 0, 1] = 3.0, 4.0                      # position (0,1): channels 0, 1
    p = pack_nm(w, 2, 4, "conv")
    assert (p.rows, p.k) == (2, 4)
    assert p.values.tolist() == [[[1.0, 2.0]], [[3.0, 4.0]]]
    assert p.decode_indices().tolist() == [[[2, 3]], [[0, 1]]]
    assert torch.equal(unpack_nm(p), w)


def test_padded_tail_slots_point_past_k_and_are_dropped():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])                 # 3:4, tail of 1
    p = pack_nm(w, 3, 4, "linear")
    assert p.pad == 3 and p.decode_indices().tolist() == [[[1, 2, 3], [0, 1, 2]]]
    assert p.values.tolist() == [[[2.0, 3.0, 4.0], [5.0, 0.0, 0.0]]]
    assert torch.equal(unpack_nm(p), torch.tensor([[0.0, 2.0, 3.0, 4.0, 5.0]]))


def test_dense_weight_is_pruned_by_magnitude_and_bad_masks_refused():
    w = torch.randn(4, 8, generator=torch.Generator().manual_seed(4))
    p = pack_nm(w, 2, 4, "linear")
    assert torch.equal(unpack_nm(p), w * nm_mask(w, 2, 4, "linear"))
    with pytest.raises(ValueError, match="not 2:4"):
        pack_nm(w, 2, 4, "linear", mask=torch.ones_like(w, dtype=torch.bool))
    with pytest.raises(ValueError, match="value_dtype"):
        pack_nm(w, 2, 4, "linear", value_dtype="fp8")


def test_packs_what_the_pass_produced():
    model = nn.Sequential(nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 4))
    g = gr.capture(model.eval(), (torch.randn(1, 8, 6, 6),))
    gr.run_pipeline(g, "nm-sparsity(n=2,m=4)", verify=False)
    for param, rec in g.meta["nm_sparsity"].items():
        w = g.attr(param).detach()
        assert check_nm(rec["mask"], 2, 4, rec["kind"])
        for value_dtype in ("fp32", "fp16"):
            p = pack_nm(w, rec["n"], rec["m"], rec["kind"], mask=rec["mask"],
                        value_dtype=value_dtype)
            ref = w if value_dtype == "fp32" else w.half().float()
            assert torch.equal(unpack_nm(p), ref)
        bpw = g.meta["export_metadata"]["nm_sparsity"][param]["bits_per_weight"]["fp16"]
        assert packed_bytes(pack_nm(w, 2, 4, rec["kind"], mask=rec["mask"], value_dtype="fp16")) \
            == math.ceil(bpw * w.numel() / 8)
