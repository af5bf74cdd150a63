"""Attention backends over the paged KV cache. A registry with lazy imports: only the chosen one loads.

"auto" picks per device type (`auto_backend`): the Triton kernels on CUDA when triton imports,
ember's CPU kernels on a CPU where they built, else the portable torch backend.
"""
from __future__ import annotations

import importlib
import importlib.util

import torch

from ember.attention.base import AttentionBackend, AttentionMetadata, BatchLayout

_BACKENDS = {"torch": "ember.attention.torch_ref:TorchAttentionBackend",
             "cpu": "ember.attention.cpu_paged:CpuAttentionBackend",
             "triton": "ember.attention.triton_paged:TritonPagedBackend"}


def auto_backend(device: torch.device) -> str:
    """The backend "auto" means on this device type."""
    if device.type == "cuda" and importlib.util.find_spec("triton") is not None:
        return "triton"
    if device.type == "cpu":
        from ember.kernels import cpu
        if cpu.library() is not None:
            return "cpu"
    return "torch"


def get_backend(name: str = "torch", device: torch.device | str | None = None,
                **kwargs) -> AttentionBackend:
    if name == "auto":
        from ember import platforms
        name = auto_backend(torch.device(device) if device is not None
                            else platforms.default_device())
        if name != "torch":
            try:
                return _load(name)(**kwargs)
            except ValueError:          # a shape the fast kernels do not cover
                name = "torch"
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; "
                         f"available: auto, {', '.join(_BACKENDS)}")
    return _load(name)(**kwargs)


def _load(name: str) -> type[AttentionBackend]:
    module, cls = _BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["AttentionBackend", "AttentionMetadata", "BatchLayout", "auto_backend", "get_backend"]
