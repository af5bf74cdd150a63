"""Architecture name → model class. A new architecture is one file and one line here."""
from __future__ import annotations

import importlib

_MODELS = {
    "llama": "ember.models.llama:LlamaForCausalLM",
    "mistral": "ember.models.llama:LlamaForCausalLM",
    "qwen2": "ember.models.llama:LlamaForCausalLM",
    "qwen3": "ember.models.llama:LlamaForCausalLM",
}


def model_class(architecture: str):
    if architecture not in _MODELS:
        raise ValueError(f"unsupported model architecture {architecture!r}; "
                         f"ember supports {', '.join(sorted(_MODELS))}")
    module, cls = _MODELS[architecture].split(":")
    return getattr(importlib.import_module(module), cls)
