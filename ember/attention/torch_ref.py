"""Portable attention over the paged cache: plain torch ops, runs on any device.

Cache layout per layer: [2 (k, v), kv_heads, num_blocks, block_size, head_dim]. Head-major, so
that gathering a request's blocks (`index_select` on the block dimension, whole blocks at a time)
gives keys already laid out [kv_heads, B, L, head_dim] for batched matmuls.

Decodes and prefill chunks are two padded sub-batches:
  decodes   q [B, H, D] grouped by KV head → [Hkv, B, G, D]; scores = q·Kᵀ in fp32, additive
            mask (key_pos < context_len), softmax, ·V. No SDPA: for one query per request the
            plain matmuls are several times faster on CPU.
  prefills  queries padded by index to [B, H, Qmax, D]; SDPA with a boolean mask
            key_pos < context_len & key_pos <= query_pos (& key_pos > query_pos - window).
Padded query rows still see key 0, so no row is fully masked (no NaN); they are dropped after.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ember.attention.base import AttentionBackend, AttentionMetadata, BatchLayout


@dataclass
class _SubBatch:
    blocks: torch.Tensor          # [B * max_blocks] block ids, row-major (padded with block 0)
    num_seqs: int
    mask: torch.Tensor            # decodes: [B, L] additive float; prefills: [B, 1, Q, L] bool
    token_index: torch.Tensor | None = None   # prefills: [B, Q] query → index into T (clamped)
    valid: torch.Tensor | None = None         # prefills: [B, Q] bool, a real query


@dataclass
class TorchMetadata(AttentionMetadata):
    slot_mapping: torch.Tensor    # [T]
    num_decode_tokens: int
    decode: _SubBatch | None
    prefill: _SubBatch | None


class TorchAttentionBackend(AttentionBackend):
    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        return (2, self.num_kv_heads, num_blocks, block_size, self.head_dim)

    def build_metadata(self, layout: BatchLayout, device: torch.device) -> TorchMetadata:
        bs, qlens, ctx = layout.block_size, layout.query_lens, layout.context_lens
        seq_of_token = torch.repeat_interleave(torch.arange(len(qlens)), qlens)
        pos = layout.positions
        slot_mapping = layout.block_tables[seq_of_token, pos // bs] * bs + pos % bs
        nd = layout.num_decodes
        q_starts = torch.cumsum(qlens, 0) - qlens
        decode = prefill = None
        if nd:
            decode = self._decode_batch(ctx[:nd], layout.block_tables[:nd], bs, device)
        if nd < len(qlens):
            prefill = self._prefill_batch(qlens[nd:], ctx[nd:], q_starts[nd:],
                                          layout.block_tables[nd:], bs, device)
        return TorchMetadata(slot_mapping.to(device), nd, decode, prefill)

    @staticmethod
    def _blocks(ctx, tables, bs) -> tuple[torch.Tensor, torch.Tensor]:
        n_blocks = -(-int(ctx.max()) // bs)
        k_pos = torch.arange(n_blocks * bs)                             # [L]
        return tables[:, :n_blocks].reshape(-1), k_pos

    def _window(self, k_pos, q_pos) -> torch.Tensor:
        return k_pos > q_pos - self.sliding_window

    def _decode_batch(self, ctx, tables, bs, device) -> _SubBatch:
        blocks, k_pos = self._blocks(ctx, tables, bs)
        keep = k_pos < ctx.unsqueeze(1)                                 # [B, L]
        if self.sliding_window is not None:
            keep &= self._window(k_pos, (ctx - 1).unsqueeze(1))
        mask = torch.zeros(keep.shape).masked_fill_(~keep, float("-inf"))
        return _SubBatch(blocks.to(device), len(ctx), mask.to(device))

    def _prefill_batch(self, qlens, ctx, q_starts, tables, bs, device) -> _SubBatch:
        blocks, k_pos = self._blocks(ctx, tables, bs)
        j = torch.arange(int(qlens.max()))                              # [Q]
        q_pos = (ctx - qlens).unsqueeze(1) + j                          # [B, Q]
        mask = (k_pos <= q_pos.unsqueeze(-1)) & (k_pos < ctx.view(-1, 1, 1))   # [B, Q, L]
        if self.sliding_window is not None:
            mask &= self._window(k_pos, q_pos.unsqueeze(-1))
        mask[..., 0] |= ~mask.any(-1)        # padding rows: attend to key 0 rather than nothing
        valid = j < qlens.unsqueeze(1)
        token_index = torch.where(valid, q_starts.unsqueeze(1) + j, q_starts.unsqueeze(1))
        return _SubBatch(blocks.to(device), len(ctx), mask.unsqueeze(1).to(device),
                         token_index.to(device), valid.to(device))

    @staticmethod
    def _gather(cache: torch.Tensor, sb: _SubBatch) -> torch.Tensor:
        # cache [Hkv, num_blocks, bs, D] → [Hkv, B, L, D]. Selecting whole rows of a 3-d view is
        # ~2.5x faster than index_select on the 4-d tensor (one memcpy per block).
        h, nb, _, d = cache.shape
        g = cache.view(h, nb, -1).index_select(1, sb.blocks)
        return g.view(h, sb.num_seqs, -1, d)

    def _decode(self, q: torch.Tensor, kv_cache: torch.Tensor, sb: _SubBatch) -> torch.Tensor:
        b, h, d = q.shape
        k, v = self._gather(kv_cache[0], sb), self._gather(kv_cache[1], sb)   # [Hkv, B, L, D]
        qg = q.view(b, self.num_kv_heads, -1, d).transpose(0, 1)              # [Hkv, B, G, D]
        scores = torch.matmul(qg, k.transpose(-1, -2)).float() * self.scale   # [Hkv, B, G, L]
        probs = (scores + sb.mask.unsqueeze(1)).softmax(-1).to(v.dtype)
        return torch.matmul(probs, v).transpose(0, 1).reshape(b, h, d)

    def _prefill(self, q: torch.Tensor, kv_cache: torch.Tensor, sb: _SubBatch) -> torch.Tensor:
        # q [B, Q, H, D] → [B, Q, H, D]
        k = self._gather(kv_cache[0], sb).transpose(0, 1)                    # [B, Hkv, L, D]
        v = self._gather(kv_cache[1], sb).transpose(0, 1)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=sb.mask,
                                           scale=self.scale,
                                           enable_gqa=self.num_heads != self.num_kv_heads)
        return o.transpose(1, 2)

    def forward(self, q, k, v, kv_cache, meta: TorchMetadata) -> torch.Tensor:
        flat = kv_cache.flatten(2, 3)                                   # [2, Hkv, slots, D]
        flat[0].index_copy_(1, meta.slot_mapping, k.transpose(0, 1))
        flat[1].index_copy_(1, meta.slot_mapping, v.transpose(0, 1))
        nd = meta.num_decode_tokens
        if meta.prefill is None:
            return self._decode(q, kv_cache, meta.decode)
        out = torch.empty_like(q)
        if meta.decode is not None:
            out[:nd] = self._decode(q[:nd], kv_cache, meta.decode)
        sb = meta.prefill
        o = self._prefill(q[sb.token_index], kv_cache, sb)              # [Bp, Qmax, H, D]
        out[sb.token_index[sb.valid]] = o[sb.valid]
        return out
