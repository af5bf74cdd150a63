"""Paged attention in Triton: the kernels read K/V straight from the paged cache through the block
table; nothing is gathered into a contiguous copy.

Cache layout per layer, the same as the torch backend's: [2 (k, v), kv_heads, num_blocks,
block_size, head_dim], so one (kv head, block) tile of block_size × head_dim is contiguous.
A token at position p of sequence b lives in block tables[b, p // block_size], row p % block_size.

Three kernels per layer call:
  _write_kv   new k/v [T, Hkv, D] → their slots; slot < 0 (the padding rows of a captured decode
              graph) writes nothing.
  _decode     one query per sequence. A program owns (sequence, kv head, split) and the G = H/Hkv
              query heads of that kv head (GQA: each K/V tile is loaded once for all G heads),
              padded to 16 rows for tl.dot. Online softmax over BLOCK_N-token tiles. With S > 1
              splits (split-K, chosen from the batch size so that batch × Hkv × S fills the GPU),
              each program covers a contiguous slice of the context and writes an unnormalised
              partial (acc, max, sum); _combine merges the S partials. A sequence of context 0
              (graph padding) yields zeros.
  _prefill    a tile of BLOCK_M queries of one head of one prefill chunk. The chunk's queries sit
              at positions ctx - qlen .. ctx - 1 (cached prefix and earlier chunks come first), so
              query row i sees keys 0 .. ctx - qlen + i (causal), and with a sliding window only
              keys > q_pos - window. The loop stops at the tile's last query position.
Scores are accumulated in fp32 and the softmax runs in base 2 (scale folded with log2 e).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ember import platforms
from ember.attention.base import AttentionBackend, AttentionMetadata, BatchLayout

_LOG2E = 1.4426950408889634
_NEG = tl.constexpr(-1.0e30)         # "minus infinity" that stays finite, so (m_old - m_new) is never NaN


@triton.jit
def _write_kv(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, stride_kt, stride_kh, stride_vt, stride_vh,
              stride_ch, HKV: tl.constexpr, HKV_PAD: tl.constexpr, D: tl.constexpr,
              BLOCK_SIZE: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    h = tl.arange(0, HKV_PAD)
    d = tl.arange(0, D)
    heads = tl.where(slot >= 0, HKV, 0)              # padding rows (slot -1) write nothing
    mask = (h[:, None] < heads) & (d[None, :] < D)
    dst = (slot // BLOCK_SIZE) * (BLOCK_SIZE * D) + (slot % BLOCK_SIZE) * D
    dst = dst + h[:, None].to(tl.int64) * stride_ch + d[None, :]
    k = tl.load(k_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
    tl.store(kc_ptr + dst, k, mask=mask)
    tl.store(vc_ptr + dst, v, mask=mask)


@triton.jit
def _load_kv_tile(kc_ptr, vc_ptr, table, kv_off, n, valid, d, BLOCK_SIZE: tl.constexpr,
                  D: tl.constexpr):
    """Keys and values [len(n), D] of token positions n, read through the block table."""
    page = tl.load(table + n // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    offs = (page * (BLOCK_SIZE * D) + (n % BLOCK_SIZE) * D + kv_off)[:, None] + d[None, :]
    k = tl.load(kc_ptr + offs, mask=valid[:, None], other=0.0)
    v = tl.load(vc_ptr + offs, mask=valid[:, None], other=0.0)
    return k, v


@triton.jit
def _softmax_step(sc, v, m, l, acc, PREC: tl.constexpr):
    """One tile of online softmax in base 2: scores sc [R, N] and values v [N, D] folded into the
    running max m [R], sum l [R] and output acc [R, D]."""
    m_new = tl.maximum(m, tl.max(sc, 1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(sc - m_new[:, None])
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return m_new, l, acc


@triton.jit
def _decode(q_ptr, kc_ptr, vc_ptr, tables_ptr, ctx_ptr, out_ptr, part_ptr, ml_ptr,
            qk_scale, window, stride_qt, stride_qh, stride_ot, stride_oh, stride_bt, stride_ch,
            G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
            BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr, SPLIT: tl.constexpr,
            PREC: tl.constexpr):
    b, kvh, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    num_splits = tl.num_programs(2)
    ctx = tl.load(ctx_ptr + b)
    start = 0
    if HAS_WINDOW:
        start = tl.maximum(ctx - window, 0)
    per = tl.cdiv(tl.cdiv(ctx - start, num_splits), BLOCK_N) * BLOCK_N
    lo = start + s * per
    hi = tl.minimum(lo + per, ctx)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D)
    heads = kvh * G + g                                                   # [G_PAD]
    q = tl.load(q_ptr + b * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=g[:, None] < G, other=0.0)                           # [G_PAD, D]
    m = tl.full([G_PAD], _NEG, tl.float32)
    l = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    table = tables_ptr + b.to(tl.int64) * stride_bt
    kv_off = kvh.to(tl.int64) * stride_ch
    for n0 in range(lo, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        valid = n < hi
        k, v = _load_kv_tile(kc_ptr, vc_ptr, table, kv_off, n, valid, d, BLOCK_SIZE, D)
        sc = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale     # [G_PAD, BLOCK_N]
        sc = tl.where(valid[None, :], sc, float("-inf"))
        m, l, acc = _softmax_step(sc, v, m, l, acc, PREC)
    gmask = g[:, None] < G
    if SPLIT:
        # partials [B, H, S, D] and (max, sum) [B, H, S, 2]
        row = (b * (tl.num_programs(1) * G) + heads) * num_splits + s    # [G_PAD]
        tl.store(part_ptr + row[:, None].to(tl.int64) * D + d[None, :], acc, mask=gmask)
        tl.store(ml_ptr + row * 2, m, mask=g < G)
        tl.store(ml_ptr + row * 2 + 1, l, mask=g < G)
    else:
        out = acc / tl.where(l > 0, l, 1.0)[:, None]
        tl.store(out_ptr + b * stride_ot + heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=gmask)


@triton.jit
def _combine(part_ptr, ml_ptr, out_ptr, stride_ot, stride_oh, H: tl.constexpr,
             S: tl.constexpr, S_PAD: tl.constexpr, D: tl.constexpr):
    b, h = tl.program_id(0), tl.program_id(1)
    s = tl.arange(0, S_PAD)
    d = tl.arange(0, D)
    row = (b * H + h) * S + s
    m = tl.load(ml_ptr + row * 2, mask=s < S, other=_NEG)
    l = tl.load(ml_ptr + row * 2 + 1, mask=s < S, other=0.0)
    acc = tl.load(part_ptr + row[:, None].to(tl.int64) * D + d[None, :], mask=(s < S)[:, None],
                  other=0.0)
    m_all = tl.max(m, 0)
    w = tl.exp2(m - m_all)                                                 # [S_PAD]
    total = tl.sum(l * w, 0)
    out = tl.sum(acc * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + b * stride_ot + h * stride_oh + d, out.to(out_ptr.dtype.element_ty))


@triton.jit
def _prefill(q_ptr, kc_ptr, vc_ptr, tables_ptr, ctx_ptr, qstart_ptr, out_ptr, qk_scale, window,
             seq_offset, stride_qt, stride_qh, stride_ot, stride_oh, stride_bt, stride_ch,
             G: tl.constexpr, D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr, PREC: tl.constexpr):
    b = tl.program_id(0) + seq_offset
    h, mb = tl.program_id(1), tl.program_id(2)
    kvh = h // G
    q0 = tl.load(qstart_ptr + b)
    qlen = tl.load(qstart_ptr + b + 1) - q0
    ctx = tl.load(ctx_ptr + b)
    i = mb * BLOCK_M + tl.arange(0, BLOCK_M)                              # query rows of the tile
    rows = i < qlen
    q_pos = ctx - qlen + i                                                # [BLOCK_M]
    d = tl.arange(0, D)
    q = tl.load(q_ptr + (q0 + i)[:, None].to(tl.int64) * stride_qt + h * stride_qh + d[None, :],
                mask=rows[:, None], other=0.0)
    # keys [lo, hi): up to the tile's last real query (causal); empty when the tile is past qlen
    hi = tl.minimum(ctx, ctx - qlen + (mb + 1) * BLOCK_M)
    hi = tl.where(mb * BLOCK_M < qlen, hi, 0)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(ctx - qlen + mb * BLOCK_M - window + 1, 0)
        lo = (lo // BLOCK_N) * BLOCK_N
    m = tl.full([BLOCK_M], _NEG, tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    table = tables_ptr + b.to(tl.int64) * stride_bt
    kv_off = kvh.to(tl.int64) * stride_ch
    for n0 in range(lo, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        valid = n < hi
        k, v = _load_kv_tile(kc_ptr, vc_ptr, table, kv_off, n, valid, d, BLOCK_SIZE, D)
        sc = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale      # [BLOCK_M, BLOCK_N]
        keep = valid[None, :] & (n[None, :] <= q_pos[:, None])
        if HAS_WINDOW:
            keep &= n[None, :] > q_pos[:, None] - window
        sc = tl.where(keep, sc, float("-inf"))
        m, l, acc = _softmax_step(sc, v, m, l, acc, PREC)
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    tl.store(out_ptr + (q0 + i)[:, None].to(tl.int64) * stride_ot + h * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=rows[:, None])


@dataclass
class TritonMetadata(AttentionMetadata):
    slot_mapping: torch.Tensor    # [T] int64; -1: write nothing (graph padding)
    block_tables: torch.Tensor    # [B, W] int32
    context_lens: torch.Tensor    # [B] int32 (0 for graph padding rows)
    query_starts: torch.Tensor    # [B + 1] int32
    num_decodes: int
    num_prefills: int
    max_query_len: int
    num_splits: int               # split-K factor of the decode kernel
    partials: torch.Tensor | None = None     # [num_decodes, H, S, D] fp32, when num_splits > 1
    maxsum: torch.Tensor | None = None       # [num_decodes, H, S, 2] fp32


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class TritonPagedBackend(AttentionBackend):
    """Decode and prefill kernels over the paged cache; works for fp32/fp16/bf16 (tf32 is never
    used: fp32 models get IEEE dot products)."""

    MAX_SPLITS = 16
    BLOCK_N_DECODE = 64
    BLOCK_M, BLOCK_N = 64, 64

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")
        if self.head_dim & (self.head_dim - 1) or self.head_dim < 16:
            raise ValueError(f"the triton backend needs a power-of-2 head_dim >= 16, "
                             f"got {self.head_dim}")
        self.group = self.num_heads // self.num_kv_heads
        self._num_sms: int | None = None
        self._graph: dict | None = None

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        return (2, self.num_kv_heads, num_blocks, block_size, self.head_dim)

    # ---- metadata ----------------------------------------------------------------------------

    def num_splits(self, batch: int, device: torch.device) -> int:
        """Split-K factor for a decode batch: enough programs for ~2 waves on the GPU. A function
        of the batch size alone, so a captured graph and an eager step split alike."""
        if self._num_sms is None:
            self._num_sms = platforms.multiprocessor_count(device)
        want = -(-2 * self._num_sms // max(1, batch * self.num_kv_heads))
        return max(1, min(self.MAX_SPLITS, want))

    def build_metadata(self, layout: BatchLayout, device: torch.device) -> TritonMetadata:
        bs, qlens = layout.block_size, layout.query_lens
        seq_of_token = torch.repeat_interleave(torch.arange(len(qlens)), qlens)
        pos = layout.positions
        slots = layout.block_tables[seq_of_token, pos // bs] * bs + pos % bs
        starts = torch.zeros(len(qlens) + 1, dtype=torch.int32)
        torch.cumsum(qlens, 0, out=starts[1:])
        nd = layout.num_decodes
        meta = TritonMetadata(
            slots.to(device, non_blocking=True),
            layout.block_tables.to(device=device, dtype=torch.int32, non_blocking=True),
            layout.context_lens.to(device=device, dtype=torch.int32, non_blocking=True),
            starts.to(device, non_blocking=True), nd, len(qlens) - nd, layout.max_query_len,
            self.num_splits(nd, device) if nd else 1)
        self._alloc_partials(meta, device)
        return meta

    def _alloc_partials(self, meta: TritonMetadata, device: torch.device) -> None:
        if meta.num_decodes and meta.num_splits > 1:
            shape = (meta.num_decodes, self.num_heads, meta.num_splits)
            meta.partials = torch.empty(shape + (self.head_dim,), dtype=torch.float32, device=device)
            meta.maxsum = torch.empty(shape + (2,), dtype=torch.float32, device=device)

    # ---- static metadata for captured decode graphs ------------------------------------------

    def graph_buffers(self, max_batch: int, max_blocks_per_seq: int, device: torch.device) -> None:
        """Persistent device buffers that captured decode steps read their metadata from."""
        self._graph = dict(
            slots=torch.full((max_batch,), -1, dtype=torch.long, device=device),
            tables=torch.zeros(max_batch, max_blocks_per_seq, dtype=torch.int32, device=device),
            ctx=torch.zeros(max_batch, dtype=torch.int32, device=device),
            starts=torch.arange(max_batch + 1, dtype=torch.int32, device=device))

    def graph_metadata(self, batch: int, device: torch.device) -> TritonMetadata:
        """Metadata for a pure-decode step of `batch` rows that views the persistent buffers."""
        gb = self._graph
        meta = TritonMetadata(gb["slots"][:batch], gb["tables"][:batch], gb["ctx"][:batch],
                              gb["starts"][:batch + 1], batch, 0, 1,
                              self.num_splits(batch, device))
        self._alloc_partials(meta, device)
        return meta

    def fill_graph_metadata(self, layout: BatchLayout, batch: int) -> None:
        """Copy a pure-decode step (n <= batch rows) into the persistent buffers; rows n..batch-1
        are padding: context 0 (attention yields zeros) and slot -1 (nothing is written)."""
        gb, n, bs = self._graph, len(layout.query_lens), layout.block_size
        pos = layout.positions
        host = torch.full((3, batch), -1, dtype=torch.long)
        host[0, :n] = layout.block_tables[torch.arange(n), pos // bs] * bs + pos % bs
        host[1] = 0
        host[1, :n] = layout.context_lens
        width = layout.block_tables.shape[1]
        gb["tables"][:n, :width].copy_(layout.block_tables, non_blocking=True)
        dev = host.to(gb["slots"].device, non_blocking=True)
        gb["slots"][:batch].copy_(dev[0])
        gb["ctx"][:batch].copy_(dev[1])

    # ---- forward -----------------------------------------------------------------------------

    def forward(self, q, k, v, kv_cache, meta: TritonMetadata) -> torch.Tensor:
        kc, vc = kv_cache[0], kv_cache[1]
        hkv, _, bs, d = kc.shape
        stride_ch = kc.stride(0)
        _write_kv[(k.shape[0],)](k, v, kc, vc, meta.slot_mapping, k.stride(0), k.stride(1),
                                 v.stride(0), v.stride(1), stride_ch, HKV=hkv,
                                 HKV_PAD=_pow2(hkv), D=d, BLOCK_SIZE=bs)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        prec = "ieee" if q.dtype == torch.float32 else "tf32"
        window = self.sliding_window or 0
        scale = self.scale * _LOG2E
        nd = meta.num_decodes
        if nd:
            self._decode(q, kc, vc, out, meta, scale, window, prec)
        if meta.num_prefills:
            grid = (meta.num_prefills, self.num_heads, triton.cdiv(meta.max_query_len, self.BLOCK_M))
            _prefill[grid](q, kc, vc, meta.block_tables, meta.context_lens, meta.query_starts, out,
                           scale, window, nd, q.stride(0), q.stride(1), out.stride(0),
                           out.stride(1), meta.block_tables.stride(0), stride_ch, G=self.group,
                           D=d, BLOCK_SIZE=bs, BLOCK_M=self.BLOCK_M, BLOCK_N=self.BLOCK_N,
                           HAS_WINDOW=self.sliding_window is not None, PREC=prec,
                           num_warps=4, num_stages=2)
        return out

    def _decode(self, q, kc, vc, out, meta, scale, window, prec) -> None:
        nd, s = meta.num_decodes, meta.num_splits
        _decode[(nd, self.num_kv_heads, s)](
            q, kc, vc, meta.block_tables, meta.context_lens, out, meta.partials, meta.maxsum,
            scale, window, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            meta.block_tables.stride(0), kc.stride(0), G=self.group, G_PAD=max(16, _pow2(self.group)),
            D=kc.shape[-1], BLOCK_SIZE=kc.shape[2], BLOCK_N=self.BLOCK_N_DECODE,
            HAS_WINDOW=self.sliding_window is not None, SPLIT=s > 1, PREC=prec, num_warps=4)
        if s > 1:
            _combine[(nd, self.num_heads)](meta.partials, meta.maxsum, out, out.stride(0),
                                           out.stride(1), H=self.num_heads, S=s,
                                           S_PAD=_pow2(s), D=kc.shape[-1])
