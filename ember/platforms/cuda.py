"""CUDA-only calls (graph capture, memory pools, device properties), behind small functions.

Imported lazily by ember.platforms: nothing here runs on a machine without CUDA.
"""
from __future__ import annotations

from typing import Callable

import torch


def multiprocessor_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def graph_pool() -> object:
    """A memory pool that every captured graph of one runner shares (they never run at once)."""
    return torch.cuda.graph_pool_handle()


def capture(fn: Callable[[], object], pool: object) -> tuple[torch.cuda.CUDAGraph, object]:
    """Capture fn() into a graph on a side stream (torch.cuda.graph's); returns (graph, fn's
    outputs, which live in the pool and are overwritten by every replay)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out
