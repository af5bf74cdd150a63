"""Radix-tree prefix cache at KV-block granularity (SGLang's RadixAttention idea, ours in code).

Each node is one full KV block; its edge key is the block's block_size token ids, so a path from
the root spells a token prefix and holds the blocks that computed it. A block in the tree stays
cached when its last user releases it (ref count 0 = evictable); eviction takes unreferenced
leaves, least recently used first, and only when the allocator asks. A block a running request
holds (ref > 0) is never evicted; neither is a node with children (its prefix is still needed).
"""
from __future__ import annotations

import heapq
import itertools
import time

from ember.core.block_pool import BlockPool


class _Node:
    __slots__ = ("key", "block", "parent", "children", "last_access")

    def __init__(self, key: tuple, block: int, parent: "_Node | None") -> None:
        self.key, self.block, self.parent = key, block, parent
        self.children: dict[tuple, _Node] = {}
        self.last_access = time.monotonic()


class RadixPrefixCache:
    def __init__(self) -> None:
        self.root = _Node((), -1, None)
        self.nodes: dict[int, _Node] = {}      # block id → its node
        self.pool: BlockPool | None = None
        self.block_size = 0
        self.hit_tokens = 0                    # prompt tokens served from the cache
        self.queried_tokens = 0                # prompt tokens looked up
        self._tick = itertools.count()

    def attach(self, pool: BlockPool, block_size: int) -> None:
        self.pool, self.block_size = pool, block_size
        pool.on_release = lambda block: block in self.nodes

    def _keys(self, token_ids: list[int]):
        bs = self.block_size
        for i in range(len(token_ids) // bs):
            yield tuple(token_ids[i * bs:(i + 1) * bs])

    def _walk(self, token_ids: list[int]) -> list[_Node]:
        node, path = self.root, []
        for key in self._keys(token_ids):
            node = node.children.get(key)
            if node is None:
                break
            path.append(node)
        return path

    def match_len(self, token_ids: list[int]) -> int:
        return len(self._walk(token_ids)) * self.block_size

    def match(self, token_ids: list[int]) -> list[int]:
        """Blocks of the longest cached prefix of token_ids (the caller takes references)."""
        path = self._walk(token_ids)
        now = time.monotonic()
        for node in path:
            node.last_access = now
        self.queried_tokens += len(token_ids)
        self.hit_tokens += len(path) * self.block_size
        return [n.block for n in path]

    def insert(self, token_ids: list[int], blocks: list[int]) -> None:
        """Record that blocks[i] holds the KV of token_ids' i-th block (len == len(blocks) * bs)."""
        node, now = self.root, time.monotonic()
        for key, block in zip(self._keys(token_ids), blocks):
            child = node.children.get(key)
            if child is None:
                if block in self.nodes:       # already cached under another prefix: cannot be
                    return
                child = _Node(key, block, node)
                node.children[key] = child
                self.nodes[block] = child
            child.last_access = now
            node = child

    @property
    def num_evictable(self) -> int:
        return self.pool.num_cached_unused

    def cached_blocks(self) -> set[int]:
        return set(self.nodes)

    def evict(self, n: int) -> int:
        """Free up to n unreferenced leaf blocks, oldest first; returns how many were freed."""
        evictable = lambda nd: not nd.children and self.pool.ref_count[nd.block] == 0
        heap = [(nd.last_access, next(self._tick), nd) for nd in self.nodes.values() if evictable(nd)]
        heapq.heapify(heap)
        freed = 0
        while heap and freed < n:
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            del parent.children[node.key]
            del self.nodes[node.block]
            self.pool.give_back(node.block)
            freed += 1
            if parent is not self.root and evictable(parent):
                heapq.heappush(heap, (parent.last_access, next(self._tick), parent))
        return freed

    def reset(self) -> int:
        """Drop every unreferenced block (e.g. after a weight update); returns how many."""
        return self.evict(len(self.nodes))

    def check_integrity(self) -> None:
        seen = 0
        stack = [self.root]
        while stack:
            node = stack.pop()
            for key, child in node.children.items():
                assert child.parent is node and child.key == key, "broken parent/key link"
                assert len(key) == self.block_size, "edge key is not one block"
                assert self.nodes.get(child.block) is child, "node index out of sync"
                stack.append(child)
                seen += 1
        assert seen == len(self.nodes), "nodes unreachable from the root"
        unused = sum(1 for b in self.nodes if self.pool.ref_count[b] == 0)
        assert unused == self.pool.num_cached_unused, "cached-unused count out of sync"
