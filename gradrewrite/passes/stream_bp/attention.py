"""Causal attention for a chunk of query rows, without a materialised mask.

Queries are rows [q0, q1) of the sequence, keys/values rows [0, k1) with k1 >= q1. Query
row i sees keys 0..i: the keys before q0 are all visible and the keys [q0, q1) form a
square whose causal mask is the ordinary top-left one. On CPU the two blocks run through
the fused flash kernel and are merged by their log-sum-exp; the backward calls the
kernel's backward once per block with the *merged* output and log-sum-exp, which is
exactly the blockwise flash-attention gradient; grouped-query keys/values (fewer heads,
``enable_gqa``) go to the kernel as they are. Other devices fall back to SDPA with an
explicit bottom-right mask.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

aten = torch.ops.aten
_FLASH = aten._scaled_dot_product_flash_attention_for_cpu.default
_FLASH_BWD = aten._scaled_dot_product_flash_attention_for_cpu_backward.default


class _PrefixCausalAttention(torch.autograd.Function):
    """Keys [0, split) fully visible, keys [split, end) causal against the queries."""

    @staticmethod
    def forward(ctx, q, k, v, split: int, scale):
        out, lse = _FLASH(q, k[..., split:, :], v[..., split:, :], 0.0, True, scale=scale)
        if split:
            out_p, lse_p = _FLASH(q, k[..., :split, :], v[..., :split, :], 0.0, False, scale=scale)
            merged = torch.logaddexp(lse_p, lse)
            out = out_p * torch.exp(lse_p - merged).unsqueeze(-1).to(out.dtype) + \
                out * torch.exp(lse - merged).unsqueeze(-1).to(out.dtype)
            lse = merged
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.split, ctx.scale = split, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        s, scale = ctx.split, ctx.scale
        grad = grad.contiguous()
        dq, dk_d, dv_d = _FLASH_BWD(grad, q, k[..., s:, :], v[..., s:, :], out, lse, 0.0, True,
                                    scale=scale)
        if not s:
            return dq, dk_d, dv_d, None, None
        dq_p, dk_p, dv_p = _FLASH_BWD(grad, q, k[..., :s, :], v[..., :s, :], out, lse, 0.0, False,
                                      scale=scale)
        return dq + dq_p, torch.cat([dk_p, dk_d], -2), torch.cat([dv_p, dv_d], -2), None, None


def causal_chunk_mask(q: torch.Tensor, q0: int, q1: int, k0: int, k1: int) -> torch.Tensor:
    """Bool mask (q1-q0) x (k1-k0): query at global row i sees keys j <= i (bottom-right)."""
    qpos = torch.arange(q0, q1, device=q.device)
    kpos = torch.arange(k0, k1, device=q.device)
    return kpos[None, :] <= qpos[:, None]


def chunk_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q0: int, q1: int,
                           k0: int, k1: int, scale: float | None = None,
                           enable_gqa: bool = False) -> torch.Tensor:
    """SDPA of query rows [q0, q1) against key rows [k0, k1), causal by global position."""
    if k0 != 0 or k1 < q1:
        raise ValueError(f"causal chunk needs keys 0..{q1}, got {k0}..{k1}")
    if k1 > q1:  # keys after the last query are never visible
        k, v = k[..., :q1 - k0, :], v[..., :q1 - k0, :]
    if q0 == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                              enable_gqa=enable_gqa)
    heads_ok = q.shape[:-2] == k.shape[:-2] or (
        enable_gqa and q.shape[:-3] == k.shape[:-3] and q.shape[-3] % k.shape[-3] == 0)
    flash_ok = q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64) and heads_ok
    if flash_ok:
        return _PrefixCausalAttention.apply(q, k, v, q0, scale)
    mask = causal_chunk_mask(q, q0, q1, 0, q1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=enable_gqa)
