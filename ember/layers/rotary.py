"""Rotary position embedding (Hugging Face's half-split layout) with the scalings configs ask for.

The cos/sin table covers every position up to max_position; a forward gathers rows by position.
Supported rope_type: default, linear, dynamic (static NTK at max_position), llama3, yarn.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ember import kernels


def _llama3(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    factor, lo, hi = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
    return torch.where(medium, smoothed, scaled)


def _yarn(base: float, dim: int, s: dict, max_pos: int) -> tuple[torch.Tensor, float]:
    factor = s["factor"]
    orig = s.get("original_max_position_embeddings") or max_pos

    def mscale(scale: float, m: float = 1.0) -> float:
        return 0.1 * m * math.log(scale) + 1.0 if scale > 1 else 1.0

    attn = s.get("attention_factor")
    if attn is None:
        m, m_all = s.get("mscale"), s.get("mscale_all_dim")
        attn = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(s.get("beta_fast", 32)), correction_dim(s.get("beta_slow", 1))
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.int64).float() - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    extrapolate = 1 - ramp
    inv = (1 / (factor * pos_freqs)) * (1 - extrapolate) + (1 / pos_freqs) * extrapolate
    return inv, attn


def rope_frequencies(head_dim: int, base: float, scaling: dict | None,
                     max_position: int, orig_max_position: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim // 2] and the attention scaling applied to cos/sin."""
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv, 1.0
    if kind == "linear":
        return inv / scaling["factor"], 1.0
    if kind == "dynamic":
        if max_position <= orig_max_position:
            return inv, 1.0
        f = scaling["factor"]
        base = base * (f * max_position / orig_max_position - (f - 1)) ** (head_dim / (head_dim - 2))
        return 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim), 1.0
    if kind == "llama3":
        return _llama3(inv, scaling), 1.0
    if kind == "yarn":
        return _yarn(base, head_dim, scaling, orig_max_position)
    raise ValueError(f"unsupported rope scaling type {kind!r}")


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, base: float, scaling: dict | None,
                 max_position: int, orig_max_position: int) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.args = (head_dim, base, scaling, max_position, orig_max_position)
        self.cos_sin: torch.Tensor | None = None   # [max_position, head_dim] (cos | sin)

    def build_cache(self, device: torch.device, dtype: torch.dtype) -> None:
        """Called once the model is on its device (the module is first built on 'meta')."""
        inv, attn_scale = rope_frequencies(*self.args)
        t = torch.arange(self.args[3], dtype=torch.int64).float()
        freqs = torch.outer(t, inv)
        cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1) * attn_scale
        self.cos_sin = cos_sin.to(device=device, dtype=torch.float32).to(dtype)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """positions [T]; q [T, H, D]; k [T, Hkv, D] → rotated (q, k)."""
        return kernels.rotary(positions, q, k, self.cos_sin)
