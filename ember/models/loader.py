"""Find a model (HF folder, HF cache repo id offline, or GGUF file) and load it into our modules.

Only safetensors and GGUF are read: nothing is unpickled and no code from the model folder runs.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
from typing import Iterator

import torch
from safetensors import safe_open
from tqdm import tqdm

from ember.config import ModelConfig
from ember.models import prepared_cache
from ember.models.registry import model_class
from ember.models.source import ModelSource, resolve_model  # noqa: F401  (re-exported)


def read_hf_config(folder: str) -> dict:
    with open(os.path.join(folder, "config.json")) as f:
        hf = json.load(f)
    gen = os.path.join(folder, "generation_config.json")
    if os.path.isfile(gen):
        with open(gen) as f:
            eos = json.load(f).get("eos_token_id")
        if eos is not None:
            hf["eos_token_id"] = eos
    return hf


def iter_safetensors(folder: str) -> Iterator[tuple[str, torch.Tensor]]:
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights (pickled .bin files are not "
                                f"loaded, on purpose: they can run code)")
    for file in files:
        try:
            with safe_open(file, "pt") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        except Exception as e:
            if isinstance(e, (FileNotFoundError, ValueError)) and file in str(e):
                raise
            raise ValueError(f"{file}: unreadable safetensors file ({e})") from None


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def load_checkpoint(source: ModelSource) -> tuple[ModelConfig, Iterator, int]:
    """(config, weight iterator, number of tensors) for either format."""
    if source.kind == "gguf":
        from ember.models.gguf_loader import load_gguf_weights_cached
        config, weights, count = load_gguf_weights_cached(source.path)
        return ModelConfig.from_hf(config), weights, count
    cfg = ModelConfig.from_hf(read_hf_config(source.path))
    return cfg, iter_safetensors(source.path), None


def build_model(cfg: ModelConfig, weights: Iterator, total: int | None, backend,
                max_position: int, device: torch.device, dtype: torch.dtype,
                desc: str = "loading weights", quantization: str | None = None,
                prepared: prepared_cache.Slot | None = None) -> torch.nn.Module:
    """The model with its weights loaded and prepared (packed, quantized). `prepared`: where the
    prepared cache maps them from, or writes them to."""
    cls = model_class(cfg.architecture)
    # Built straight on the device: the layers make their parameters with torch.empty, so this
    # costs no initialisation (and, unlike meta + to_empty, imports nothing heavy).
    with torch.device(device), _default_dtype(dtype):
        model = cls(cfg, backend, max_position)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    if prepared is not None and prepared_cache.restore(model, prepared):
        model.post_load(device, dtype, quantization, pack=False)
        return model.eval()
    loaded = model.load_weights(tqdm(weights, total=total, desc=desc, unit="tensor",
                                     leave=False, disable=None))
    expected = {n for n, _ in model.named_parameters()}
    missing = sorted(expected - loaded)
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensor(s), e.g. {missing[:3]}")
    model.post_load(device, dtype, quantization)
    if prepared is not None:
        prepared_cache.store(model, prepared)
    return model.eval()
