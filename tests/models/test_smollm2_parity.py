"""SmolLM2-135M-Instruct (the default model) in fp32 against transformers loaded from the same GGUF.

The engine runs with 16-token KV blocks and a 128-token prefill chunk (see conftest), so the long
prompts here span many blocks and several chunks, and the one batched `generate` call mixes
prefill chunks with decodes in the same steps.
"""
from __future__ import annotations

import os

import pytest
import torch

from ember import SamplingParams

MAX_TOKENS = 10
NUM_PROMPTS = 32

PARAGRAPHS = [
    "The old lighthouse keeper climbed the spiral stairs every evening at dusk. He trimmed the "
    "wick, polished the great lens, and watched the ships pass far out on the grey water.",
    "Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide "
    "to produce glucose and oxygen. It takes place mainly in the chloroplasts of leaf cells.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n"
    "    return a\n\nprint([fibonacci(i) for i in range(10)])\n",
    "In 1969, astronauts first walked on the Moon. Millions of people watched the grainy "
    "black-and-white pictures on television, and the words spoken that day became famous.",
    "To bake simple bread you need flour, water, salt and yeast. Mix them, knead the dough for "
    "ten minutes, let it rise for an hour, shape the loaf and bake it in a hot oven.",
    "The French Revolution began in 1789 and changed the political landscape of Europe. The "
    "monarchy was abolished and new ideas about rights and citizenship spread widely.",
    "Rivers shape the land over thousands of years. They carve valleys, carry sediment to the "
    "sea and build deltas where fresh water meets the tide.",
    "A good night's sleep improves memory, mood and concentration. Most adults need between "
    "seven and nine hours, and a regular schedule helps the body keep its rhythm.",
]
SHORT = [
    "The capital of France is",
    "Once upon a time,",
    "1, 2, 3, 4, 5,",
    "Water boils at",
    "The quick brown fox",
    "Here is a list of three fruits:",
    "def add(a, b):",
    "My favourite colour is",
    "The largest planet in the solar system is",
    "Q: What is 7 times 6?\nA:",
    "Translate to French: Good morning ->",
    "The opposite of hot is",
    "Roses are red,",
    "import numpy as np\n",
    "The sum of two and two is",
    "Dear Sir or Madam,",
]


def _prompt_texts() -> list[str]:
    texts = list(SHORT)
    texts += PARAGRAPHS                                               # ~35-45 tokens
    texts += [PARAGRAPHS[i] + "\n\n" + PARAGRAPHS[i + 1] for i in range(0, 8, 2)]   # ~80
    texts += [" ".join(PARAGRAPHS[i:i + 4]) for i in (1, 4)]        # ~165: two chunks
    texts += ["\n\n".join(PARAGRAPHS[i:] + PARAGRAPHS[:i]) + "\n\nIn summary," for i in (0, 3)]  # ~320
    return texts[:NUM_PROMPTS]


@pytest.fixture(scope="module")
def prompts(smollm2, smol_tokenizer) -> list[list[int]]:
    ids = [smol_tokenizer.encode(t) for t in _prompt_texts()]
    assert len(ids) == NUM_PROMPTS
    lengths = sorted(len(p) for p in ids)
    block = smollm2.engine.config.cache.block_size
    chunk = smollm2.engine.config.scheduler.max_num_batched_tokens
    # the spec: varied lengths, some longer than several KV blocks and than one prefill chunk
    assert lengths[0] < block and lengths[-1] > 2 * chunk > 4 * block
    return ids


@pytest.fixture(scope="module")
def hf_model(smollm2_gguf):
    from transformers import AutoModelForCausalLM

    folder, name = os.path.split(smollm2_gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def reference(hf_model, prompts):
    """transformers' greedy generate, one prompt at a time: (token ids, log-softmax of each step)."""
    out = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            res = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=MAX_TOKENS, return_dict_in_generate=True,
                                    output_logits=True, pad_token_id=2)
            tokens = res.sequences[0, len(p):].tolist()
            logprobs = [step[0].float().log_softmax(-1) for step in res.logits]
            out.append((tokens, logprobs))
    return out


GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=2)


@pytest.fixture(scope="module")
def batched(smollm2, prompts, assert_engine_idle):
    """All prompts in ONE generate call on the shared engine."""
    outs = smollm2.generate(prompts, GREEDY, use_tqdm=False)
    assert_engine_idle(smollm2)
    return outs


def test_greedy_matches_transformers(batched, reference, prompts):
    mismatches = []
    for i, (out, (ref_tokens, _)) in enumerate(zip(batched, reference)):
        got = out.outputs[0].token_ids
        if got != ref_tokens:
            mismatches.append((i, len(prompts[i]), got, ref_tokens))
    assert not mismatches, f"{len(mismatches)} prompt(s) differ (index, prompt len, ours, theirs): " \
                           f"{mismatches[:3]}"


def test_greedy_without_logprobs_takes_the_kernel_and_the_same_tokens(smollm2, prompts, batched,
                                                                      monkeypatch):
    """Greedy rows that ask for no logprobs get their tokens from the LM head's greedy kernel,
    without logits: the tokens of the logits path (`batched`, which asked for logprobs, and which
    test_greedy_matches_transformers holds to transformers')."""
    from ember.kernels import cpu
    head = smollm2.engine.model.lm_head
    if not (cpu.has_linear_bf16() and cpu.library().ember_has_greedy_head()):
        pytest.skip("the greedy LM-head kernel needs AVX-512 VNNI and a compiler")
    rows = []
    kernel = head.greedy_tokens
    monkeypatch.setattr(head, "greedy_tokens", lambda h: rows.append(len(h)) or kernel(h))
    outs = smollm2.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS),
                            use_tqdm=False)
    assert rows and max(rows) > 1                     # batched decode steps went through it
    assert [o.outputs[0].token_ids for o in outs] == [b.outputs[0].token_ids for b in batched]


def test_chosen_logprobs_match_transformers(batched, reference):
    worst = 0.0
    for out, (ref_tokens, ref_lps) in zip(batched, reference):
        comp = out.outputs[0]
        assert comp.logprobs is not None and len(comp.logprobs) == len(comp.token_ids)
        for step, (tok, entry) in enumerate(zip(comp.token_ids, comp.logprobs)):
            ref = ref_lps[step][tok].item()
            worst = max(worst, abs(entry[tok].logprob - ref))
            assert entry[tok].rank == 1                       # greedy: the chosen token is the best
            # the two alternatives are transformers' top-2, with the same logprobs
            top = ref_lps[step].topk(2)
            for t, v in zip(top.indices.tolist(), top.values.tolist()):
                assert t in entry, (step, sorted(entry), top.indices.tolist())
                assert entry[t].logprob == pytest.approx(v, abs=1e-3)
    assert worst < 1e-3, f"largest chosen-token logprob difference {worst:.2e}"


def test_chat_capital_of_france(smollm2):
    out = smollm2.chat([{"role": "user", "content": "What is the capital of France?"}],
                       SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)
    comp = out[0].outputs[0]
    assert comp.text == "The capital of France is Paris."
    assert comp.finish_reason == "stop"


def test_batch_invariance(smollm2, prompts, batched, assert_engine_idle):
    """Each prompt alone gives the same greedy tokens as in the batch of 32 (and logprobs close)."""
    sp = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=0)
    cache = smollm2.engine.kv.prefix_cache
    for i, p in enumerate(prompts):
        if cache is not None:
            cache.reset()          # alone means recomputed alone, not served from the batch's KV
        alone = smollm2.generate([p], sp, use_tqdm=False)[0].outputs[0]
        in_batch = batched[i].outputs[0]
        assert alone.token_ids == in_batch.token_ids, f"prompt {i} ({len(p)} tokens)"
        for tok, a, b in zip(alone.token_ids, alone.logprobs, in_batch.logprobs):
            assert a[tok].logprob == pytest.approx(b[tok].logprob, abs=1e-4)
    assert_engine_idle(smollm2)


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_memory_pressure_preempts_and_recovers(prefix_caching, prompts, batched, make_smollm2,
                                              kv_bytes_for_blocks, assert_engine_idle):
    """A KV budget for only a few sequences: 32 requests all finish with unchanged outputs."""
    longest = max(len(p) for p in prompts) + MAX_TOKENS
    blocks = 3 * -(-longest // 16)                        # room for ~3 of the longest sequences
    llm = make_smollm2(block_size=16, kv_cache_memory=kv_bytes_for_blocks(blocks, 16),
                       enable_prefix_caching=prefix_caching, max_model_len=longest + 16)
    assert llm.engine.kv.num_blocks == blocks
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert llm.engine.stats.preemptions > 0, "the budget was meant to force preemption"
    for i, (got, want) in enumerate(zip(outs, batched)):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids, f"prompt {i}"
        assert got.outputs[0].text == want.outputs[0].text
        assert got.outputs[0].finish_reason == want.outputs[0].finish_reason
    assert_engine_idle(llm)
    if not prefix_caching:
        assert llm.engine.kv.pool.num_free == blocks
