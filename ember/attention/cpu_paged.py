"""Attention on the CPU with ember's kernels, over the torch backend's cache shape:

  kv_write      the step's new keys and values go to their slots (instead of two index_copy_)
  paged_decode  every new token, decode or prefill, attends to its own context straight from the
                cache blocks through its request's block table (online softmax in fp32), after the
                step's keys are written: a prefill token at position p is a "decode" whose context
                is p + 1. No gathered copies, no masks, one call per layer for the whole batch.
                In bf16, keys go in chunks of up to 128 with one softmax update each, and each
                (sequence, KV head) requests the next one's blocks into L2 while it computes.
  paged_prefill in bf16 (no sliding window), prefill rows go in tiles of consecutive rows of
                one request: each key block serves all the tile's rows and heads.
                Against torch's SDPA with a mask (what prefill chunks used before), with both
                kernels: W1's prefill attention 1.34 → 0.53 s (8 × 128-token prompts per step:
                86 → 63 ms per step with the tiles); one 2048-token prompt 3.8 → 2.0 s, 4096
                tokens 10.1 → 5.6 s (blocks in chunks of 4 per softmax update: 2.7 → 2.0 s and
                7.5 → 5.6 s).

The layout inside a block: the torch backend's [block_size][D] rows, except for bf16 caches with
blocks of 16 and head sizes that are multiples of 32 wherever ember's kernels run (`pair_layout`,
the default model's case), which hold each block in the layout the bf16 dot products read: keys
[D/2][16][2] (a dim pair of 16 keys per vector) and values [8][D][2] (a key pair per dim). Scores
then need no horizontal sums and p·v no interleaving, and the decode kernel's arithmetic halves
(one layer of W1's decode, 64 sequences of ~200 keys, data in cache: 270 → 150 µs). With the next
item's blocks prefetched a line at a time, W1's decode attention went from 15.9 to 10.4 ms per
step (30 layers; the cache read from memory). Such a cache is never handed to the torch code.

Falls back to the torch backend wholesale when the kernels cannot serve (no library, fp16, head
or block sizes not compiled in; never over a pair-layout cache); its metadata is then built on
first use.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ember.attention.base import AttentionMetadata, BatchLayout
from ember.attention.torch_ref import TorchAttentionBackend, TorchMetadata
from ember.kernels import cpu, cpu_kernels, kernel_dtype

_HEAD_DIMS = (16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 256)   # compiled in (kernels.cpp)
_MAX_BLOCK_SIZE, _MAX_GROUP = 16, 8
_TILE_QUERIES = 32        # query vectors (rows x heads of a group) per prefill tile: PREFILL_MAX_Q


@dataclass
class CpuMetadata(AttentionMetadata):
    slot_mapping: torch.Tensor       # [T] int64
    tables: torch.Tensor             # [T, max_blocks] int32: each token's request's block table
    context: torch.Tensor            # [T] int32: keys each token attends to (its position + 1)
    pure_decode: bool                # one token per request (what the fused decode step takes)
    num_decodes: int                 # the first rows are decodes, the rest prefill rows
    prefill_tiles: torch.Tensor | None   # [tiles + 1] int32: row ranges of one request each
    layout: BatchLayout
    device: torch.device
    _torch: TorchMetadata | None = None

    def torch_metadata(self, backend: TorchAttentionBackend) -> TorchMetadata:
        """The torch backend's metadata for the same step (for the fallback path), built once."""
        if self._torch is None:
            self._torch = TorchAttentionBackend.build_metadata(backend, self.layout, self.device)
        return self._torch


def pair_layout(dtype: torch.dtype, block_size: int, head_dim: int) -> bool:
    """Whether ember's kernels hold a cache of this kind in the pair layout (kernels.cpp's
    pair_layout(), the same rule)."""
    return (dtype == torch.bfloat16 and block_size == 16 and head_dim % 32 == 0
            and head_dim <= 256 and cpu.has_linear_bf16())


class CpuAttentionBackend(TorchAttentionBackend):
    def kernels_fit(self, block_size: int) -> bool:
        return (self.head_dim in _HEAD_DIMS and block_size <= _MAX_BLOCK_SIZE
                and self.num_heads // self.num_kv_heads <= _MAX_GROUP)

    def build_metadata(self, layout: BatchLayout, device: torch.device
                       ) -> CpuMetadata | TorchMetadata:
        if device.type != "cpu" or cpu.library() is None or not self.kernels_fit(layout.block_size):
            return super().build_metadata(layout, device)
        bs, pos = layout.block_size, layout.positions
        pure_decode = layout.num_decodes == len(layout.query_lens)
        tables = layout.block_tables
        if not pure_decode:                                     # a row per token
            tables = tables[torch.repeat_interleave(torch.arange(len(layout.query_lens)),
                                                    layout.query_lens)]
        slot_mapping = tables.gather(1, (pos // bs).unsqueeze(1)).squeeze(1) * bs + pos % bs
        return CpuMetadata(slot_mapping.contiguous(), tables.to(torch.int32).contiguous(),
                           (pos + 1).to(torch.int32), pure_decode, layout.num_decodes,
                           None if pure_decode else self._prefill_tiles(layout), layout, device)

    def _prefill_tiles(self, layout: BatchLayout) -> torch.Tensor:
        """Start rows of the prefill kernel's tiles (then the end): each prefill request's rows
        cut in runs of at most _TILE_QUERIES // group, so a tile holds one request."""
        rows = max(1, _TILE_QUERIES // (self.num_heads // self.num_kv_heads))
        qlens = layout.query_lens[layout.num_decodes:]
        first_row = layout.num_decodes + torch.cumsum(qlens, 0) - qlens
        per_request = (qlens + rows - 1) // rows
        nth = torch.arange(int(per_request.sum())) - torch.repeat_interleave(
            torch.cumsum(per_request, 0) - per_request, per_request)
        starts = torch.repeat_interleave(first_row, per_request) + nth * rows
        return torch.cat([starts, layout.query_lens.sum().view(1)]).to(torch.int32)

    def forward(self, q, k, v, kv_cache, meta) -> torch.Tensor:
        if not isinstance(meta, CpuMetadata):
            return super().forward(q, k, v, kv_cache, meta)
        lib = cpu_kernels(kv_cache)
        _, hk, num_blocks, bs, d = kv_cache.shape

        def rows_of_heads(t: torch.Tensor) -> bool:       # what the kernels take
            return t.stride(-1) == 1 and t.stride(-2) == d

        if lib is not None and pair_layout(kv_cache.dtype, bs, d):
            # only the kernels read this layout: bring the inputs to what they take
            q, k, v = (t.to(kv_cache.dtype) for t in (q, k, v))
            q, k, v = (t if rows_of_heads(t) else t.contiguous() for t in (q, k, v))
        elif (lib is None or q.dtype != kv_cache.dtype
                or not all(rows_of_heads(t) for t in (q, k, v))):
            return super().forward(q, k, v, kv_cache, meta.torch_metadata(self))
        lib.ember_kv_write(kv_cache.element_size(), k.data_ptr(), k.stride(0), v.data_ptr(),
                           v.stride(0), kv_cache.data_ptr(), meta.slot_mapping.data_ptr(),
                           k.shape[0], hk, num_blocks * bs, bs, d)
        out = q.new_empty(q.shape)
        rows = q.shape[0]
        tiles = meta.prefill_tiles
        if (tiles is not None and q.dtype == torch.bfloat16 and self.sliding_window is None
                and lib.ember_paged_prefill(
                q.data_ptr(), q.stride(0), kv_cache.data_ptr(), meta.tables.data_ptr(),
                meta.tables.shape[1], meta.context.data_ptr(), tiles.data_ptr(),
                len(tiles) - 1, out.data_ptr(), self.num_heads, hk, num_blocks, bs, d,
                self.scale)):
            rows = meta.num_decodes                  # the prefill rows are done
        if rows:
            lib.ember_paged_decode(kernel_dtype(q.dtype), q.data_ptr(), q.stride(0),
                                   kv_cache.data_ptr(), meta.tables.data_ptr(),
                                   meta.tables.shape[1], meta.context.data_ptr(), out.data_ptr(),
                                   rows, self.num_heads, hk, num_blocks, bs, d, self.scale,
                                   self.sliding_window or 0)
        return out
