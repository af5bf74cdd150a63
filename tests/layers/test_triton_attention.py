"""The Triton paged-attention kernels against dense causal attention in float64, run on the CPU by
Triton's interpreter (TRITON_INTERPRET=1): decodes (with and without split-K), prefill chunks
whose keys start before their queries (cached prefix, earlier chunks), GQA/MQA, sliding windows,
stale values in unused cache slots, and the padded metadata of captured decode graphs."""
from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

# The interpreter is chosen when a function is decorated: triton's own at its first import, ours
# when the fixtures import them. The variable is restored when this module's tests end.
_ENV_BEFORE = os.environ.get("TRITON_INTERPRET")
if "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402
import triton.language as tl  # noqa: E402

from ember.attention import BatchLayout, auto_backend  # noqa: E402

pytestmark = pytest.mark.skipif(not isinstance(tl.zeros, InterpretedFunction),
                                reason="triton was imported without TRITON_INTERPRET=1")


@pytest.fixture(scope="module", autouse=True)
def _restore_env():
    yield
    if _ENV_BEFORE is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _ENV_BEFORE


@pytest.fixture(scope="module")
def backend_cls():
    """The backend module, freshly imported with the interpreter on."""
    sys.modules.pop("ember.attention.triton_paged", None)
    yield importlib.import_module("ember.attention.triton_paged").TritonPagedBackend
    sys.modules.pop("ember.attention.triton_paged", None)


def _dense(q, k, v, start, scale, window):
    """The float64 dense reference of test_layers.py (pytest puts this folder on sys.path)."""
    from test_layers import _dense_reference
    return _dense_reference(q, k, v, start, scale, window)


def _layout(seqs, block_size):
    """seqs: [(start, q, k, v, table)] → BatchLayout (decodes first)."""
    qlens = torch.tensor([q.shape[0] for _, q, *_ in seqs])
    starts = torch.tensor([s for s, *_ in seqs])
    width = max(len(t) for *_, t in seqs)
    return BatchLayout(
        query_lens=qlens, context_lens=starts + qlens,
        positions=torch.cat([torch.arange(s, s + q.shape[0]) for s, q, *_ in seqs]),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for *_, t in seqs]),
        num_decodes=int((qlens == 1).sum()), max_query_len=int(qlens.max()),
        max_context_len=int((starts + qlens).max()), block_size=block_size)


def _call(backend, cache, seqs, block_size, meta=None):
    cat = lambda i: torch.cat([s[i] for s in seqs])          # noqa: E731
    if meta is None:
        meta = backend.build_metadata(_layout(seqs, block_size), torch.device("cpu"))
    return backend.forward(cat(1), cat(2), cat(3), cache, meta)


def _setup(cls, seqs, heads, kv_heads, head_dim, block_size, window, seed, fill=1e4):
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-(c + n) // block_size) for c, n in seqs) + 5
    backend = cls(num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                  scale=head_dim ** -0.5, sliding_window=window)
    cache = torch.full(backend.kv_cache_shape(num_blocks, block_size), fill)
    free = torch.randperm(num_blocks, generator=g).tolist()
    rows = []
    for ctx, new in seqs:
        table = [free.pop() for _ in range(-(-(ctx + new) // block_size))]
        q = torch.randn(ctx + new, heads, head_dim, generator=g)
        k = torch.randn(ctx + new, kv_heads, head_dim, generator=g)
        v = torch.randn(ctx + new, kv_heads, head_dim, generator=g)
        rows.append((ctx, new, q, k, v, table))
    earlier = sorted([r for r in rows if r[0] > 0], key=lambda r: r[0] != 1)
    if earlier:            # earlier steps: one prefill call writes the cached tokens' KV
        _call(backend, cache, [(0, q[:c], k[:c], v[:c], t) for c, _, q, k, v, t in earlier],
              block_size)
    step = [(c, q[c:], k[c:], v[c:], t) for c, _, q, k, v, t in rows]
    refs = [_dense(q[c:], k, v, c, backend.scale, window) for c, _, q, k, v, _ in rows]
    return backend, cache, step, refs


def _check(out, step, refs, tol=2e-5):
    offset = 0
    for (ctx, q, *_), ref in zip(step, refs):
        n = q.shape[0]
        torch.testing.assert_close(out[offset:offset + n].double(), ref, rtol=tol, atol=tol,
                                   msg=lambda m: f"sequence (cached {ctx}, new {n}): {m}")
        offset += n
    assert offset == out.shape[0]


BATCHES = {
    "decodes": [(0, 1), (5, 1), (16, 1), (70, 1)],
    "chunks": [(16, 8), (5, 11), (40, 70)],
    "mixed": [(0, 1), (9, 1), (130, 1), (0, 13), (20, 7), (4, 29), (47, 2)],
}


@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("batch", list(BATCHES))
def test_triton_paged_attention_matches_dense(backend_cls, batch, heads, window):
    seqs = BATCHES[batch]
    for seed, block_size in ((0, 4), (1, 16)):
        backend, cache, step, refs = _setup(backend_cls, seqs, *heads, 16, block_size, window,
                                            seed)
        out = _call(backend, cache, step, block_size)
        assert out.shape == (sum(n for _, n in seqs), heads[0], 16)
        _check(out, step, refs)


@pytest.mark.parametrize("window", [None, 37])
@pytest.mark.parametrize("splits", [2, 5, 16])
def test_split_k_decode_matches_dense(backend_cls, splits, window):
    """Contexts longer and shorter than a split's slice, and one of a single token (most of its
    splits see no keys at all)."""
    seqs = [(0, 1), (3, 1), (200, 1), (64, 1), (127, 1)]
    backend, cache, step, refs = _setup(backend_cls, seqs, 8, 2, 32, 8, window, splits)
    backend.num_splits = lambda batch, device: splits
    meta = backend.build_metadata(_layout(step, 8), torch.device("cpu"))
    assert meta.num_splits == splits and meta.partials.shape == (5, 8, splits, 32)
    _check(_call(backend, cache, step, 8, meta), step, refs)


def test_split_count_fills_the_device(backend_cls):
    backend = backend_cls(num_heads=16, num_kv_heads=8, head_dim=128, scale=1.0)
    backend._num_sms = 132
    splits = {b: backend.num_splits(b, torch.device("cpu")) for b in (1, 2, 8, 33, 256)}
    assert splits == {1: 16, 2: 16, 8: 5, 33: 1, 256: 1}


def test_graph_padding_rows_write_nothing_and_real_rows_match(backend_cls):
    """A captured decode step runs a padded batch from persistent buffers: the real rows must match
    the reference, padding rows (context 0, slot -1) must neither write the cache nor produce
    anything but zeros, and stale entries left in the buffers by a bigger batch must not matter."""
    seqs = [(3, 1), (40, 1), (17, 1)]
    backend, cache, step, refs = _setup(backend_cls, seqs, 4, 2, 16, 4, None, 9)
    cpu = torch.device("cpu")
    backend.graph_buffers(max_batch=8, max_blocks_per_seq=32, device=cpu)
    backend._graph["tables"].random_(0, 20)         # stale tables from earlier, larger steps
    backend._graph["ctx"].fill_(50)
    backend.fill_graph_metadata(_layout(step, 4), batch=8)
    meta = backend.graph_metadata(8, cpu)
    assert meta.context_lens.tolist() == [4, 41, 18, 0, 0, 0, 0, 0]
    assert meta.slot_mapping[3:].tolist() == [-1] * 5
    pad = lambda t: torch.cat([t, torch.randn((5,) + t.shape[1:])])   # noqa: E731
    q, k, v = (pad(torch.cat([s[i] for s in step])) for i in (1, 2, 3))
    before = cache.clone()
    out = backend.forward(q, k, v, cache, meta)
    _check(out[:3], step, refs)
    assert torch.equal(out[3:], torch.zeros_like(out[3:]))
    changed = (cache != before).any(-1)                 # [2, Hkv, blocks, block_size]
    written = {(b * 4 + o) for b, o in zip(*torch.nonzero(changed.any(0).any(0), as_tuple=True))
               for b, o in [(int(b), int(o))]}
    assert written == set(meta.slot_mapping[:3].tolist())


@pytest.mark.parametrize("fill", [1e4, -3e4])
def test_stale_cache_values_do_not_leak(backend_cls, fill):
    seqs = BATCHES["mixed"]
    backend, cache, step, refs = _setup(backend_cls, seqs, 4, 2, 16, 4, None, 6, fill=fill)
    _check(_call(backend, cache, step, 4), step, refs)


def test_auto_picks_triton_on_cuda_only():
    assert auto_backend(torch.device("cpu")) in ("cpu", "torch")   # ember's CPU kernels if built
    assert auto_backend(torch.device("cuda")) == "triton"      # triton imports (see the skip)


def test_graph_batch_sizes_and_padding():
    from ember.runner.graphs import graph_batch_sizes, padded_batch_size

    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(6) == [1, 2, 4, 6]
    assert graph_batch_sizes(40) == [1, 2, 4, 8, 16, 32, 40]
    assert graph_batch_sizes(256)[-3:] == [224, 240, 256]
    sizes = graph_batch_sizes(40)
    assert [padded_batch_size(sizes, n) for n in (1, 3, 8, 9, 33, 40, 41)] == \
        [1, 4, 8, 16, 40, 40, None]


def test_decode_graph_path_matches_eager(backend_cls, monkeypatch, tmp_path, save_random_model):
    """The runner's captured-decode path end to end on the CPU: 'capture' records the step
    function and 'replay' reruns it into the captured output, so the static input buffers, the
    padded batch and the persistent attention metadata are exercised as on a GPU. Greedy tokens
    must equal the eager torch backend's, and decode steps must have gone through the graphs."""
    from transformers import LlamaConfig

    from ember import LLM, SamplingParams, platforms

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                      num_key_value_heads=2, num_hidden_layers=2, vocab_size=49152,
                      max_position_embeddings=256, initializer_range=0.15, bos_token_id=1,
                      eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    save_random_model(cfg, str(tmp_path))

    class ReplayGraph:
        def __init__(self, fn, out):
            self.fn, self.out = fn, out

        def replay(self):
            self.out.copy_(self.fn())

    def capture(device, fn, pool):
        out = fn()
        return ReplayGraph(fn, out), out

    opts = dict(dtype="float32", device="cpu", block_size=4, max_num_batched_tokens=32,
                kv_cache_memory=4 << 20, max_model_len=128, max_num_seqs=6)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 49152, (n,), generator=g).tolist() for n in (3, 9, 20, 41, 5)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    eager = LLM(str(tmp_path), attention_backend="torch", **opts).generate(prompts, params,
                                                                            use_tqdm=False)
    monkeypatch.setattr(platforms, "graphs_supported", lambda device: True)
    monkeypatch.setattr(platforms, "graph_pool", lambda device: None)
    monkeypatch.setattr(platforms, "capture_graph", capture)
    llm = LLM(str(tmp_path), attention_backend="triton", **opts)
    graphs = llm.engine.runner.graphs
    assert graphs.sizes == [1, 2, 4, 6]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in eager]
    assert graphs.replays >= 5
    llm.engine.kv.check_integrity()


# ---- fused elementwise ops for CUDA (ember/kernels/triton_cuda.py) -----------------------------

@pytest.fixture(scope="module")
def fused():
    sys.modules.pop("ember.kernels.triton_cuda", None)
    yield importlib.import_module("ember.kernels.triton_cuda")
    sys.modules.pop("ember.kernels.triton_cuda", None)


TOL = dict(rtol=1e-5, atol=1e-5)


def _rms_ref(x, w, eps):
    h = x.double()
    return w.double() * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)


def test_fused_rms_norm(fused):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 96, generator=g)
    w = torch.randn(96, generator=g)
    res = torch.randn(5, 96, generator=g)
    torch.testing.assert_close(fused.rms_norm(x, w, 1e-6).double(), _rms_ref(x, w, 1e-6), **TOL)
    out, summed = fused.rms_norm(x, w, 1e-6, res)
    torch.testing.assert_close(summed, x + res)
    torch.testing.assert_close(out.double(), _rms_ref(x + res, w, 1e-6), **TOL)
    # per-head norm of a strided view (q heads inside a fused qkv projection)
    qkv = torch.randn(3, 4 * 16 + 2 * 2 * 16, generator=g)
    q = qkv[:, :64].view(3, 4, 16)
    wq = torch.randn(16, generator=g)
    torch.testing.assert_close(fused.rms_norm(q, wq, 1e-5).double(), _rms_ref(q, wq, 1e-5), **TOL)


def test_fused_rotary_in_place(fused):
    g = torch.Generator().manual_seed(1)
    t, hq, hk, d = 4, 4, 2, 16
    qkv = torch.randn(t, (hq + 2 * hk) * d, generator=g)
    q, k = qkv[:, :hq * d].view(t, hq, d), qkv[:, hq * d:(hq + hk) * d].view(t, hk, d)
    cos_sin = torch.randn(32, d, generator=g)
    pos = torch.tensor([0, 7, 31, 7])
    cos, sin = cos_sin[pos].unsqueeze(1).chunk(2, dim=-1)

    def ref(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    want_q, want_k, v_before = ref(q), ref(k), qkv[:, (hq + hk) * d:].clone()
    fused.rotary(pos, q, k, cos_sin)
    torch.testing.assert_close(q, want_q)
    torch.testing.assert_close(k, want_k)
    assert torch.equal(qkv[:, (hq + hk) * d:], v_before)        # v untouched


def test_fused_silu_and_mul(fused):
    x = torch.randn(3, 2 * 1500, generator=torch.Generator().manual_seed(2))
    gate, up = x.chunk(2, dim=-1)
    torch.testing.assert_close(fused.silu_and_mul(x), torch.nn.functional.silu(gate) * up)
