"""ember's CPU kernels (ember/kernels/cpu) against the torch code they replace, and the bf16
linear kernel against an fp32 matmul. Paged decode attention is checked with the other attention
backends in test_layers.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ember import kernels
from ember.kernels import cpu

pytestmark = pytest.mark.skipif(cpu.library() is None,
                                reason="ember's CPU kernels need AVX-512 and a C++ compiler")
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture
def torch_only(monkeypatch):
    """Run a kernels.* function on its torch path."""
    def run(fn, *args, **kw):
        with monkeypatch.context() as m:
            m.setattr(cpu, "library", lambda: None)
            m.setattr(cpu, "has_linear_bf16", lambda: False)
            return fn(*args, **kw)
    return run


def _exact_or_close(got, want):
    # bf16 rounds at the same places as the torch code: identical. fp32 may differ in sum order.
    tol = 0 if got.dtype == torch.bfloat16 else 2e-6
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_torch(dtype, torch_only):
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(11, 576, generator=g)).to(dtype)
    res = torch.randn(11, 576, generator=g).to(dtype)
    w = (1 + 0.3 * torch.randn(576, generator=g)).to(dtype)
    _exact_or_close(kernels.rms_norm(x, w, 1e-5), torch_only(kernels.rms_norm, x, w, 1e-5))
    res_before = res.clone()
    out, summed = kernels.rms_norm(x, w, 1e-5, res)
    ref_out, ref_summed = torch_only(kernels.rms_norm, x, w, 1e-5, res)
    torch.testing.assert_close(summed, ref_summed, rtol=0, atol=0)
    _exact_or_close(out, ref_out)
    assert torch.equal(res, res_before)        # the caller's residual is not overwritten


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_matches_torch(dtype, torch_only):
    g = torch.Generator().manual_seed(1)
    gate_up = (4 * torch.randn(9, 2 * 1536, generator=g)).to(dtype)
    gate_up[0, :4] = torch.tensor([-120.0, 90.0, 0.0, -0.0])     # exp under- and overflow sides
    _exact_or_close(kernels.silu_and_mul(gate_up), torch_only(kernels.silu_and_mul, gate_up))


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_matches_torch_on_qkv_views(dtype, head_dim, torch_only):
    g = torch.Generator().manual_seed(2)
    t, hq, hk = 7, 6, 2
    qkv = torch.randn(t, (hq + 2 * hk) * head_dim, generator=g).to(dtype)
    q = qkv[:, :hq * head_dim].view(t, hq, head_dim)
    k = qkv[:, hq * head_dim:(hq + hk) * head_dim].view(t, hk, head_dim)
    cos_sin = torch.randn(50, head_dim, generator=g).to(dtype)
    pos = torch.tensor([0, 49, 3, 3, 17, 8, 1])
    before = qkv.clone()
    got_q, got_k = kernels.rotary(pos, q, k, cos_sin)
    ref_q, ref_k = torch_only(kernels.rotary, pos, q, k, cos_sin)
    _exact_or_close(got_q, ref_q)
    _exact_or_close(got_k, ref_k)
    assert torch.equal(qkv, before)            # inputs untouched


@pytest.mark.skipif(not cpu.has_linear_bf16(), reason="needs AVX-512 and a compiler")
@pytest.mark.parametrize("m", [1, 3, 12, 13, 64, 200])
@pytest.mark.parametrize("k,n", [(576, 960), (40, 32), (1536, 64), (98, 96)])
def test_linear_bf16_matches_fp32_matmul(m, k, n):
    g = torch.Generator().manual_seed(m * 1000 + n)
    x_wide = torch.randn(m, k + 8, generator=g).bfloat16()
    x = x_wide[:, 3:3 + k]                                # a strided view, as after a split
    w = (torch.randn(n, k, generator=g) / k ** 0.5).bfloat16()
    bias = torch.randn(n, generator=g).bfloat16()
    packed = kernels.pack_linear_weight(w)
    assert packed is not None
    ref = x.float() @ w.float().T + bias.float()
    got = kernels.linear(x, w, bias, packed)
    assert got.dtype == torch.bfloat16 and got.shape == (m, n)
    # fp32 accumulation, one rounding to bf16 at the end: within one bf16 ulp of the exact value
    torch.testing.assert_close(got.float(), ref, rtol=2 ** -7, atol=1e-3)
    # and no further from it than torch's own bf16 linear, give or take one rounding
    torch_err = (F.linear(x, w, bias).float() - ref).abs().max()
    assert (got.float() - ref).abs().max() <= 2 * torch_err + 1e-2


@pytest.mark.parametrize("shape,dtype", [((33, 64), torch.bfloat16), ((32, 63), torch.bfloat16),
                                         ((64, 64), torch.float32)])
def test_weights_the_kernel_cannot_take_stay_on_torch(shape, dtype):
    w = torch.randn(*shape).to(dtype)
    assert kernels.pack_linear_weight(w) is None
    x = torch.randn(5, shape[1]).to(dtype)
    torch.testing.assert_close(kernels.linear(x, w, None, None), F.linear(x, w), rtol=0, atol=0)


def test_model_linears_are_packed_in_bf16_only():
    from ember.layers.linear import QKVParallelLinear
    layer = QKVParallelLinear(64, 16, 4, 2)
    layer.weight.data.normal_()
    layer.pack_weight()
    assert layer.packed is None                       # fp32: torch's linear (MKL) serves
    layer = layer.to(torch.bfloat16)
    layer.pack_weight()
    if cpu.has_linear_bf16():
        assert layer.packed is not None and layer.packed.numel() == layer.weight.numel()
        x = torch.randn(3, 64).bfloat16()
        torch.testing.assert_close(layer(x).float(), x.float() @ layer.weight.float().T,
                                   rtol=2 ** -7, atol=1e-3)


def test_bf16_kernels_serve_with_or_without_bf16_dot_products():
    """The bf16 kernels serve on every AVX-512 CPU the library builds on; the dot products of bf16
    pairs run in hardware exactly where the CPU has AVX-512 BF16, else as fp32 FMAs."""
    flags = cpu._cpu_flags().split()
    assert cpu.has_linear_bf16()
    assert cpu.has_bf16_dot() == ("avx512_bf16" in flags)
    w = torch.randn(64, 32).bfloat16()
    assert kernels.pack_linear_weight(w) is not None


def test_library_is_cached_on_disk(tmp_path, monkeypatch):
    """A second process finds the built library instead of compiling again."""
    import os
    monkeypatch.setenv("EMBER_CACHE_DIR", str(tmp_path))
    path = cpu._build("g++")
    assert os.path.exists(path) and path.startswith(str(tmp_path))
    mtime = os.path.getmtime(path)
    assert cpu._build("g++") == path and os.path.getmtime(path) == mtime


@pytest.mark.skipif(not cpu.has_linear_bf16(), reason="needs AVX-512 and a compiler")
@pytest.mark.parametrize("m", [1, 5, 40])
def test_int8_linear_matches_its_dequantized_weight(m):
    g = torch.Generator().manual_seed(m)
    w = (torch.randn(96, 200, generator=g) / 14).bfloat16()
    w[3] = 0                                           # an all-zero row must not divide by zero
    packed, scales, dequantized = kernels.quantize_linear_weight_int8(w)
    assert packed.dtype == torch.int8 and scales.shape == (96,)
    deq = (packed.view(3, 100, 32, 2).permute(0, 2, 1, 3).reshape(96, 200).float()
           * scales[:, None])
    assert (deq - w.float()).abs().max() <= scales.max() / 2 + 1e-6     # round to nearest
    torch.testing.assert_close(dequantized, deq, rtol=0, atol=0)        # what the layer keeps
    x = torch.randn(m, 200, generator=g).bfloat16()
    bias = torch.randn(96, generator=g).bfloat16()
    got = kernels.linear(x, w, bias, packed, scales)
    torch.testing.assert_close(got.float(), x.float() @ deq.T + bias.float(), rtol=2 ** -7,
                               atol=1e-2)


needs_w8a8 = pytest.mark.skipif(not cpu.has_w8a8(), reason="needs AVX-512 VNNI and a compiler")


@needs_w8a8
@pytest.mark.parametrize("m", [1, 4, 5, 13, 64, 170])
@pytest.mark.parametrize("k,n", [(576, 960), (64, 32), (1536, 64)])
def test_w8a8_linear_matches_its_reference(m, k, n):
    """The kernel's int8 sums are exact: it differs from the torch reference (same quantization,
    fp64 sums) only by fp32 rounding, then one bf16 rounding of the output."""
    g = torch.Generator().manual_seed(m * k + n)
    w = (torch.randn(n, k, generator=g) / 14).bfloat16()
    w[1] = 0                                           # an all-zero weight row
    packed, scales, offsets, dequantized = kernels.quantize_linear_weight_w8a8(w)
    q = torch.round(w.float() / scales[:, None])
    # the layout: [N/32][K/4][32][4], offsets [N/32][K/64][32] = −128 · Σ q per block of 64
    assert torch.equal(packed.view(n // 32, k // 4, 32, 4).permute(0, 2, 1, 3).reshape(n, k),
                       q.to(torch.int8))
    assert torch.equal(offsets.view(n // 32, k // 64, 32).transpose(1, 2).reshape(n, k // 64),
                       (-128 * q.view(n, k // 64, 64).sum(-1)).int())
    torch.testing.assert_close(dequantized, q * scales[:, None], rtol=0, atol=0)
    x = torch.randn(m, k, generator=g).bfloat16()
    x[:, 5] *= 40                                      # an outlier input dim
    x[0] = 0                                           # an all-zero row: scale 0, no NaN
    bias = torch.randn(n, generator=g).bfloat16()
    weight = dequantized.bfloat16()
    for b in (None, bias):
        got = kernels.linear(x, weight, b, packed, scales, offsets).float()
        ref = kernels.linear_w8a8_reference(x, weight, scales, b).float()
        assert got.isfinite().all()
        ulp = ref.abs().amax(-1, keepdim=True).clamp_min(1e-6) * 2 ** -7   # one bf16 step at the top
        assert ((got - ref).abs() <= ulp).all()
        # and the reference is the product it approximates: int8 steps of both operands
        exact = x.float() @ w.float().T + (0 if b is None else b.float())
        assert ((ref - exact).abs() <= 0.05 * exact.abs().amax(-1, keepdim=True) + 0.02).all()


@needs_w8a8
def test_w8a8_takes_only_what_its_kernel_can():
    assert kernels.quantize_linear_weight_w8a8(torch.randn(64, 96).bfloat16()) is None   # K % 64
    assert kernels.quantize_linear_weight_w8a8(torch.randn(64, 128)) is None             # fp32
    w = (torch.randn(64, 128) / 10).bfloat16()
    packed, scales, offsets, deq = kernels.quantize_linear_weight_w8a8(w)
    x = torch.randn(3, 2, 128)                          # not [M, K] bf16: the torch reference
    got = kernels.linear(x, deq.bfloat16(), None, packed, scales, offsets)
    torch.testing.assert_close(got, kernels.linear_w8a8_reference(x, deq.bfloat16(), scales))
    assert got.shape == (3, 2, 64)


def _greedy_head(w: torch.Tensor):
    packed = kernels.pack_linear_weight(w)
    head = kernels.GreedyHead.prepare(w, packed)
    assert head is not None
    return head, lambda x: kernels.argmax(kernels.linear(x, w, packed=packed))


needs_greedy_head = pytest.mark.skipif(
    not (cpu.has_linear_bf16() and cpu.library().ember_has_greedy_head()),
    reason="needs AVX-512 VNNI and a compiler")


@needs_greedy_head
@pytest.mark.parametrize("m", [1, 7, 8, 13, 64, 170])
@pytest.mark.parametrize("n,k", [(4096, 576), (1024, 64), (2048, 100)])
def test_greedy_head_gives_the_argmax_of_the_logits(m, n, k):
    """The same token ids as argmax(linear(x)) over bf16 logits, with a few large input dims (as
    the final norm leaves them) and rows of every size class; and the screen does screen."""
    g = torch.Generator().manual_seed(m * 7 + n + k)
    w = (torch.randn(n, k, generator=g) * 0.05).bfloat16()
    head, reference = _greedy_head(w)
    x = torch.randn(m, k, generator=g)
    x[:, 3] *= 40
    x[:, k // 2] *= -25
    x[0] *= 1e-3 if m > 1 else 1                       # a small row: the margin's +1 dominates
    if m > 2:
        x[1] = 0                                       # all logits 0: the first index
    x = x.bfloat16()
    assert torch.equal(head(x), reference(x))
    # (rows 0 and 1 keep every panel: all their logits are within the margin of each other)
    ordinary = x[2:] if m > 2 else x
    assert torch.equal(head(ordinary), reference(ordinary))
    assert head.panels_computed < 0.2 * len(ordinary) * n / 32


@needs_greedy_head
def test_greedy_head_ties_go_to_the_first_index():
    g = torch.Generator().manual_seed(5)
    w = (torch.randn(2048, 128, generator=g) * 0.05).bfloat16()
    w[1500] = w[700]
    w[40] = w[700]                        # three equal rows, in different panels
    w[41] = w[700]
    w[41, 0] += 2 ** -14                  # a fourth a hair away: equal or not once in bf16
    head, reference = _greedy_head(w)
    x = (w[700].float() * torch.linspace(0.5, 30, 24)[:, None]).bfloat16()
    got = head(x)
    assert torch.equal(got, reference(x)) and set(got.tolist()) <= {40, 41}


@needs_greedy_head
def test_greedy_head_non_finite_rows_answer_as_argmax():
    g = torch.Generator().manual_seed(6)
    w = (torch.randn(1024, 64, generator=g) * 0.05).bfloat16()
    head, reference = _greedy_head(w)
    x = torch.randn(5, 64, generator=g)
    x[1, 10] = float("nan")
    x[2, 20] = float("inf")
    x[3, 30] = -float("inf")
    x = x.bfloat16()
    assert torch.equal(head(x), reference(x))


def test_greedy_head_takes_only_what_it_can():
    w = torch.randn(64, 64)
    assert kernels.GreedyHead.prepare(w, kernels.pack_linear_weight(w)) is None    # fp32
    w = w.bfloat16()
    assert kernels.GreedyHead.prepare(w, None) is None                             # unpacked
    wk = torch.randn(64, 66).bfloat16()                                            # K % 4
    assert kernels.GreedyHead.prepare(wk, kernels.pack_linear_weight(wk)) is None


@needs_greedy_head
@pytest.mark.parametrize("seed", range(4))
def test_greedy_head_exact_where_the_int8_estimate_is_coarse(seed):
    """More large input dims than the kernel takes out exactly (so the int8 scale is coarse and
    the estimates are off by more than the logits' gaps): the bounds still keep the winner."""
    g = torch.Generator().manual_seed(seed)
    n, k = 2048, 256
    large = slice(0, 120, 2)             # 60 large dims, each in its own pair
    w = torch.randn(n, k, generator=g) * 0.05
    w[:, large] = 0                      # they only coarsen the scale: close logits, poor estimates
    w = w.bfloat16()
    head, reference = _greedy_head(w)
    x = torch.randn(32, k, generator=g)
    x[:, large] *= 60
    x = x.bfloat16()
    assert torch.equal(head(x), reference(x))
