"""The prefix cache on the real model: outputs identical with the cache on and off on workloads
with shared prefixes, under memory pressure that forces eviction and preemption; chat turns hit."""
from __future__ import annotations

import pytest
import torch

from ember import SamplingParams


def _shared_prefix_prompts(n: int, prefix_len: int, suffix_len: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(100, 49152, (prefix_len,), generator=g).tolist()
    return [prefix + torch.randint(100, 49152, (suffix_len,), generator=g).tolist() for _ in range(n)]


def _run(llm, prompts):
    greedy = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
                          use_tqdm=False)
    seeded = llm.generate(prompts[:4], SamplingParams(temperature=0.9, top_p=0.9, seed=7, n=3,
                                                      max_tokens=16, ignore_eos=True), use_tqdm=False)
    return ([o.outputs[0].token_ids for o in greedy],
            [[c.token_ids for c in o.outputs] for o in seeded])


@pytest.fixture(scope="module")
def runs(make_smollm2, kv_bytes_for_blocks):
    # 40 blocks of 16 tokens: a handful of 140-token sequences at once, so 12 of them preempt,
    # and the cache must evict to make room.
    prompts = _shared_prefix_prompts(12, 100, 7, seed=1)
    result = {}
    for cache in (False, True):
        llm = make_smollm2(enable_prefix_caching=cache, max_num_batched_tokens=64,
                           kv_cache_memory=kv_bytes_for_blocks(40))
        outputs = _run(llm, prompts)
        engine = llm.engine
        result[cache] = (outputs, engine.stats.prompt_tokens_computed, engine.stats.preemptions, llm)
    return result


def test_outputs_identical_with_cache_on_and_off(runs):
    assert runs[True][0] == runs[False][0]


def test_cache_saves_prefill_under_pressure(runs, assert_engine_idle):
    (_, computed_on, _, llm_on), (_, computed_off, preempted_off, llm_off) = runs[True], runs[False]
    assert preempted_off > 0, "the workload should force preemption"
    assert computed_on < computed_off / 2
    cache = llm_on.engine.kv.prefix_cache
    assert cache.hit_tokens > 0
    for llm in (llm_on, llm_off):
        assert_engine_idle(llm)


def test_eviction_happened_and_nothing_leaked(runs):
    llm = runs[True][3]
    kv = llm.engine.kv
    kv.check_integrity()
    # 12 prompts x 7 blocks of distinct suffix + outputs cannot all stay in 40 blocks
    assert len(kv.prefix_cache.nodes) <= kv.num_blocks
    assert kv.pool.num_free + kv.prefix_cache.num_evictable == kv.num_blocks


def test_next_chat_turn_hits_the_cache(make_smollm2, assert_engine_idle):
    llm = make_smollm2()
    conv = [{"role": "user", "content": "Tell me something about owls."}]
    first = llm.chat(conv, SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)[0]
    conv += [{"role": "assistant", "content": first.outputs[0].text},
             {"role": "user", "content": "And about their eyes?"}]
    second = llm.chat(conv, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
    # the whole first turn (prompt and answer, in full blocks) comes from the cache
    assert second.num_cached_tokens >= (len(first.prompt_token_ids) // 16) * 16
    assert second.num_cached_tokens < len(second.prompt_token_ids)
    assert_engine_idle(llm)
