"""The attention backend contract.

The runner describes a step's batch once (`BatchLayout`); the backend turns it into its own
`AttentionMetadata` once per step; every layer then calls `forward` with that metadata.
The KV cache of one layer is one tensor whose shape the backend chooses (`kv_cache_shape`);
token slots are numbered slot = block_id * block_size + offset.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass
class BatchLayout:
    """One step's batch. Requests are ordered decodes (query_len 1) first, then prefill chunks."""
    query_lens: torch.Tensor      # [B] new tokens per request this step
    context_lens: torch.Tensor    # [B] tokens in the cache after this step (computed + new)
    positions: torch.Tensor       # [T] position of every new token
    block_tables: torch.Tensor    # [B, max_blocks] (padded with 0)
    num_decodes: int              # the first num_decodes requests have query_len 1
    max_query_len: int
    max_context_len: int
    block_size: int


class AttentionMetadata:
    """Backend-specific, built once per step. Must at least carry slot_mapping [T]."""
    slot_mapping: torch.Tensor


class AttentionBackend(ABC):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int,
                 scale: float, sliding_window: int | None = None) -> None:
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.sliding_window = sliding_window

    @abstractmethod
    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]: ...

    @abstractmethod
    def build_metadata(self, layout: BatchLayout, device: torch.device) -> AttentionMetadata: ...

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hkv, D] for the new tokens → [T, H, D]. Writes k/v to the cache."""
