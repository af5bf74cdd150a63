"""Block tables per request over one BlockPool.

A request's block table covers its computed tokens plus the tokens scheduled this step:
block j holds token positions [j * block_size, (j + 1) * block_size).
Prefix sharing (n > 1 siblings, and the prefix cache when enabled) hands a request the leading
*full* blocks of someone else's table; a request only ever writes into blocks past those.
"""
from __future__ import annotations

from ember.core.block_pool import BlockPool
from ember.core.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_cache=None) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.tables: dict[str, list[int]] = {}
        self._offered: dict[str, int] = {}      # full blocks already offered to the prefix cache
        self.prefix_cache = prefix_cache
        if prefix_cache is not None:
            prefix_cache.attach(self.pool, block_size)

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests (cached-but-evictable blocks count as free)."""
        evictable = self.prefix_cache.num_evictable if self.prefix_cache else 0
        return 1.0 - (self.pool.num_free + evictable) / self.pool.num_blocks

    def block_table(self, request_id: str) -> list[int]:
        return self.tables[request_id]

    def reuse_prefix(self, req: Request) -> None:
        """Before a waiting request's first chunk: start from KV that others already computed."""
        if req.num_computed_tokens or req.request_id in self.tables:
            return
        # Keep at least one prompt token to compute: its logits give the first sample.
        limit = req.num_tokens - 1
        blocks: list[int] = []
        parent = req.parent
        if parent is not None and parent.request_id in self.tables:
            # Only the prompt is common to both: past it (a resumed child has outputs of its
            # own) the parent's blocks hold the parent's tokens.
            n_full = min(parent.num_computed_tokens, req.num_prompt_tokens, limit) // self.block_size
            blocks = self.tables[parent.request_id][:n_full]
        if self.prefix_cache is not None:
            cached = self.prefix_cache.match(req.all_token_ids[:limit])
            if len(cached) > len(blocks):
                blocks = cached
        self.pool.retain(blocks)
        self.tables[req.request_id] = list(blocks)
        req.num_computed_tokens = req.num_cached_tokens = len(blocks) * self.block_size

    def allocate(self, req: Request, num_new_tokens: int) -> bool:
        """Grow req's table to cover num_new_tokens more tokens; False if the pool cannot."""
        table = self.tables.setdefault(req.request_id, [])
        need = cdiv(req.num_computed_tokens + num_new_tokens, self.block_size) - len(table)
        if need <= 0:
            return True
        if need > self.pool.num_free and self.prefix_cache is not None:
            self.prefix_cache.evict(need - self.pool.num_free)
        if need > self.pool.num_free:
            return False
        table.extend(self.pool.allocate(need))
        return True

    def cache_computed(self, req: Request) -> None:
        """Offer req's computed full blocks to the prefix cache (prompt, and output so far)."""
        if self.prefix_cache is None or req.request_id not in self.tables:
            return
        n_full = req.num_computed_tokens // self.block_size
        if n_full <= self._offered.get(req.request_id, 0):
            return
        self._offered[req.request_id] = n_full
        self.prefix_cache.insert(req.all_token_ids[:n_full * self.block_size],
                                 self.tables[req.request_id][:n_full])

    def free(self, req: Request) -> None:
        table = self.tables.pop(req.request_id, None)
        self._offered.pop(req.request_id, None)
        if table:
            # Release from the tail so that an evicting cache sees prefixes outlive their suffixes.
            self.pool.release(table[::-1])

    def check_integrity(self) -> None:
        """Every block is free, cached, or held; ref counts equal the number of tables using it."""
        counts = [0] * self.pool.num_blocks
        for table in self.tables.values():
            for b in table:
                counts[b] += 1
        assert counts == self.pool.ref_count, "ref counts disagree with block tables"
        free = self.pool.free_ids()
        assert len(free) == self.pool.num_free, "a block is on the free list twice"
        cached = self.prefix_cache.cached_blocks() if self.prefix_cache else set()
        for b in range(self.pool.num_blocks):
            states = (b in free) + (b in cached and counts[b] == 0) + (counts[b] > 0)
            assert states == 1, f"block {b} is in {states} states (free/cached/held)"
        assert not (free & cached), "a cached block is on the free list"
        if self.prefix_cache is not None:
            self.prefix_cache.check_integrity()
