"""Model sources: a HF folder, a repo id resolved offline from the HF cache, and clear errors."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from ember import SamplingParams


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, save_random_model):
    from transformers import LlamaConfig
    folder = str(tmp_path_factory.mktemp("tiny-llama"))
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, vocab_size=49152,
                      max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
    save_random_model(cfg, folder)
    return folder


def _greedy(llm):
    return llm.generate([[5, 6, 7, 8]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0].token_ids


def test_repo_id_resolves_offline_from_the_hf_cache(tiny_folder, tmp_path, monkeypatch):
    from ember import LLM
    # The HF cache layout: models--org--name/{refs/main, snapshots/<rev>/files}
    repo = tmp_path / "hub" / "models--acme--tiny-llama"
    snap = repo / "snapshots" / "0123abcd"
    shutil.copytree(tiny_folder, snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    from_cache = LLM("acme/tiny-llama", dtype="float32", kv_cache_memory=1 << 24)
    from_folder = LLM(tiny_folder, dtype="float32", kv_cache_memory=1 << 24)
    assert _greedy(from_cache) == _greedy(from_folder)


def test_unknown_repo_id_says_it_never_downloads(tmp_path, monkeypatch):
    from ember import LLM
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="never downloads"):
        LLM("acme/does-not-exist")


def test_truncated_safetensors_names_the_file(tiny_folder, tmp_path):
    from ember import LLM
    broken = tmp_path / "broken"
    shutil.copytree(tiny_folder, broken)
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        LLM(str(broken), dtype="float32", kv_cache_memory=1 << 24)


def test_pickled_weights_are_refused(tiny_folder, tmp_path):
    from ember import LLM
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_folder, folder)
    os.remove(folder / "model.safetensors")
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        LLM(str(folder), dtype="float32", kv_cache_memory=1 << 24)


def test_unsupported_architecture_is_named(tiny_folder, tmp_path):
    from ember import LLM
    folder = tmp_path / "gpt2ish"
    shutil.copytree(tiny_folder, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="gpt2"):
        LLM(str(folder), dtype="float32", kv_cache_memory=1 << 24)


def test_missing_model_path(tmp_path):
    from ember import LLM
    with pytest.raises(FileNotFoundError, match="no such file"):
        LLM(str(tmp_path / "nowhere"))
