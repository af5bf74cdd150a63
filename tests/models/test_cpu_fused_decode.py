"""The one-call decode stack (ember/kernels/cpu/llama_decode.py) computes exactly what the
nn.Modules compute: same greedy tokens, same logprobs, bit for bit, in bf16, for each feature the
kernel handles (GQA, qkv bias, Qwen3's q/k norms, a sliding window, tied and untied heads)."""
from __future__ import annotations

import pytest
import torch

from ember import SamplingParams
from ember.kernels import cpu

pytestmark = pytest.mark.skipif(not cpu.has_linear_bf16(),
                                reason="the fused decode needs AVX-512 and a C++ compiler")
COMMON = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=49152, max_position_embeddings=512, initializer_range=0.1,
              bos_token_id=1, eos_token_id=2, pad_token_id=2, rms_norm_eps=1e-6)


def _config(case: str):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config
    return {
        "llama": lambda: LlamaConfig(num_hidden_layers=2, tie_word_embeddings=True, **COMMON),
        "qwen2-bias": lambda: Qwen2Config(num_hidden_layers=2, tie_word_embeddings=False, **COMMON),
        "qwen3-qknorm": lambda: Qwen3Config(num_hidden_layers=2, head_dim=64,
                                            tie_word_embeddings=True, **COMMON),
        "mistral-window": lambda: MistralConfig(num_hidden_layers=2, sliding_window=20,
                                                tie_word_embeddings=False, **COMMON),
    }[case]()


def _generate(llm, prompts):
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    return [(o.outputs[0].token_ids, [{t: lp.logprob for t, lp in d.items()}
                                       for d in o.outputs[0].logprobs]) for o in outs]


@pytest.mark.parametrize("quantization", [None, "int8", "w8a8"])
@pytest.mark.parametrize("case", ["llama", "qwen2-bias", "qwen3-qknorm", "mistral-window"])
def test_fused_decode_equals_modules(case, quantization, tmp_path, save_random_model):
    from ember import LLM
    if quantization == "w8a8" and not cpu.has_w8a8():
        pytest.skip("W8A8 needs AVX-512 VNNI")

    save_random_model(_config(case), str(tmp_path), seed=0)

    llm = LLM(str(tmp_path), dtype="bfloat16", enable_prefix_caching=False,
              quantization=quantization)
    model = llm.engine.model.model
    assert model.fused_decode is not None
    if quantization == "w8a8":                 # every linear runs W8A8; the LM head stays bf16
        assert all(m.offsets is not None for m in model.modules() if hasattr(m, "offsets"))
        assert llm.engine.model.lm_head.offsets is None
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 49152, (n,), generator=g).tolist() for n in (5, 17, 40)]
    fused = _generate(llm, prompts)
    model.fused_decode = None
    modules = _generate(llm, prompts)
    assert fused == modules


@pytest.mark.skipif(not (cpu.has_linear_bf16() and cpu.library().ember_has_greedy_head()),
                    reason="the greedy LM-head kernel needs AVX-512 VNNI")
@pytest.mark.parametrize("case", ["llama", "qwen2-bias"])
def test_greedy_head_kernel_equals_the_logits_argmax(case, tmp_path, save_random_model):
    """Random weights give flat logits (many near-ties for the screen): the kernel's greedy tokens
    are still those of argmax over the logits, with a tied and an untied LM head."""
    from ember import LLM

    save_random_model(_config(case), str(tmp_path), seed=0)
    llm = LLM(str(tmp_path), dtype="bfloat16", enable_prefix_caching=False)
    head = llm.engine.model.lm_head
    assert head.greedy is not None
    g = torch.Generator().manual_seed(2)
    prompts = [{"prompt_token_ids": torch.randint(3, 49152, (n,), generator=g).tolist()}
               for n in (3, 11, 30, 64)]
    sp = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    kernel = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
    head.greedy = None
    logits = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
    assert kernel == logits


@pytest.mark.parametrize("quantization", ["int8", "w8a8"])
def test_int8_stays_close_to_bf16_on_the_default_model(quantization):
    """Weight-only int8 (per-row scales), and W8A8 (int8 inputs too, per block of 64), move the
    default model's logprobs only a little: the candidate tokens' logprobs under bf16 and the
    quantized model, teacher-forced on the same (bf16-greedy) text."""
    from ember import LLM
    if quantization == "w8a8" and not cpu.has_w8a8():
        pytest.skip("W8A8 needs AVX-512 VNNI")
    prompts = ["The capital of France is", "Water boils at", "def add(a, b):",
               "The three primary colors are"]
    bf16 = LLM(dtype="bfloat16")
    ref = bf16.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                        use_tqdm=False)
    texts = [p + o.outputs[0].text for p, o in zip(prompts, ref)]
    del bf16
    scores = {}
    for quant in (None, quantization):
        llm = LLM(dtype="bfloat16", quantization=quant, enable_prefix_caching=False)
        ids = [llm.get_tokenizer().encode(t) for t in texts]
        # score each text by decoding its own tokens: teacher-forced logprobs of the next token
        outs = llm.generate([{"prompt_token_ids": i[:-1]} for i in ids],
                            SamplingParams(max_tokens=1, temperature=0, logprobs=20),
                            use_tqdm=False)
        scores[quant] = [o.outputs[0].logprobs[0] for o in outs]
        del llm
    drift = []
    for a, b in zip(scores[None], scores[quantization]):
        common = set(a) & set(b)
        assert len(common) >= 10                     # the same candidates rank near the top
        drift += [abs(a[t].logprob - b[t].logprob) for t in common]
    assert sum(drift) / len(drift) < 0.25


def test_quantization_is_checked_before_anything_loads():
    from ember import LLM
    with pytest.raises(ValueError, match="unknown quantization 'fp4'; ember has: int8, w8a8"):
        LLM(quantization="fp4")
    for quant in ("int8", "w8a8"):
        with pytest.raises(ValueError, match="needs dtype bfloat16"):
            LLM(dtype="float32", quantization=quant)
