"""Read GGUF checkpoints (llama.cpp's format) into Hugging Face-style config + weights.

The GGUF is opened with `gguf.GGUFReader`, which memory-maps the file, so nothing is
dequantized until `GGUFCheckpoint.iter_weights()` walks the tensors one at a time.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch

from ember import disk_cache
from ember.models.source import default_gguf_path  # noqa: F401  (re-exported)

if TYPE_CHECKING:   # imported where used: `gguf` takes 0.15 s, and a cached load needs none of it
    import gguf

# GGUF architecture -> (HF model_type, HF architectures entry).
_ARCHS = {
    "llama": ("llama", "LlamaForCausalLM"),
    "mistral": ("mistral", "MistralForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
}

# Per-layer GGUF tensor names (blk.{i}.<key>) -> HF module path under model.layers.{i}.
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# Tensors that are not model parameters. rope_freqs holds precomputed llama3-style rope
# frequency factors; HF derives those from config.rope_scaling, which GGUF does not store for
# llama3, so such models load with rope_scaling=None (a known limitation).
_SKIPPED = {"rope_freqs.weight"}


class GGUFCheckpoint:
    """A memory-mapped GGUF file with an HF-style `config` dict and lazy float32 weights."""

    def __init__(self, path: str, reader: gguf.GGUFReader, config: dict[str, Any], gguf_arch: str):
        self.path = path
        self.config = config
        self._reader = reader
        self._gguf_arch = gguf_arch

    def __repr__(self) -> str:
        return f"GGUFCheckpoint({self.path!r}, model_type={self.config['model_type']!r})"

    def iter_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (HF parameter name, float32 tensor in torch [out, in] layout), one tensor at a time."""
        import gguf
        cfg = self.config
        for t in self._reader.tensors:
            if t.name in _SKIPPED:
                continue
            name = _hf_name(t.name)  # read_gguf already rejected files with unknown tensor names
            # GGUF shapes are listed fastest-dim first (ggml's ne[]); torch wants them reversed.
            w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
            w = np.asarray(w, dtype=np.float32)
            if not w.flags.writeable:  # F32 tensors are read-only views of the mmap: copy them out
                w = w.copy()
            w = torch.from_numpy(w)
            # llama.cpp's convert_hf_to_gguf permutes Q/K rows of the llama architecture so its
            # rope can rotate adjacent pairs (x0,x1),(x2,x3)...; HF's rope rotates the two halves
            # of each head (x_i, x_{i+d/2}). Undo it. qwen2/qwen3 are stored unpermuted.
            if self._gguf_arch == "llama" and (".attn_q." in t.name or ".attn_k." in t.name):
                heads = cfg["num_attention_heads"] if ".attn_q." in t.name else cfg["num_key_value_heads"]
                w = _unpermute_rope_rows(w, heads)
            yield name, w


def _unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    # llama.cpp stored row (h, i, j) of a head as HF row (h, j, i) with i < d/2, j in {0, 1}
    # i.e. it interleaved the two halves; swap those axes back. Works for weights and biases.
    shape = w.shape
    return w.reshape(n_heads, shape[0] // n_heads // 2, 2, *shape[1:]).transpose(1, 2).reshape(shape).contiguous()


def _hf_name(gguf_name: str) -> str | None:
    stem, _, suffix = gguf_name.rpartition(".")
    if suffix not in ("weight", "bias"):
        return None
    if stem in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{suffix}"
    return None


def _field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _build_config(reader: gguf.GGUFReader, path: str) -> tuple[dict[str, Any], str]:
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHS:
        raise ValueError(f"{path}: unsupported GGUF architecture {arch!r} (supported: {', '.join(_ARCHS)})")
    model_type, hf_arch = _ARCHS[arch]
    # llama.cpp converts Mistral checkpoints to the "llama" architecture; only the name tells.
    if arch == "llama" and "mistral" in str(_field(reader, "general.name", "")).lower():
        model_type, hf_arch = _ARCHS["mistral"]

    def a(key: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{key}", default)

    hidden, heads = a("embedding_length"), a("attention.head_count")
    if hidden is None or heads is None or a("block_count") is None:
        raise ValueError(f"{path}: GGUF metadata lacks {arch}.embedding_length/attention.head_count/block_count")
    tensor_names = {t.name for t in reader.tensors}
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    config = {
        "model_type": model_type,
        "architectures": [hf_arch],
        "hidden_size": hidden,
        "intermediate_size": a("feed_forward_length"),
        "num_hidden_layers": a("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": a("attention.head_count_kv", heads),
        # key_length is the explicit head size (Qwen3 has head_dim != hidden/heads); llama.cpp's
        # llama writer only stores rope.dimension_count, which equals head_dim there.
        "head_dim": a("attention.key_length") or (arch == "llama" and a("rope.dimension_count")) or hidden // heads,
        "rms_norm_eps": a("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": a("rope.freq_base", 10000.0),
        "rope_scaling": _rope_scaling(a),
        "max_position_embeddings": a("context_length", 2048),
        "vocab_size": a("vocab_size") or (len(tokens.data) if tokens is not None else None),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "attention_bias": arch == "qwen2" or "blk.0.attn_q.bias" in tensor_names,
        "hidden_act": "silu",
    }
    return config, arch


def _rope_scaling(a) -> dict[str, Any] | None:
    kind = a("rope.scaling.type")
    if kind is None or kind == "none":
        return None
    scaling = {"rope_type": kind, "factor": float(a("rope.scaling.factor", 1.0))}
    if (orig := a("rope.scaling.original_context_length")) is not None:
        scaling["original_max_position_embeddings"] = int(orig)
    for gguf_key, hf_key in (("attn_factor", "attention_factor"), ("yarn_beta_fast", "beta_fast"),
                             ("yarn_beta_slow", "beta_slow")):
        if (v := a(f"rope.scaling.{gguf_key}")) is not None:
            scaling[hf_key] = float(v)
    return scaling


def read_gguf(path: str) -> GGUFCheckpoint:
    """Open a GGUF file (metadata only; weights are dequantized lazily by iter_weights)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    import gguf
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:
        # The reader fails on damaged files with assorted errors (bad magic -> ValueError,
        # truncation -> numpy reshape ValueError / IndexError, garbage -> UnicodeDecodeError...).
        raise ValueError(f"{path}: not a readable GGUF file (truncated or corrupt?): {type(e).__name__}: {e}") from e
    config, arch = _build_config(reader, path)
    # Validate names and quant types up front so a bad file fails at open, not halfway through loading.
    for t in reader.tensors:
        if t.name not in _SKIPPED and _hf_name(t.name) is None:
            raise ValueError(f"{path}: unsupported tensor {t.name!r} for architecture {arch!r}")
    for qtype in {t.tensor_type for t in reader.tensors}:
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        try:
            gguf.quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
        except NotImplementedError:
            raise ValueError(f"{path}: tensor quantization type {qtype.name} is not supported") from None
    return GGUFCheckpoint(path, reader, config, arch)


def _cache_slot(path: str, kind: str) -> tuple[str, str]:
    """(cache folder for this exact file's derived `kind`, its parent). Keyed by path, size, mtime."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {os.path.abspath(path)}")
    return disk_cache.slot(kind, disk_cache.file_key(path))


def load_gguf_weights_cached(path: str) -> tuple[dict[str, Any], Iterator[tuple[str, torch.Tensor]], int]:
    """(config, weights, count) with the dequantized weights cached as safetensors (fp32), so that
    later loads skip GGUF parsing and dequantization (seconds) and just map a file."""
    import json
    from safetensors.torch import load_file, save_file
    cached, root = _cache_slot(path, "weights")
    if os.path.isdir(cached):
        with open(os.path.join(cached, "config.json")) as f:
            config = json.load(f)
        weights = load_file(os.path.join(cached, "model.safetensors"))
        return config, iter(weights.items()), len(weights)
    ckpt = read_gguf(path)
    weights = dict(ckpt.iter_weights())

    def write(tmp: str) -> None:
        save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(tmp, "model.safetensors"))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(ckpt.config, f)

    disk_cache.write_atomically(cached, root, write)
    return ckpt.config, iter(weights.items()), len(weights)


def load_gguf_tokenizer(path: str):
    """HF tokenizer built from the GGUF's tokenizer metadata, cached on disk (conversion takes seconds)."""
    from transformers import AutoTokenizer

    cached, root = _cache_slot(path, "tokenizers")
    if os.path.isdir(cached):
        return AutoTokenizer.from_pretrained(cached)
    path = os.path.abspath(path)
    try:
        tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    except (ValueError, OSError, IndexError) as e:
        raise ValueError(f"{path}: cannot build a tokenizer from this GGUF: {e}") from e
    if tok.chat_template is None:
        try:
            import gguf
            tok.chat_template = _field(gguf.GGUFReader(path), "tokenizer.chat_template")
        except Exception:  # a missing template is not fatal for plain completion use
            pass
    disk_cache.write_atomically(cached, root, tok.save_pretrained)
    return tok
