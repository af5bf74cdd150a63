"""Tests for ember.models.gguf_loader against transformers' own GGUF integration."""

import os
import time

import pytest
import torch

from ember.models.gguf_loader import default_gguf_path, load_gguf_tokenizer, read_gguf

try:
    GGUF_PATH = default_gguf_path()
except FileNotFoundError as e:  # the rest of the suite should still run without the model
    pytest.skip(str(e), allow_module_level=True)

GGUF_DIR, GGUF_NAME = os.path.split(GGUF_PATH)
TEXTS = ["Hello world!", "  leading spaces and\ttabs\n", "<|im_start|>user\nWhat is 2+2?<|im_end|>", "Ünïcödé 日本語 🙂"]


@pytest.fixture(scope="module")
def ckpt():
    return read_gguf(GGUF_PATH)


@pytest.fixture(scope="module")
def hf_config():
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(GGUF_DIR, gguf_file=GGUF_NAME)


def test_weights_match_transformers(ckpt):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(GGUF_DIR, gguf_file=GGUF_NAME, dtype=torch.float32)
    ref = model.state_dict()
    ours = dict(ckpt.iter_weights())
    if ckpt.config["tie_word_embeddings"]:
        # transformers ties lm_head to the embedding; we only yield real tensors.
        assert "lm_head.weight" not in ours
        assert torch.equal(ref["lm_head.weight"], ref["model.embed_tokens.weight"])
        ref = {k: v for k, v in ref.items() if k != "lm_head.weight"}
    assert set(ours) == set(ref)
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32, name
        assert tensor.shape == ref[name].shape, name
        assert torch.equal(tensor, ref[name]), name


def test_config_matches_transformers(ckpt, hf_config):
    cfg = ckpt.config
    assert cfg["model_type"] == hf_config.model_type
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                "num_hidden_layers", "head_dim", "vocab_size", "max_position_embeddings",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "attention_bias"):
        assert cfg[key] == getattr(hf_config, key), key
    assert cfg["rms_norm_eps"] == pytest.approx(hf_config.rms_norm_eps, rel=0, abs=0)
    # transformers 5 moved rope_theta into rope_parameters; accept either location.
    hf_theta = getattr(hf_config, "rope_parameters", None) or {}
    hf_theta = hf_theta.get("rope_theta", getattr(hf_config, "rope_theta", None))
    assert cfg["rope_theta"] == hf_theta
    assert cfg["rope_scaling"] is None
    assert cfg["architectures"] == ["LlamaForCausalLM"]


def test_tokenizer_matches_and_is_cached(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("EMBER_CACHE_DIR", str(tmp_path))
    ref = AutoTokenizer.from_pretrained(GGUF_DIR, gguf_file=GGUF_NAME)

    t0 = time.perf_counter()
    cold = load_gguf_tokenizer(GGUF_PATH)
    t_cold = time.perf_counter() - t0
    entries = [p for p in (tmp_path / "tokenizers").iterdir()]
    assert len(entries) == 1 and not entries[0].name.startswith("."), entries  # temp dir was renamed

    t0 = time.perf_counter()
    warm = load_gguf_tokenizer(GGUF_PATH)
    t_warm = time.perf_counter() - t0
    assert t_warm < t_cold, (t_cold, t_warm)

    for tok in (cold, warm):
        assert tok.chat_template, "chat template missing"
        for text in TEXTS:
            assert tok.encode(text) == ref.encode(text), text
        assert tok.bos_token_id == ref.bos_token_id and tok.eos_token_id == ref.eos_token_id
    msgs = [{"role": "user", "content": "hi"}]
    assert warm.apply_chat_template(msgs, tokenize=False) == ref.apply_chat_template(msgs, tokenize=False)


def test_truncated_file_raises_value_error(tmp_path):
    data = open(GGUF_PATH, "rb").read()
    bad = tmp_path / "half.gguf"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="half.gguf"):
        read_gguf(str(bad))


@pytest.mark.parametrize("content", [b"", os.urandom(4096), b"GGUF" + os.urandom(4096)])
def test_garbage_file_raises_value_error(tmp_path, content):
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(content)
    with pytest.raises(ValueError, match="garbage.gguf"):
        read_gguf(str(bad))


def test_missing_file_raises_file_not_found(tmp_path):
    missing = str(tmp_path / "nope.gguf")
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        read_gguf(missing)
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        load_gguf_tokenizer(missing)


def _write_tiny_gguf(path, arch, tensors, head_dim=None):
    """A minimal synthetic GGUF, to exercise code paths the default (llama) model does not."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-6)
    if head_dim:
        w.add_key_length(head_dim)
    for name, arr in tensors.items():
        w.add_tensor(name, np.asarray(arr))  # keeps dtype: float32 -> F32, int32 -> I32
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_qwen3_tensors_are_renamed_not_permuted(tmp_path):
    q = torch.arange(16 * 8, dtype=torch.float32).reshape(16, 8)  # 2 heads x head_dim 8
    path = tmp_path / "tiny-qwen3.gguf"
    _write_tiny_gguf(path, "qwen3", {"blk.0.attn_q.weight": q.numpy(), "blk.0.attn_q_norm.weight": torch.ones(8)},
                     head_dim=8)
    ckpt = read_gguf(str(path))
    assert ckpt.config["model_type"] == "qwen3" and ckpt.config["head_dim"] == 8  # != hidden/heads
    assert ckpt.config["attention_bias"] is False and ckpt.config["tie_word_embeddings"] is True
    weights = dict(ckpt.iter_weights())
    assert torch.equal(weights["model.layers.0.self_attn.q_proj.weight"], q)
    assert "model.layers.0.self_attn.q_norm.weight" in weights


def test_unsupported_architecture_raises(tmp_path):
    path = tmp_path / "tiny-gpt2.gguf"
    _write_tiny_gguf(path, "gpt2", {"token_embd.weight": torch.zeros(4, 8).numpy()})
    with pytest.raises(ValueError, match="gpt2"):
        read_gguf(str(path))


def test_unsupported_tensor_type_raises(tmp_path):
    path = tmp_path / "tiny-int.gguf"
    _write_tiny_gguf(path, "llama", {"blk.0.attn_norm.weight": torch.zeros(8, dtype=torch.int32).numpy()})
    with pytest.raises(ValueError, match="I32"):
        read_gguf(str(path))
