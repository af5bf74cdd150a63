"""Layers against their references: rotary embeddings and RMSNorm against transformers, the torch
attention backend over a paged KV cache against dense causal attention computed in float64."""
from __future__ import annotations


import pytest
import torch

from ember.attention import BatchLayout, get_backend
from ember.kernels import cpu as cpu_kernels
from ember.layers.norm import RMSNorm
from ember.layers.rotary import RotaryEmbedding, rope_frequencies

# ---- rotary embedding ------------------------------------------------------------------------

ROPE_CASES = {
    "default": (None, 2048),
    "linear": ({"rope_type": "linear", "factor": 4.0}, 2048),
    "llama3": ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}, 1024),
    "llama3-8k": ({"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}, 131072),
    "yarn": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}, 1024),
    "yarn-implicit-orig": ({"rope_type": "yarn", "factor": 2.0}, 512),
    "yarn-mscale": ({"rope_type": "yarn", "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 0.5,
                     "beta_fast": 16, "beta_slow": 2, "original_max_position_embeddings": 128}, 4096),
    "yarn-attention-factor": ({"rope_type": "yarn", "factor": 8.0, "attention_factor": 0.8,
                               "original_max_position_embeddings": 128}, 1024),
    "dynamic-within-range": ({"rope_type": "dynamic", "factor": 2.0}, 1024),
}
HEAD_DIMS = [16, 64]
THETA = 10000.0


def _hf_config(head_dim: int, scaling: dict | None, max_pos: int):
    from transformers import LlamaConfig

    rope = dict(scaling or {"rope_type": "default"})
    rope["rope_theta"] = THETA
    return LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
                       max_position_embeddings=max_pos, rope_parameters=rope)


def _hf_inv_freq(cfg) -> tuple[torch.Tensor, float]:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    kind = cfg.rope_parameters["rope_type"]
    if kind == "default":
        return LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)
    return ROPE_INIT_FUNCTIONS[kind](cfg, torch.device("cpu"))


def _ours(head_dim, scaling, max_pos) -> RotaryEmbedding:
    orig = (scaling or {}).get("original_max_position_embeddings", max_pos)
    rope = RotaryEmbedding(head_dim, THETA, scaling, max_pos, orig)
    rope.build_cache(torch.device("cpu"), torch.float32)
    return rope


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_rope_frequencies_match_transformers(case, head_dim):
    scaling, max_pos = ROPE_CASES[case]
    cfg = _hf_config(head_dim, scaling, max_pos)
    ref_inv, ref_scale = _hf_inv_freq(cfg)
    orig = cfg.rope_parameters.get("original_max_position_embeddings", max_pos)
    inv, scale = rope_frequencies(head_dim, THETA, scaling, max_pos, orig)
    torch.testing.assert_close(inv, ref_inv.float(), rtol=1e-6, atol=0)
    assert scale == pytest.approx(ref_scale, rel=1e-6)


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_rotary_application_matches_transformers(case, head_dim):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    scaling, max_pos = ROPE_CASES[case]
    cfg = _hf_config(head_dim, scaling, max_pos)
    hf_rope = LlamaRotaryEmbedding(cfg)
    ours = _ours(head_dim, scaling, max_pos)
    g = torch.Generator().manual_seed(0)
    positions = torch.cat([torch.arange(0, 40), torch.randint(0, max_pos, (40,), generator=g),
                           torch.tensor([max_pos - 1])])
    t = len(positions)
    q = torch.randn(t, 4, head_dim, generator=g)
    k = torch.randn(t, 2, head_dim, generator=g)
    cos, sin = hf_rope(q, positions[None])                           # [1, T, D]
    ref_q, ref_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    got_q, got_k = ours(positions, q, k)
    # the angle position * inv_freq is rounded the same way; the table and HF differ only in
    # where cos/sin of large angles are evaluated
    tol = 2e-5 * max(1.0, max_pos / 2048)
    torch.testing.assert_close(got_q, ref_q[0].transpose(0, 1), rtol=0, atol=tol)
    torch.testing.assert_close(got_k, ref_k[0].transpose(0, 1), rtol=0, atol=tol)


def test_rotary_is_relative():
    """<rot(q, m), rot(k, n)> depends on m - n only (a property no table bug keeps)."""
    rope = _ours(32, None, 512)
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 1, 32, generator=g), torch.randn(1, 1, 32, generator=g)

    def dot(m, n):
        qm, _ = rope(torch.tensor([m]), q, k)
        _, kn = rope(torch.tensor([n]), q, k)
        return (qm * kn).sum().item()

    assert dot(10, 3) == pytest.approx(dot(107, 100), abs=1e-4)
    assert dot(10, 3) != pytest.approx(dot(10, 4), abs=1e-4)


def test_unknown_rope_type_is_rejected():
    with pytest.raises(ValueError):
        rope_frequencies(16, THETA, {"rope_type": "nonsense", "factor": 2.0}, 128, 128)


# ---- argmax (greedy sampling) -----------------------------------------------------------------

@pytest.mark.skipif(cpu_kernels.library() is None, reason="ember's CPU kernels are not built here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_kernel_matches_torch(dtype):
    """First index of the maximum (ties, a tail past the 16-wide vectors), or of the first NaN,
    on rows with a stride, as torch.argmax does."""
    from ember import kernels
    g = torch.Generator().manual_seed(3)
    wide = torch.randn(9, 1000, generator=g).to(dtype)
    x = wide[:, :997]                        # 997 columns: a tail; rows strided by 1000
    x[1, 5] = x[1, 700] = x[1].max() + 1     # a tie: the first wins
    x[2, 996] = x[2].max() + 1               # the maximum in the tail
    x[3, 40] = x[3, 900] = float("nan")      # NaN: the first NaN wins
    x[4, 990] = float("nan")                 # NaN in the tail only
    x[5] = float("-inf")                     # all -inf: index 0
    x[6, 20] = float("inf")
    got = kernels.argmax(x)
    assert torch.equal(got, x.argmax(-1)), (got, x.argmax(-1))
    assert got[1] == 5 and got[2] == 996 and got[3] == 40 and got[4] == 990 and got[5] == 0


# ---- linear + SiLU·mul in one pass -------------------------------------------------------------

@pytest.mark.skipif(not cpu_kernels.has_linear_bf16(), reason="needs AVX-512 and a compiler")
@pytest.mark.parametrize("quantization", [None, "int8"])
@pytest.mark.parametrize("rows", [1, 5, 37, 200])
def test_linear_silu_and_mul_equals_the_two_steps(rows, quantization):
    """The fused gate_up + SiLU·mul kernel gives the bits of linear then silu_and_mul: the same
    weights, few rows (the fused tiles and their tails) and many (gate and up panels in turn),
    more rows than one row block, bf16 and int8 weights."""
    from ember import kernels
    g = torch.Generator().manual_seed(4)
    inter, k = 64, 96
    weight = (0.2 * torch.randn(2 * inter, k, generator=g)).to(torch.bfloat16)
    x = torch.randn(rows, k, generator=g).to(torch.bfloat16)
    scales = None
    if quantization == "int8":
        packed, scales, dequantized = kernels.quantize_linear_weight_int8(weight)
        weight = dequantized.to(torch.bfloat16)
    else:
        packed = kernels.pack_linear_weight(weight)
    fused = kernels.linear_silu_and_mul(x, weight, None, packed, scales)
    two_steps = kernels.silu_and_mul(kernels.linear(x, weight, None, packed, scales))
    assert fused.shape == (rows, inter)
    assert torch.equal(fused, two_steps)
    # and both are SiLU·mul of the product, within bf16 rounding
    ref = (x.float() @ weight.float().T)
    ref = torch.nn.functional.silu(ref[:, :inter]) * ref[:, inter:]
    torch.testing.assert_close(fused.float(), ref, rtol=0.05, atol=0.05)


# ---- RMSNorm ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_transformers(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    g = torch.Generator().manual_seed(2)
    dim, eps = 96, 1e-5
    ref = LlamaRMSNorm(dim, eps=eps)
    ours = RMSNorm(dim, eps)
    weight = 1 + 0.5 * torch.randn(dim, generator=g)
    ref.weight.data.copy_(weight)
    ours.weight.data.copy_(weight)
    ref, ours = ref.to(dtype), ours.to(dtype)
    x = (3 * torch.randn(7, 5, dim, generator=g)).to(dtype)
    residual = torch.randn(7, 5, dim, generator=g).to(dtype)
    # bf16 rounds away the order of the fp32 sum of squares; in fp32 the kernel's order shows
    tol = 0 if dtype == torch.bfloat16 else 2e-6
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=tol, atol=tol)
        normed, new_residual = ours(x, residual)
        torch.testing.assert_close(new_residual, x + residual, rtol=0, atol=0)
        torch.testing.assert_close(normed, ref(x + residual), rtol=tol, atol=tol)
    assert ours(x).dtype == dtype


# ---- paged attention vs dense causal attention ----------------------------------------------

def _dense_reference(q, k, v, start: int, scale: float, window: int | None) -> torch.Tensor:
    """q [Q, H, D] at positions start..start+Q-1; k, v [L, Hkv, D] for positions 0..L-1."""
    q, k, v = q.double(), k.double(), v.double()
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    qpos = torch.arange(start, start + q.shape[0])[:, None]
    kpos = torch.arange(k.shape[0])[None, :]
    allowed = kpos <= qpos
    if window is not None:
        allowed &= kpos > qpos - window
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def _step(backend, cache, seqs, block_size):
    """One backend call. seqs: [(start position, q [n, H, D], k [n, Hkv, D], v, block table)],
    decodes (n == 1) first as the runner orders them."""
    qlens = torch.tensor([q.shape[0] for _, q, _, _, _ in seqs])
    starts = torch.tensor([s for s, *_ in seqs])
    width = max(len(t) for *_, t in seqs)
    layout = BatchLayout(
        query_lens=qlens, context_lens=starts + qlens,
        positions=torch.cat([torch.arange(s, s + q.shape[0]) for s, q, *_ in seqs]),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for *_, t in seqs]),
        num_decodes=int((qlens == 1).sum()), max_query_len=int(qlens.max()),
        max_context_len=int((starts + qlens).max()), block_size=block_size)
    meta = backend.build_metadata(layout, torch.device("cpu"))
    return backend.forward(torch.cat([q for _, q, *_ in seqs]), torch.cat([k for _, _, k, _, _ in seqs]),
                           torch.cat([v for *_, v, _ in seqs]), cache, meta)


def _run_paged(seqs, num_heads, num_kv_heads, head_dim, block_size, window, seed,
               dtype=torch.float32, fill=1e4, backend="torch"):
    """seqs: [(tokens already in the cache, new tokens)], decodes (new == 1) first.

    Earlier steps are simulated by one prefill call that writes the cached tokens' KV; the cache
    starts out as garbage (`fill`, as stale KV from finished requests would be), which masked
    slots must not leak into the result. Returns the new tokens' output and what to compare with.
    """
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-(c + n) // block_size) for c, n in seqs) + 7
    scale = head_dim ** -0.5
    backend = get_backend(backend, num_heads=num_heads, num_kv_heads=num_kv_heads,
                          head_dim=head_dim, scale=scale, sliding_window=window)
    cache = torch.full(backend.kv_cache_shape(num_blocks, block_size), fill, dtype=dtype)
    free = torch.randperm(num_blocks, generator=g).tolist()          # scattered, shuffled blocks
    rows = []
    for ctx, new in seqs:
        table = [free.pop() for _ in range(-(-(ctx + new) // block_size))]
        k = torch.randn(ctx + new, num_kv_heads, head_dim, generator=g).to(dtype)
        v = torch.randn(ctx + new, num_kv_heads, head_dim, generator=g).to(dtype)
        q = torch.randn(ctx + new, num_heads, head_dim, generator=g).to(dtype)
        rows.append((ctx, new, q, k, v, table))
    earlier = sorted([r for r in rows if r[0] > 0], key=lambda r: r[0] != 1)
    if earlier:
        _step(backend, cache, [(0, q[:c], k[:c], v[:c], t) for c, _, q, k, v, t in earlier],
              block_size)
    out = _step(backend, cache, [(c, q[c:], k[c:], v[c:], t) for c, _, q, k, v, t in rows],
                block_size)
    refs = [_dense_reference(q[c:], k, v, c, scale, window) for c, _, q, k, v, _ in rows]
    return out, refs


def _check(out, seqs, refs, tol=1e-5):
    assert out.shape[0] == sum(n for _, n in seqs)
    offset = 0
    for (ctx, new), ref in zip(seqs, refs):
        torch.testing.assert_close(out[offset:offset + new].double(), ref, rtol=tol, atol=tol,
                                   msg=lambda m: f"sequence (cached {ctx}, new {new}): {m}")
        offset += new


BATCHES = {
    "decodes": [(0, 1), (5, 1), (16, 1), (37, 1)],
    "prefills": [(0, 9), (0, 1 + 16), (0, 3)],
    "chunks": [(16, 8), (5, 11), (32, 32)],
    "mixed": [(0, 1), (9, 1), (63, 1), (0, 13), (20, 7), (4, 29), (47, 2)],
}


@pytest.fixture(params=["torch", "cpu"])
def backend(request):
    """Every paged-attention test runs on the portable backend and on ember's CPU kernels."""
    if request.param == "cpu" and cpu_kernels.library() is None:
        pytest.skip("ember's CPU kernels need AVX-512 and a C++ compiler")
    return request.param


@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("batch", list(BATCHES))
def test_paged_attention_matches_dense(batch, heads, window, backend):
    seqs = BATCHES[batch]
    for seed, block_size in ((0, 4), (1, 16)):
        out, refs = _run_paged(seqs, *heads, 16, block_size, window, seed, backend=backend)
        assert out.shape[1:] == (heads[0], 16)
        _check(out, seqs, refs)


def test_paged_attention_random_batches(backend):
    rng = torch.Generator().manual_seed(3)
    for trial in range(6):
        n_dec = int(torch.randint(0, 5, (1,), generator=rng))
        n_pre = int(torch.randint(0 if n_dec else 1, 4, (1,), generator=rng))
        seqs = [(int(torch.randint(0, 60, (1,), generator=rng)), 1) for _ in range(n_dec)]
        seqs += [(int(torch.randint(0, 40, (1,), generator=rng)),
                  int(torch.randint(2, 30, (1,), generator=rng))) for _ in range(n_pre)]
        window = None if trial % 2 else int(torch.randint(1, 20, (1,), generator=rng))
        out, refs = _run_paged(seqs, 8, 2, 32, 8, window, 100 + trial, backend=backend)
        _check(out, seqs, refs)


def test_paged_attention_bf16_close_to_reference(backend):
    seqs = BATCHES["mixed"]
    out, refs = _run_paged(seqs, 4, 2, 16, 4, None, 5, dtype=torch.bfloat16, fill=0.0,
                           backend=backend)
    assert out.dtype == torch.bfloat16
    _check(out, seqs, refs, tol=0.05)


@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("block_size", [3, 16])
def test_paged_attention_bf16_head_sizes(head_dim, window, block_size, backend):
    """bf16 at the head sizes where the CPU kernel sums q·k and p·v with bf16 dot products
    (multiples of 32; with blocks of 16 the cache is in the pair layout), odd block sizes and
    contexts (keys in pairs, a missing last one), stale values left in unused slots, contexts
    past the decode kernel's 128-key chunks."""
    seqs = BATCHES["mixed"][:3] + [(290, 1)] + BATCHES["mixed"][3:] + [(150, 20)]
    out, refs = _run_paged(seqs, 6, 2, head_dim, block_size, window, 7, dtype=torch.bfloat16,
                           fill=3e3, backend=backend)
    _check(out, seqs, refs, tol=0.05)


@pytest.mark.parametrize("fill", [1e4, -3e4])
def test_paged_attention_ignores_stale_values_in_unused_slots(fill, backend):
    """Slots past a request's context (the rest of its last block, table padding) hold stale KV of
    finished requests (finite: the runner zero-fills the cache at start); masked keys must not
    leak into the result, however large."""
    seqs = BATCHES["mixed"]
    out, refs = _run_paged(seqs, 4, 2, 16, 4, None, 6, fill=fill, backend=backend)
    _check(out, seqs, refs)
