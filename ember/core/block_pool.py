"""The pool of KV blocks.

Contract: every block id in [0, num_blocks) is in exactly one of three states:
  free       ref_count 0, on the free list;
  held       ref_count > 0: used by that many running requests (n > 1 siblings and prefix-cache
             hits share full prompt blocks; a shared block is full and never written again);
  cached     ref_count 0 but owned by the prefix cache (evictable, not on the free list).
Whoever takes a reference gives it back with `release`; the pool returns a block to the free list
when its count reaches 0, unless the prefix cache has claimed it (`on_release` returns True).
"""
from __future__ import annotations

from collections import deque
from typing import Callable


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.ref_count = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self.num_cached_unused = 0          # blocks in the 'cached' state (ref 0, cache-owned)
        # Set by a prefix cache: called with a block whose count dropped to 0; True = cache keeps it.
        self.on_release: Callable[[int], bool] = lambda block: False

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"asked for {n} KV blocks, {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(n)]
        for b in blocks:
            self.ref_count[b] = 1
        return blocks

    def retain(self, blocks: list[int]) -> None:
        for b in blocks:
            if self.ref_count[b] == 0:      # only a cached block can be taken up again at 0
                self.num_cached_unused -= 1
            self.ref_count[b] += 1

    def release(self, blocks: list[int]) -> None:
        for b in blocks:
            self.ref_count[b] -= 1
            if self.ref_count[b] < 0:
                raise RuntimeError(f"KV block {b} released more often than taken")
            if self.ref_count[b] == 0:
                if self.on_release(b):
                    self.num_cached_unused += 1
                else:
                    self._free.append(b)

    def give_back(self, block: int) -> None:
        """The prefix cache evicted a cached (ref 0) block: it becomes free."""
        assert self.ref_count[block] == 0
        self.num_cached_unused -= 1
        self._free.append(block)

    def free_ids(self) -> set[int]:
        return set(self._free)
