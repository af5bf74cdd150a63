"""Fused elementwise ops for CUDA tensors in Triton, same signatures and results (up to rounding
order) as the torch references in ember.kernels: RMSNorm (+ residual add), rotary embedding of q
and k in place, SiLU·mul.

Why: on the GPU a decode step is ~50 torch kernels per layer, most of them tiny elementwise ops;
even replayed from a CUDA graph each costs a launch slot (~1.5 us of graph-launch CPU time and of
GPU time). These three fusions bring a layer to about a dozen kernels.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm(x_ptr, res_ptr, sum_ptr, w_ptr, out_ptr, inner, stride_x0, stride_x1, eps,
              D: tl.constexpr, BLOCK: tl.constexpr, HAS_RES: tl.constexpr):
    r = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    src = x_ptr + (r // inner).to(tl.int64) * stride_x0 + (r % inner) * stride_x1
    x = tl.load(src + cols, mask=mask, other=0.0)
    if HAS_RES:                          # x + residual, rounded to the dtype as torch would
        x = x + tl.load(res_ptr + r.to(tl.int64) * D + cols, mask=mask, other=0.0)
        tl.store(sum_ptr + r.to(tl.int64) * D + cols, x, mask=mask)
    h = x.to(tl.float32)
    h = h * tl.rsqrt(tl.sum(h * h, 0) / D + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    y = w.to(tl.float32) * h.to(x.dtype).to(tl.float32)
    tl.store(out_ptr + r.to(tl.int64) * D + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None):
    """x [..., D] (rows may be strided, e.g. heads of a qkv view) → out, or (out, x + residual)."""
    d = x.shape[-1]
    if x.dim() == 3:
        inner, s0, s1 = x.shape[1], x.stride(0), x.stride(1)
    else:
        x = x.reshape(-1, d)
        inner, s0, s1 = 1, x.stride(0), 0
    rows = x.numel() // d if x.numel() else 0
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    summed = None
    if residual is not None:
        residual = residual.contiguous()
        summed = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if rows:
        _rms_norm[(rows,)](x, residual, summed, weight, out, inner, s0, s1, eps, D=d,
                           BLOCK=triton.next_power_of_2(d), HAS_RES=residual is not None,
                           num_warps=4 if d >= 1024 else 1)
    return out if residual is None else (out, summed)


@triton.jit
def _rotary(q_ptr, k_ptr, pos_ptr, cs_ptr, stride_qt, stride_qh, stride_kt, stride_kh,
            HQ: tl.constexpr, HK: tl.constexpr, H_PAD: tl.constexpr, HALF: tl.constexpr):
    t = tl.program_id(0)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    i = tl.arange(0, HALF)
    cos = tl.load(cs_ptr + pos * (2 * HALF) + i).to(tl.float32)[None, :]
    sin = tl.load(cs_ptr + pos * (2 * HALF) + HALF + i).to(tl.float32)[None, :]
    h = tl.arange(0, H_PAD)[:, None]
    for which in tl.static_range(2):
        if which == 0:
            base = q_ptr + t.to(tl.int64) * stride_qt + h * stride_qh + i[None, :]
            mask = (h < HQ) & (i[None, :] < HALF)
        else:
            base = k_ptr + t.to(tl.int64) * stride_kt + h * stride_kh + i[None, :]
            mask = (h < HK) & (i[None, :] < HALF)
        x1 = tl.load(base, mask=mask, other=0.0)
        x2 = tl.load(base + HALF, mask=mask, other=0.0)
        a, b = x1.to(tl.float32), x2.to(tl.float32)
        tl.store(base, (a * cos - b * sin).to(x1.dtype), mask=mask)
        tl.store(base + HALF, (b * cos + a * sin).to(x1.dtype), mask=mask)


def rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor):
    """Neox-style rotation of q [T, H, D] and k [T, Hkv, D] in place; cos_sin [max_pos, D]."""
    t, hq, d = q.shape
    if t:
        _rotary[(t,)](q, k, positions, cos_sin.contiguous(), q.stride(0), q.stride(1),
                      k.stride(0), k.stride(1), HQ=hq, HK=k.shape[1],
                      H_PAD=triton.next_power_of_2(max(hq, k.shape[1])), HALF=d // 2,
                      num_warps=4)
    return q, k


@triton.jit
def _silu_mul(x_ptr, out_ptr, inter, BLOCK: tl.constexpr):
    t, c = tl.program_id(0), tl.program_id(1)
    cols = c * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    row = x_ptr + t.to(tl.int64) * (2 * inter)
    g = tl.load(row + cols, mask=mask, other=0.0)
    u = tl.load(row + inter + cols, mask=mask, other=0.0)
    gf = g.to(tl.float32)
    s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
    y = s.to(tl.float32) * u.to(tl.float32)
    tl.store(out_ptr + t.to(tl.int64) * inter + cols, y.to(g.dtype), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2I] → silu(gate) · up [T, I]."""
    gate_up = gate_up.contiguous()
    inter = gate_up.shape[-1] // 2
    rows = gate_up.numel() // gate_up.shape[-1] if gate_up.numel() else 0
    out = gate_up.new_empty(gate_up.shape[:-1] + (inter,))
    if rows:
        _silu_mul[(rows, triton.cdiv(inter, 1024))](gate_up, out, inter, BLOCK=1024, num_warps=4)
    return out
