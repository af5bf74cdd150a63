"""Attention on the CPU with ember's kernels: the torch backend's cache layout and prefill path,
with the two per-step hot spots replaced by one kernel call each:

  kv_write      the step's new keys and values go to their slots (instead of two index_copy_)
  paged_decode  each decode reads its keys and values straight from its blocks, through the block
                table (instead of gathering every block into a padded copy, then three matmuls)

Prefill chunks keep the torch backend's SDPA path: there the gather is amortised over many queries.
Falls back to the torch backend wholesale when the kernels cannot serve (no library, fp16, shapes).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ember.attention.base import BatchLayout
from ember.attention.torch_ref import TorchAttentionBackend, TorchMetadata
from ember.kernels import cpu_kernels, kernel_dtype

_HEAD_DIMS = (16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 256)   # compiled in (kernels.cpp)
_MAX_BLOCK_SIZE, _MAX_GROUP = 16, 8


@dataclass
class CpuMetadata(TorchMetadata):
    decode_tables: torch.Tensor | None = None    # [num_decodes, max_blocks] int32
    decode_ctx: torch.Tensor | None = None       # [num_decodes] int32
    kernels_fit: bool = False                    # head size, group size and block size fit


class CpuAttentionBackend(TorchAttentionBackend):
    def kernels_fit(self, block_size: int) -> bool:
        return (self.head_dim in _HEAD_DIMS and block_size <= _MAX_BLOCK_SIZE
                and self.num_heads // self.num_kv_heads <= _MAX_GROUP)

    def build_metadata(self, layout: BatchLayout, device: torch.device) -> CpuMetadata:
        m = super().build_metadata(layout, device)
        nd = layout.num_decodes
        tables = layout.block_tables[:nd].to(torch.int32).contiguous()
        ctx = layout.context_lens[:nd].to(torch.int32).contiguous()
        return CpuMetadata(m.slot_mapping.contiguous(), m.num_decode_tokens, m.decode, m.prefill,
                           tables, ctx, self.kernels_fit(layout.block_size))

    def forward(self, q, k, v, kv_cache, meta: CpuMetadata) -> torch.Tensor:
        lib = cpu_kernels(kv_cache)
        if (lib is None or not meta.kernels_fit or q.dtype != kv_cache.dtype
                or not all(t.stride(-1) == 1 and t.stride(-2) == self.head_dim for t in (q, k, v))):
            return super().forward(q, k, v, kv_cache, meta)
        _, hk, num_blocks, bs, d = kv_cache.shape
        lib.ember_kv_write(kv_cache.element_size(), k.data_ptr(), k.stride(0), v.data_ptr(),
                           v.stride(0), kv_cache.data_ptr(), meta.slot_mapping.data_ptr(),
                           k.shape[0], hk, num_blocks * bs, d)
        out = q.new_empty(q.shape)
        nd = meta.num_decode_tokens
        if nd:
            tables = meta.decode_tables
            lib.ember_paged_decode(kernel_dtype(q.dtype), q.data_ptr(), q.stride(0),
                                   kv_cache.data_ptr(), tables.data_ptr(), tables.shape[1],
                                   meta.decode_ctx.data_ptr(), out.data_ptr(), nd,
                                   self.num_heads, hk, num_blocks, bs, d, self.scale,
                                   self.sliding_window or 0)
        sb = meta.prefill
        if sb is not None:
            o = self._prefill(q[sb.token_index], kv_cache, sb)          # [Bp, Qmax, H, D]
            out[sb.token_index[sb.valid]] = o[sb.valid]
        return out
