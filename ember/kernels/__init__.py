"""Fused ops for the hot path, each with its torch reference beside it.

Layers call these instead of chains of small torch ops. On a CPU where ember's kernels built
(ember/kernels/cpu), fp32 and bf16 tensors go through one kernel call each; CUDA tensors go to the
Triton fusions of ember/kernels/triton_cuda.py where triton imports; everywhere else (other
devices, other dtypes, no compiler) the torch code below runs, and it is what tests compare with.
"""
from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn.functional as F

from ember.kernels import cpu

_DTYPES = {torch.float32: cpu.DTYPE_CODES["float32"], torch.bfloat16: cpu.DTYPE_CODES["bfloat16"]}


def kernel_dtype(dtype: torch.dtype) -> int:
    """The code ember's CPU kernels take for a tensor dtype (fp32 or bf16)."""
    return _DTYPES[dtype]


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


@functools.cache
def _triton_fusions():
    try:
        from ember.kernels import triton_cuda
    except ImportError:
        return None
    return triton_cuda


def gpu_kernels(t: torch.Tensor):
    """The Triton fusions (ember/kernels/triton_cuda.py) when they can serve this tensor."""
    return _triton_fusions() if t.device.type == "cuda" else None


def cpu_kernels(t: torch.Tensor) -> ctypes.CDLL | None:
    """ember's CPU kernel library when it can serve this tensor, else None."""
    if t.device.type != "cpu" or t.dtype not in _DTYPES:
        return None
    return cpu.library()


def _linear_kernel_takes(weight: torch.Tensor) -> bool:
    n, k = weight.shape
    return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and n % 32 == 0
            and k % 2 == 0 and cpu.has_linear_bf16())


def _pack(w: torch.Tensor) -> torch.Tensor:
    """[N, K] → [N/32][K/2][32][2], flat: for each pair of inputs, 32 outputs side by side."""
    n, k = w.shape
    if w.element_size() == 2:    # move each pair as one 4-byte element: a plain 3-D transpose, 2x faster
        pairs = w.contiguous().view(torch.int32).reshape(n // 32, 32, k // 2)
        return pairs.transpose(1, 2).contiguous().view(w.dtype).view(-1)
    return w.reshape(n // 32, 32, k // 2, 2).permute(0, 2, 1, 3).contiguous().view(-1)


def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """The layout ember's bf16 linear kernel reads, or None where that kernel does not serve this
    weight (other device or dtype, shapes, no AVX-512). A copy: the caller keeps `weight`
    for everything else (tied embeddings, weight updates, the torch path)."""
    return _pack(weight) if _linear_kernel_takes(weight) else None


def _int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] → (q int8 [N, K], scales [N]): symmetric, one fp32 scale per output row,
    q = round(w / s), s = max|w_row| / 127."""
    w = weight.float()
    scales = (w.abs().amax(dim=1) / 127).clamp_min(1e-12)
    return torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8), scales.contiguous()


def quantize_linear_weight_int8(weight: torch.Tensor
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Weight-only int8 for the CPU kernel (_int8_rows). Returns (q packed like
    pack_linear_weight, the scales, q · s: the weight the kernel computes with), or None where
    the kernel does not serve this weight."""
    if not _linear_kernel_takes(weight):
        return None
    q, scales = _int8_rows(weight)
    return _pack(q), scales, q.float() * scales[:, None]


W8A8_BLOCK = 64     # inputs per activation scale (kernels.cpp, linear_w8a8)


def quantize_linear_weight_w8a8(weight: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    """int8 weights for the W8A8 kernel (int8 activations too, quantized per block of 64 inputs
    as each call runs; kernels.cpp, linear_w8a8): the weight quantized as
    quantize_linear_weight_int8 does, packed [N/32][K/4][32][4], with its scales, the offsets
    [N/32][K/64][32] (−128 · Σ q over each block of 64 inputs: the kernel's inputs are q_x + 128)
    and q · s. None where the kernel does not serve this weight (no VNNI, other device or dtype,
    K not a multiple of 64)."""
    if not (_linear_kernel_takes(weight) and weight.shape[1] % W8A8_BLOCK == 0
            and cpu.has_w8a8()):
        return None
    n, k = weight.shape
    q, scales = _int8_rows(weight)
    packed = q.view(n // 32, 32, k // 4, 4).permute(0, 2, 1, 3).contiguous().view(-1)
    sums = q.view(n, k // W8A8_BLOCK, W8A8_BLOCK).sum(-1, dtype=torch.int32)
    offsets = (-128 * sums).view(n // 32, 32, -1).transpose(1, 2).contiguous().view(-1)
    return packed, scales, offsets, q.float() * scales[:, None]


def quantize_activations_w8a8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What linear_w8a8 makes of its input x [..., K]: q [..., K/64, 64] (integers in
    [−127, 127], as fp32) and s [..., K/64, 1], x ≈ q · s per block of 64 inputs."""
    xf = x.float().unflatten(-1, (-1, W8A8_BLOCK))
    amax = xf.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    return torch.round(xf * inv), amax / 127


def linear_w8a8_reference(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """The function linear_w8a8 computes, in torch: x's blocks quantized as the kernel does,
    times the int8 weight (weight / scales), summed exactly (fp64), scaled and rounded to x's
    dtype."""
    q, s = quantize_activations_w8a8(x)
    qw = torch.round(weight.double() / scales.double()[:, None])
    y = torch.einsum("...bk,nbk->...bn", q.double(), qw.unflatten(-1, (-1, W8A8_BLOCK)))
    y = (y * s.double()).sum(-2) * scales.double()
    if bias is not None:
        y = y + bias.double()
    return y.to(x.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           packed: torch.Tensor | None = None, scales: torch.Tensor | None = None,
           offsets: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] · weight [N, K]ᵀ (+ bias). With `packed` (pack_linear_weight of this weight, or
    quantize_linear_weight_int8 with its `scales`, or quantize_linear_weight_w8a8 with its
    `scales` and `offsets`), ember's kernel runs; otherwise torch's, on `weight` (for W8A8:
    linear_w8a8_reference)."""
    if (packed is not None and x.dim() == 2 and x.dtype == torch.bfloat16 and x.stride(1) == 1
            and (bias is None or bias.dtype == torch.bfloat16)):
        m, k = x.shape
        n = weight.shape[0]
        y = torch.empty(m, n, dtype=x.dtype)
        if offsets is not None:
            cpu.library().ember_linear_w8a8(x.data_ptr(), x.stride(0), packed.data_ptr(),
                                            scales.data_ptr(), offsets.data_ptr(), _ptr(bias),
                                            y.data_ptr(), n, m, n, k)
        elif scales is None:
            cpu.library().ember_linear_bf16(x.data_ptr(), x.stride(0), packed.data_ptr(),
                                            _ptr(bias), y.data_ptr(), n, m, n, k)
        else:
            cpu.library().ember_linear_w8(x.data_ptr(), x.stride(0), packed.data_ptr(),
                                          scales.data_ptr(), _ptr(bias), y.data_ptr(), n, m, n, k)
        return y
    if offsets is not None:             # an input the W8A8 kernel does not take
        return linear_w8a8_reference(x, weight, scales, bias)
    return F.linear(x, weight, bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None):
    """RMSNorm in fp32, optionally fused with the residual add: returns out, or (out, x + residual)."""
    if (gpu := gpu_kernels(x)) is not None:
        return gpu.rms_norm(x, weight, eps, residual)
    lib = cpu_kernels(x)
    if lib is not None and residual is None and x.stride(-1) == 1:
        x = x.contiguous()       # e.g. Qwen3's q/k heads, views of the qkv projection
    if lib is not None and weight.dtype == x.dtype and x.is_contiguous() and x.shape[-1] % 16 == 0 and (
            residual is None or (residual.is_contiguous() and residual.dtype == x.dtype)):
        out = torch.empty_like(x)
        summed = None if residual is None else torch.empty_like(x)
        lib.ember_rms_norm(_DTYPES[x.dtype], x.data_ptr(), _ptr(residual), _ptr(summed),
                           weight.data_ptr(), out.data_ptr(), x.numel() // x.shape[-1],
                           x.shape[-1], eps)
        return out if residual is None else (out, summed)
    if residual is not None:
        residual = x + residual
        x = residual
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * h.to(dtype)
    return out if residual is None else (out, residual)


def linear_silu_and_mul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                        packed: torch.Tensor | None = None, scales: torch.Tensor | None = None,
                        offsets: torch.Tensor | None = None) -> torch.Tensor:
    """silu_and_mul(linear(x, weight, bias, packed, scales)) for a gate_up weight [2I, K]; with
    `packed` ember's kernel does both in one pass (the same bits: the gate and up values are
    rounded as the [M, 2I] tensor would hold them)."""
    inter = weight.shape[0] // 2
    if offsets is not None:            # W8A8: the product, then SiLU·mul
        return silu_and_mul(linear(x, weight, bias, packed, scales, offsets))
    if (packed is not None and bias is None and inter % 32 == 0 and x.dim() == 2
            and x.dtype == torch.bfloat16 and x.stride(1) == 1):
        out = torch.empty(x.shape[0], inter, dtype=x.dtype)
        cpu.library().ember_linear_silu(x.data_ptr(), x.stride(0), packed.data_ptr(),
                                        _ptr(scales), out.data_ptr(), inter, x.shape[0], inter,
                                        x.shape[1])
        return out
    return silu_and_mul(linear(x, weight, bias, packed, scales))


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2I] → silu(gate) · up [T, I]."""
    if (gpu := gpu_kernels(gate_up)) is not None:
        return gpu.silu_and_mul(gate_up)
    lib = cpu_kernels(gate_up)
    inter = gate_up.shape[-1] // 2
    if lib is not None and gate_up.is_contiguous() and inter % 16 == 0:
        out = gate_up.new_empty(gate_up.shape[:-1] + (inter,))
        lib.ember_silu_mul(_DTYPES[gate_up.dtype], gate_up.data_ptr(), out.data_ptr(),
                           gate_up.numel() // gate_up.shape[-1], inter)
        return out
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def argmax(x: torch.Tensor) -> torch.Tensor:
    """torch.argmax(x, -1) of a 2-D tensor; on the CPU read once in its dtype (no fp32 copy)."""
    lib = cpu_kernels(x)
    if lib is not None and x.dim() == 2 and x.stride(-1) == 1 and x.shape[1] > 0:
        out = torch.empty(x.shape[0], dtype=torch.long)
        lib.ember_argmax(_DTYPES[x.dtype], x.data_ptr(), x.stride(0), x.shape[0], x.shape[1],
                         out.data_ptr())
        return out
    return x.argmax(-1)


class GreedyHead:
    """The tokens greedy rows sample, argmax(x · Wᵀ) over an LM head W: the index
    argmax(linear(x, W, packed)) gives, without computing every logit. ember_greedy_head
    (kernels.cpp) screens all outputs with int8 dot products and error bounds that hold for any
    input, then computes exactly only the 32-output panels that could hold the maximum.

    Its own int8 copy of W costs N·K bytes (half the bf16 panels). `panels_computed`: how many
    panels the last call computed exactly, over all its rows (of N/32 per row)."""

    def __init__(self, packed: torch.Tensor, n: int, k: int) -> None:
        self.packed, self.n, self.k = packed, n, k
        self.q = torch.empty(n * k, dtype=torch.int8)
        self.colsum = torch.empty(n, dtype=torch.int32)
        self.scale, self.err_norm, self.w_norm = (torch.empty(n) for _ in range(3))
        cpu.library().ember_greedy_head_prepare(
            packed.data_ptr(), n, k, self.q.data_ptr(), self.colsum.data_ptr(),
            self.scale.data_ptr(), self.err_norm.data_ptr(), self.w_norm.data_ptr())
        self.panels_computed = 0

    @classmethod
    def prepare(cls, weight: torch.Tensor, packed: torch.Tensor | None) -> GreedyHead | None:
        """For W and its bf16 packing (pack_linear_weight), or None where the kernel cannot serve."""
        lib = cpu_kernels(weight)
        if (packed is None or packed.dtype != torch.bfloat16 or lib is None
                or not lib.ember_has_greedy_head() or weight.shape[1] % 4):
            return None
        return cls(packed, *weight.shape)

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        """x [M, K] → token ids [M] (int64), or None for an x it does not take (the caller then
        computes the logits)."""
        if x.dim() != 2 or x.dtype != torch.bfloat16 or x.stride(1) != 1 or x.device.type != "cpu":
            return None
        out = torch.empty(x.shape[0], dtype=torch.long)
        computed = ctypes.c_int64(0)
        cpu.library().ember_greedy_head(
            x.data_ptr(), x.stride(0), x.shape[0], self.packed.data_ptr(), self.q.data_ptr(),
            self.colsum.data_ptr(), self.scale.data_ptr(), self.err_norm.data_ptr(),
            self.w_norm.data_ptr(), self.n, self.k, out.data_ptr(), ctypes.byref(computed))
        self.panels_computed = computed.value
        return out


def rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor):
    """Neox-style rotary embedding of q [T, H, D] and k [T, Hkv, D] (views are fine); cos_sin
    [max_pos, D] is (cos | sin). Returns the rotated q and k: new tensors on the CPU, q and k
    themselves rotated in place on CUDA (callers pass fresh views and use only the results)."""
    if (gpu := gpu_kernels(q)) is not None:
        return gpu.rotary(positions, q, k, cos_sin)
    lib = cpu_kernels(q)
    d = q.shape[-1]
    if (lib is not None and d % 32 == 0 and k.dtype == q.dtype == cos_sin.dtype
            and q.stride(-1) == 1 and k.stride(-1) == 1 and q.stride(1) == d and k.stride(1) == d
            and cos_sin.is_contiguous() and positions.dtype == torch.int64
            and positions.is_contiguous()):
        q_out, k_out = torch.empty(q.shape, dtype=q.dtype), torch.empty(k.shape, dtype=k.dtype)
        lib.ember_rotary(_DTYPES[q.dtype], q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0),
                         q_out.data_ptr(), k_out.data_ptr(), positions.data_ptr(),
                         cos_sin.data_ptr(), q.shape[0], q.shape[1], k.shape[1], d)
        return q_out, k_out
    cos, sin = cos_sin[positions].unsqueeze(1).chunk(2, dim=-1)   # [T, 1, D/2] each
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
