"""Attention backends over the paged KV cache. A registry with lazy imports: only the chosen one loads."""
from __future__ import annotations

import importlib

from ember.attention.base import AttentionBackend, AttentionMetadata, BatchLayout

_BACKENDS = {"torch": "ember.attention.torch_ref:TorchAttentionBackend"}


def get_backend(name: str = "torch", **kwargs) -> AttentionBackend:
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; available: {', '.join(_BACKENDS)}")
    module, cls = _BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)(**kwargs)


__all__ = ["AttentionBackend", "AttentionMetadata", "BatchLayout", "get_backend"]
