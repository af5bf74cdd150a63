"""Tiny random-weight models of every supported architecture vs transformers, token for token.

Each model is built from a transformers config class, saved with save_pretrained (safetensors)
next to the SmolLM2 tokenizer files, loaded by ember from that folder, and run in fp32 with
8-token KV blocks and a 48-token prefill chunk. The weights are initialised with a large
`initializer_range` so that attention (and therefore rotary scaling, q/k norms, biases, the
sliding window) visibly steers the output; `test_reference_is_sensitive` guards that.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from ember import SamplingParams

VOCAB = 49152                                   # the SmolLM2 tokenizer's size
MAX_TOKENS = 12
PROMPT_LENGTHS = [3, 8, 17, 45, 70, 130]        # up to 17 blocks of 8, three chunks of 48
COMMON = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=VOCAB, max_position_embeddings=512, initializer_range=0.15,
              bos_token_id=1, eos_token_id=2, pad_token_id=2, rms_norm_eps=1e-6)


def _configs():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    return {
        "llama-tied": LlamaConfig(num_hidden_layers=2, tie_word_embeddings=True, **COMMON),
        "llama-untied-llama3": LlamaConfig(
            num_hidden_layers=3, tie_word_embeddings=False,
            rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 32}, **COMMON),
        "llama-linear": LlamaConfig(
            num_hidden_layers=2, tie_word_embeddings=True,
            rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}, **COMMON),
        "qwen2-bias": Qwen2Config(num_hidden_layers=2, tie_word_embeddings=False, **COMMON),
        "qwen3-qknorm": Qwen3Config(num_hidden_layers=2, head_dim=32, tie_word_embeddings=True,
                                    **COMMON),
        "mistral-window": MistralConfig(num_hidden_layers=4, sliding_window=24,
                                        tie_word_embeddings=False, **COMMON),
    }


CASES = ["llama-tied", "llama-untied-llama3", "llama-linear", "qwen2-bias", "qwen3-qknorm",
         "mistral-window"]


@pytest.fixture(scope="module", params=CASES)
def tiny(request, tmp_path_factory, save_random_model):
    case = request.param
    folder = str(tmp_path_factory.mktemp(case))
    hf = save_random_model(_configs()[case], folder, seed=CASES.index(case))
    from ember import LLM

    llm = LLM(folder, dtype="float32", block_size=8, max_num_batched_tokens=48,
              kv_cache_memory=2 << 20, max_model_len=512)
    return case, folder, hf, llm


def _prompts(seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def _hf_greedy(model, prompt: list[int]) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=MAX_TOKENS, pad_token_id=2)
    return out[0, len(prompt):].tolist()


def test_saved_checkpoint_is_what_we_meant(tiny):
    case, folder, hf, llm = tiny
    with open(os.path.join(folder, "config.json")) as f:
        saved = json.load(f)
    files = os.listdir(folder)
    assert any(f.endswith(".safetensors") for f in files) and "tokenizer.json" in files
    cfg = llm.engine.config.model_config
    assert cfg.tie_word_embeddings == saved.get("tie_word_embeddings", False)
    tied = llm.engine.model.lm_head.weight is llm.engine.model.model.embed_tokens.weight
    assert tied == cfg.tie_word_embeddings
    if case == "qwen3-qknorm":
        assert cfg.head_dim == 32 != cfg.hidden_size // cfg.num_heads and cfg.qk_norm
    if case == "mistral-window":
        assert cfg.sliding_window == 24


def test_greedy_matches_transformers(tiny):
    case, _, hf, llm = tiny
    prompts = _prompts()
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS),
                        use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        ref = _hf_greedy(hf, prompt)
        assert out.outputs[0].token_ids == ref, f"{case}: prompt of {len(prompt)} tokens"
    kv = llm.engine.kv
    kv.check_integrity()
    assert not kv.tables


def test_logprobs_match_transformers(tiny):
    case, _, hf, llm = tiny
    prompt = _prompts(1)[-1]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4, logprobs=0),
                       use_tqdm=False)[0].outputs[0]
    ids = torch.tensor([prompt + out.token_ids])
    with torch.inference_mode():
        ref = hf(ids).logits[0].float().log_softmax(-1)
    for i, (tok, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        want = ref[len(prompt) - 1 + i, tok].item()
        assert entry[tok].logprob == pytest.approx(want, abs=1e-4), f"{case} step {i}"


def test_reference_is_sensitive(tiny):
    """The features under test must matter: breaking them changes transformers' own output."""
    case, folder, hf, _ = tiny
    if case == "qwen2-bias":
        assert all(layer.self_attn.q_proj.bias.abs().sum() > 0 for layer in hf.model.layers)
    prompt = _prompts()[-1]
    ref = _hf_greedy(hf, prompt)
    broken = _configs()[case]
    if case.startswith("llama-untied") or case == "llama-linear":
        broken.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
    elif case == "mistral-window":
        broken.sliding_window = None
    elif case == "qwen3-qknorm":
        broken = None
        with torch.no_grad():
            saved = [layer.self_attn.q_norm.weight.clone() for layer in hf.model.layers]
            for layer in hf.model.layers:
                layer.self_attn.q_norm.weight.mul_(3.0)
            changed = _hf_greedy(hf, prompt)
            for layer, w in zip(hf.model.layers, saved):
                layer.self_attn.q_norm.weight.copy_(w)
        assert changed != ref
        return
    elif case == "qwen2-bias":
        assert hf.model.layers[0].self_attn.q_proj.bias is not None
        broken = None
        with torch.no_grad():      # (a k bias alone would not matter: softmax is shift-invariant)
            saved = [layer.self_attn.q_proj.bias.clone() for layer in hf.model.layers]
            for layer in hf.model.layers:
                layer.self_attn.q_proj.bias.zero_()
            changed = _hf_greedy(hf, prompt)
            for layer, b in zip(hf.model.layers, saved):
                layer.self_attn.q_proj.bias.copy_(b)
        assert changed != ref
        return
    else:
        # positions matter at all: the same prompt shifted by one token changes the output
        assert _hf_greedy(hf, prompt[1:]) != ref
        return
    from transformers import AutoModelForCausalLM

    other = AutoModelForCausalLM.from_config(broken, dtype=torch.float32).eval()
    other.load_state_dict(hf.state_dict())
    assert _hf_greedy(other, prompt) != ref, f"{case}: the reference does not depend on it"


def test_output_does_not_depend_on_uninitialised_memory(monkeypatch, tmp_path, save_random_model):
    """Build an engine while torch.empty hands out NaN-filled memory (as a reused allocation may):
    the output must still match transformers, since nothing may read a slot before writing it."""
    from ember import LLM

    folder = str(tmp_path / "llama")
    hf = save_random_model(_configs()["llama-tied"], folder, seed=CASES.index("llama-tied"))
    real_empty = torch.empty

    def garbage_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point() and t.device.type == "cpu":
            t.fill_(float("nan"))
        return t

    with monkeypatch.context() as m:
        m.setattr(torch, "empty", garbage_empty)
        llm = LLM(folder, dtype="float32", block_size=8, max_num_batched_tokens=48,
                  kv_cache_memory=2 << 20, max_model_len=512)
    prompts = _prompts(2)[:3]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=6, pad_token_id=2)[0, len(prompt):].tolist()
        assert out.outputs[0].token_ids == ref
