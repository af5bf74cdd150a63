"""Frozen configuration, one dataclass per concern. HF config dicts are translated once, here."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:   # annotations only: the HTTP front end imports this module without torch
    import torch


def env_str(name: str, default: str | None = None) -> str | None:
    """The one place ember reads environment variables."""
    return os.environ.get(name, default)


def cache_dir() -> str:
    return env_str("EMBER_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "ember")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str            # model_type: llama, mistral, qwen2, qwen3
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        model_type = hf.get("model_type", "llama")
        heads = hf["num_attention_heads"]
        rope = hf.get("rope_scaling") or hf.get("rope_parameters")
        rope_theta = hf.get("rope_theta") or (rope or {}).get("rope_theta") or 10000.0
        if rope is not None:
            rope = dict(rope)
            if rope.get("rope_type", rope.get("type", "default")) == "default":
                rope = None
        eos = hf.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        window = hf.get("sliding_window")
        if model_type in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
            window = None
        return cls(
            architecture=model_type,
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            vocab_size=hf["vocab_size"],
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=rope,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            attention_bias=bool(hf["attention_bias"]) if hf.get("attention_bias") is not None
            else model_type == "qwen2",
            qk_norm=model_type == "qwen3",
            sliding_window=window,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos,
        )


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    # bytes (int) or a fraction of the memory available after loading (float in (0, 1]);
    # None: a sane default for the device (see platforms).
    kv_cache_memory: int | float | None = None
    enable_prefix_caching: bool = True


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048   # prefill tokens per step; decodes ride along (the engine picks platforms.default_step_tokens)
    max_model_len: int = 4096
    policy: str = "fcfs"


@dataclass(frozen=True)
class EngineConfig:
    model: str
    model_config: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    device: torch.device
    dtype: torch.dtype
    seed: int = 0
    enforce_eager: bool = False      # never replay captured decode graphs (CUDA)

    def replace(self, **changes) -> "EngineConfig":
        return dataclasses.replace(self, **changes)
