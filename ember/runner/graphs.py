"""Captured decode steps: a pure-decode step (every request adds one token and samples) replays a
device graph recorded at start-up for the smallest padded batch size that holds it.

One graph per batch size bucket (1, 2, 4, 8, then multiples of 16) runs the model and the LM head
on static input buffers; the attention backend keeps its metadata in persistent buffers too
(`graph_buffers` / `graph_metadata` / `fill_graph_metadata`). Padding rows carry token 0 at
position 0, context 0 and KV slot -1: they write nothing and their logits are dropped. Prefill
and mixed steps, and batches above the largest bucket, run eagerly. All graphs share one memory
pool: they never run at once. The device calls themselves live in ember.platforms.
"""
from __future__ import annotations

import bisect
import logging
import time

import torch

from ember import platforms
from ember.attention import BatchLayout

log = logging.getLogger("ember")


def graph_batch_sizes(max_batch: int) -> list[int]:
    """The padded batch sizes captured for decode steps of up to max_batch requests."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16))
    return sizes + [max_batch]


def padded_batch_size(sizes: list[int], n: int) -> int | None:
    """The smallest captured size that holds n rows, or None (run eagerly)."""
    i = bisect.bisect_left(sizes, n)
    return sizes[i] if i < len(sizes) else None


def supports_graphs(backend) -> bool:
    return all(hasattr(backend, f) for f in ("graph_buffers", "graph_metadata",
                                               "fill_graph_metadata"))


class DecodeGraphs:
    def __init__(self, model, backend, kv_caches: list[torch.Tensor], max_batch: int,
                 max_blocks_per_seq: int, device: torch.device) -> None:
        self.model, self.backend, self.kv_caches, self.device = model, backend, kv_caches, device
        self.sizes = graph_batch_sizes(max_batch)
        self.input_ids = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=device)
        backend.graph_buffers(max_batch, max_blocks_per_seq, device)
        self.graphs: dict[int, tuple[object, torch.Tensor]] = {}
        self.replays = 0
        t0 = time.perf_counter()
        pool = platforms.graph_pool(device)
        for b in reversed(self.sizes):          # largest first: smaller ones reuse its memory
            self.graphs[b] = self._capture(b, pool)
        platforms.synchronize(device)
        log.info("captured %d decode graphs (batch 1..%d) in %.1f s", len(self.sizes), max_batch,
                 time.perf_counter() - t0)

    def _capture(self, b: int, pool) -> tuple[object, torch.Tensor]:
        meta = self.backend.graph_metadata(b, self.device)

        def step() -> torch.Tensor:
            hidden = self.model(self.input_ids[:b], self.positions[:b], self.kv_caches, meta)
            return self.model.compute_logits(hidden)

        step()          # warm-up outside the capture: kernels compile, libraries pick algorithms
        platforms.synchronize(self.device)
        return platforms.capture_graph(self.device, step, pool)

    def can_run(self, layout: BatchLayout) -> bool:
        n = len(layout.query_lens)
        return layout.num_decodes == n and n <= self.sizes[-1]

    def run(self, input_ids: torch.Tensor, layout: BatchLayout) -> torch.Tensor:
        """input_ids [n] (host) of a pure-decode step → logits [n, vocab]."""
        n = input_ids.shape[0]
        b = padded_batch_size(self.sizes, n)
        host = torch.zeros(2, b, dtype=torch.long)
        host[0, :n], host[1, :n] = input_ids, layout.positions
        dev = host.to(self.device, non_blocking=True)
        self.input_ids[:b].copy_(dev[0])
        self.positions[:b].copy_(dev[1])
        self.backend.fill_graph_metadata(layout, b)
        graph, logits = self.graphs[b]
        graph.replay()
        self.replays += 1
        return logits[:n]
