"""The Llama family as plain nn.Modules: Llama 2/3 (SmolLM2), Mistral, Qwen2/2.5 (qkv bias),
Qwen3 (per-head q/k RMSNorm). Differences are config flags, not copies.

forward(input_ids [T], positions [T], kv_caches, attn_meta) → hidden states [T, hidden];
compute_logits runs the LM head only on the rows that sample.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ember.attention import AttentionBackend, AttentionMetadata
from ember.config import ModelConfig
from ember.distributed import SINGLE, ParallelState
from ember.kernels.cpu.llama_decode import FusedLlamaDecode
from ember.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from ember.layers.linear import (MergedColumnParallelLinear, PackedWeight, QKVParallelLinear,
                                 RowParallelLinear)
from ember.layers.norm import RMSNorm
from ember.layers.rotary import RotaryEmbedding


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, backend: AttentionBackend,
                 ps: ParallelState) -> None:
        super().__init__()
        d = cfg.head_dim
        self.num_heads = cfg.num_heads // ps.tp_size
        self.num_kv_heads = max(1, cfg.num_kv_heads // ps.tp_size)
        self.q_size, self.kv_size = self.num_heads * d, self.num_kv_heads * d
        self.head_dim = d
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, d, cfg.num_heads, cfg.num_kv_heads,
                                          cfg.attention_bias, ps)
        self.o_proj = RowParallelLinear(cfg.num_heads * d, cfg.hidden_size, False, ps)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.rotary = rotary
        self.attn = backend

    def forward(self, positions, x, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        o = self.attn.forward(q, k, v, kv_cache, meta)
        return self.o_proj(o.reshape(t, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, ps: ParallelState) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            cfg.hidden_size, [cfg.intermediate_size] * 2, False, ps)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, False, ps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_up_proj.silu_and_mul(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg, rotary, backend, ps) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, rotary, backend, ps)
        self.mlp = LlamaMLP(cfg, ps)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions, x, residual, kv_cache, meta):
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, kv_cache, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, max_position: int,
                 ps: ParallelState) -> None:
        super().__init__()
        orig = (cfg.rope_scaling or {}).get("original_max_position_embeddings",
                                            cfg.max_position_embeddings)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling,
                                      max(max_position, cfg.max_position_embeddings), orig)
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, ps)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, self.rotary, backend, ps)
                                    for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # all layers of a pure-decode step in one CPU kernel call (set by post_load where it fits)
        self.fused_decode: FusedLlamaDecode | None = None

    def forward(self, input_ids, positions, kv_caches, meta) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        if self.fused_decode is not None and self.fused_decode.serves(meta, x.shape[0]):
            residual = self.fused_decode(x, positions, kv_caches, meta)
        else:
            for layer, kv_cache in zip(self.layers, kv_caches):
                x, residual = layer(positions, x, residual, kv_cache, meta)
        x, _ = self.norm(x, residual)
        return x


class LlamaForCausalLM(nn.Module):
    # checkpoint name → (our packed parameter, its shard)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, max_position: int,
                 ps: ParallelState = SINGLE) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg, backend, max_position, ps)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, ps)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, positions, kv_caches, meta) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def greedy_tokens(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """compute_logits(hidden).argmax(-1) where a kernel can answer without the logits."""
        return self.lm_head.greedy_tokens(hidden)

    def post_load(self, device: torch.device, dtype: torch.dtype,
                  quantization: str | None = None, pack: bool = True) -> None:
        """After the weights are in: rotary tables, packed (or quantized) linear weights unless
        `pack` is False (they came packed from the prepared cache), the greedy LM head's tables,
        the fused decode."""
        self.model.rotary.build_cache(device, dtype)
        for module in self.modules():
            if pack and isinstance(module, PackedWeight):
                module.pack_weight(quantization)
        self.lm_head.prepare_greedy()
        self.model.fused_decode = FusedLlamaDecode.build(self.model)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load checkpoint tensors by name; returns the names of parameters that were filled."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb" in name or (name == "lm_head.weight" and self.config.tie_word_embeddings):
                continue
            target, shard = name, None
            for ckpt, (packed, shard_id) in self.packed_modules_mapping.items():
                if f".{ckpt}." in name:
                    target, shard = name.replace(ckpt, packed), shard_id
                    break
            if target not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
            param, owner = params[target], self.get_submodule(target.rpartition(".")[0])
            if hasattr(owner, "weight_loader"):      # parallel layers know their shard
                owner.weight_loader(param, tensor, shard)
            elif param.shape != tensor.shape:
                raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(param.shape)}")
            else:
                param.data.copy_(tensor)
            loaded.add(target)
        return loaded
