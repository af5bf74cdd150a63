"""Portable attention over the paged cache: plain torch ops, runs on any device.

Decodes and prefill chunks are two padded sub-batches, each one SDPA call:
  keys    gathered from the cache by slot: [B, L] slots → [B, Hkv, L, D]
  queries decodes: [Bd, H, 1, D] straight from q; prefills: padded by index to [Bp, H, Qmax, D]
  mask    key_pos < context_len  &  key_pos <= query_pos  (&  key_pos > query_pos - window)
Padded query rows still see key 0, so no row is fully masked (no NaN); they are dropped after.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ember.attention.base import AttentionBackend, AttentionMetadata, BatchLayout


@dataclass
class _SubBatch:
    key_slots: torch.Tensor       # [B, L]
    mask: torch.Tensor            # [B, 1, Q, L] bool, True = attend
    token_index: torch.Tensor     # [B, Q] index of each query into the step's T tokens (clamped)
    valid: torch.Tensor           # [B, Q] bool: a real query, not padding


@dataclass
class TorchMetadata(AttentionMetadata):
    slot_mapping: torch.Tensor    # [T]
    num_decode_tokens: int
    decode: _SubBatch | None
    prefill: _SubBatch | None


class TorchAttentionBackend(AttentionBackend):
    def build_metadata(self, layout: BatchLayout, device: torch.device) -> TorchMetadata:
        bs, qlens, ctx = layout.block_size, layout.query_lens, layout.context_lens
        seq_of_token = torch.repeat_interleave(torch.arange(len(qlens)), qlens)
        pos = layout.positions
        slot_mapping = layout.block_tables[seq_of_token, pos // bs] * bs + pos % bs
        nd = layout.num_decodes
        q_starts = torch.cumsum(qlens, 0) - qlens
        parts = [None, None]
        for i, rows in enumerate((slice(0, nd), slice(nd, len(qlens)))):
            if rows.stop > rows.start:
                parts[i] = self._sub_batch(qlens[rows], ctx[rows], q_starts[rows],
                                           layout.block_tables[rows], bs, device)
        return TorchMetadata(slot_mapping.to(device), nd, *parts)

    def _sub_batch(self, qlens, ctx, q_starts, tables, bs, device) -> _SubBatch:
        q_max, l_max = int(qlens.max()), int(ctx.max())
        k_pos = torch.arange(l_max)                                     # [L]
        key_slots = tables[:, k_pos // bs] * bs + k_pos % bs            # [B, L]
        j = torch.arange(q_max)                                         # [Q]
        q_pos = (ctx - qlens).unsqueeze(1) + j                          # [B, Q]
        mask = (k_pos <= q_pos.unsqueeze(-1)) & (k_pos < ctx.view(-1, 1, 1))   # [B, Q, L]
        if self.sliding_window is not None:
            mask &= k_pos > q_pos.unsqueeze(-1) - self.sliding_window
        mask[..., 0] |= ~mask.any(-1)        # padding rows: attend to key 0 rather than nothing
        valid = j < qlens.unsqueeze(1)
        token_index = torch.where(valid, q_starts.unsqueeze(1) + j, q_starts.unsqueeze(1))
        return _SubBatch(key_slots.to(device), mask.unsqueeze(1).to(device),
                         token_index.to(device), valid.to(device))

    def _attend(self, q: torch.Tensor, kv_cache: torch.Tensor, sb: _SubBatch) -> torch.Tensor:
        # q [B, Q, H, D] → [B, Q, H, D]
        k = kv_cache[0][sb.key_slots].transpose(1, 2)                   # [B, Hkv, L, D]
        v = kv_cache[1][sb.key_slots].transpose(1, 2)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=sb.mask,
                                           scale=self.scale,
                                           enable_gqa=self.num_heads != self.num_kv_heads)
        return o.transpose(1, 2)

    def forward(self, q, k, v, kv_cache, meta: TorchMetadata) -> torch.Tensor:
        kv_cache[0].index_copy_(0, meta.slot_mapping, k)
        kv_cache[1].index_copy_(0, meta.slot_mapping, v)
        out = torch.empty_like(q)
        nd = meta.num_decode_tokens
        if meta.decode is not None:
            out[:nd] = self._attend(q[:nd].unsqueeze(1), kv_cache, meta.decode).squeeze(1)
        if meta.prefill is not None:
            sb = meta.prefill
            o = self._attend(q[sb.token_index], kv_cache, sb)           # [Bp, Qmax, H, D]
            out[sb.token_index[sb.valid]] = o[sb.valid]
        return out
