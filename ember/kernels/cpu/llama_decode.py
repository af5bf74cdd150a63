"""A whole decode step of a Llama-family model on the CPU in one kernel call.

At decode the work per layer is small (a few GEMVs) and a step through the nn.Modules costs a
dozen Python calls per layer: at batch 1 that overhead rivals the weight reads themselves. When a
step is all decodes, LlamaModel hands the layer stack to `ember_decode_layers` (kernels.cpp), which
runs the same steps as LlamaDecoderLayer.forward through the same kernels. The modules stay the
definition (and serve prefill, fp32 and other devices); tests check the two agree.
"""
from __future__ import annotations

import ctypes

import torch

from ember.attention.cpu_paged import CpuAttentionBackend, CpuMetadata
from ember.kernels import cpu

_P = ctypes.c_void_p


class _LayerWeights(ctypes.Structure):
    _fields_ = [(name, _P) for name in ("input_norm", "post_norm", "qkv", "qkv_bias", "q_norm",
                                        "k_norm", "o", "gate_up", "down", "qkv_scale", "o_scale",
                                        "gate_up_scale", "down_scale", "kv_cache",
                                        "qkv_offsets", "o_offsets", "gate_up_offsets",
                                        "down_offsets")]


class _DecodeShape(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int64) for name in ("hidden", "heads", "kv_heads", "head_dim",
                                                    "inter", "num_blocks", "block_size", "window")
                ] + [("eps", ctypes.c_float), ("scale", ctypes.c_float)]


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class FusedLlamaDecode:
    """Holds raw pointers to the model's weights (taken on first use) and KV caches (re-taken
    when the caches change). Built by the model's post_load: anything that replaces weights must
    go through post_load again, which packs them anew and builds a new FusedLlamaDecode."""

    def __init__(self, model) -> None:
        self.model = model
        self._layers = None            # built on first use: the KV caches come after the model
        self._cache_key = None

    @classmethod
    def build(cls, model) -> FusedLlamaDecode | None:
        """For a loaded LlamaModel, or None where the kernels cannot run it as the modules do."""
        first = model.layers[0]
        attn, mlp = first.self_attn, first.mlp
        linears = [m for layer in model.layers for m in (
            layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
            layer.mlp.down_proj)]
        d = attn.head_dim
        fits = (cpu.has_linear_bf16() and first.input_layernorm.weight.dtype == torch.bfloat16
                and first.input_layernorm.weight.device.type == "cpu"
                and all(m.packed is not None and m.ps.tp_size == 1 for m in linears)
                and all(m.bias is None for layer in model.layers
                        for m in (layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                                  layer.mlp.down_proj))
                and isinstance(attn.attn, CpuAttentionBackend)
                and d % 32 == 0 and model.rotary.cos_sin.dtype == torch.bfloat16
                and first.input_layernorm.weight.shape[0] % 16 == 0
                and mlp.down_proj.weight.shape[1] % 32 == 0)
        return cls(model) if fits else None

    def serves(self, meta, num_tokens: int) -> bool:
        return isinstance(meta, CpuMetadata) and meta.pure_decode and len(meta.context) == num_tokens

    def _layer_weights(self, kv_caches: list[torch.Tensor]):
        key = tuple(c.data_ptr() for c in kv_caches)
        if key != self._cache_key:
            layers = (_LayerWeights * len(self.model.layers))()
            for entry, layer, cache in zip(layers, self.model.layers, kv_caches):
                a, m = layer.self_attn, layer.mlp
                entry.input_norm = layer.input_layernorm.weight.data_ptr()
                entry.post_norm = layer.post_attention_layernorm.weight.data_ptr()
                entry.qkv, entry.qkv_bias = a.qkv_proj.packed.data_ptr(), _ptr(a.qkv_proj.bias)
                entry.q_norm = _ptr(a.q_norm.weight if a.q_norm is not None else None)
                entry.k_norm = _ptr(a.k_norm.weight if a.k_norm is not None else None)
                entry.o, entry.gate_up = a.o_proj.packed.data_ptr(), m.gate_up_proj.packed.data_ptr()
                entry.down, entry.kv_cache = m.down_proj.packed.data_ptr(), cache.data_ptr()
                entry.qkv_scale, entry.o_scale = _ptr(a.qkv_proj.scales), _ptr(a.o_proj.scales)
                entry.gate_up_scale = _ptr(m.gate_up_proj.scales)
                entry.down_scale = _ptr(m.down_proj.scales)
                entry.qkv_offsets, entry.o_offsets = (_ptr(a.qkv_proj.offsets),
                                                      _ptr(a.o_proj.offsets))
                entry.gate_up_offsets = _ptr(m.gate_up_proj.offsets)
                entry.down_offsets = _ptr(m.down_proj.offsets)
            self._layers, self._cache_key = layers, key
            a, cache = self.model.layers[0].self_attn, kv_caches[0]
            self._shape = _DecodeShape(
                hidden=self.model.layers[0].input_layernorm.weight.shape[0], heads=a.num_heads,
                kv_heads=a.num_kv_heads, head_dim=a.head_dim,
                inter=self.model.layers[0].mlp.down_proj.weight.shape[1],
                num_blocks=cache.shape[2], block_size=cache.shape[3],
                window=a.attn.sliding_window or 0, eps=self.model.layers[0].input_layernorm.eps,
                scale=a.attn.scale)
        return self._layers

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                 meta) -> torch.Tensor:
        """x [B, H] embeddings → x is the last layer's output (in place); returns the residual."""
        layers = self._layer_weights(kv_caches)
        residual = torch.empty_like(x)
        positions = positions.contiguous()
        tables = meta.tables
        cpu.library().ember_decode_layers(
            layers, len(layers), ctypes.byref(self._shape), x.data_ptr(), residual.data_ptr(),
            x.shape[0], positions.data_ptr(), self.model.rotary.cos_sin.data_ptr(),
            meta.slot_mapping.data_ptr(), tables.data_ptr(), tables.shape[1],
            meta.context.data_ptr())
        return residual
