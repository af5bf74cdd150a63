"""Every sampling parameter has a test that fails if the parameter were ignored.

Two levels: the Sampler on synthetic logits (exact, no model), and the engine end to end on the
default model where the behaviour lives outside the sampler (stop strings, EOS, n > 1, seeds
across batches, detokenization).
"""
from __future__ import annotations


import pytest
import torch

from ember import SamplingParams
from ember.core.request import Request
from ember.runner.sampler import Sampler, SamplingBatch

CPU = torch.device("cpu")
EOS = 0


def req(prompt=(5, 6, 7), outputs=(), seed: int | None = None, rid: str = "r", **params) -> Request:
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    r = Request(rid, list(prompt), SamplingParams(**params), eos_token_ids=frozenset({EOS}),
                generator=gen)
    for t in outputs:
        r.append_output(t)
    return r


def sample(logits: torch.Tensor, requests: list[Request], seed: int = 0):
    """One sampler call: logits [B, V] for requests[B]."""
    batch = SamplingBatch.build(requests, logits.shape[1], CPU)
    return Sampler(CPU, seed)(logits.clone(), batch)


def draws(logits_row: torch.Tensor, n: int = 4000, seed: int = 0, **params) -> torch.Tensor:
    """n independent samples of one distribution (n identical rows, the sampler's own generator)."""
    requests = [req(rid=f"r{i}", **params) for i in range(n)]
    return sample(logits_row.expand(n, -1), requests, seed).token_ids


PROBS = torch.tensor([0.05, 0.40, 0.25, 0.15, 0.10, 0.03, 0.02])     # token 1 is the argmax
LOGITS = PROBS.log()


def freqs(tokens: torch.Tensor, vocab: int = len(PROBS)) -> torch.Tensor:
    return torch.bincount(tokens, minlength=vocab).float() / len(tokens)


# ---- temperature ------------------------------------------------------------------------------

def test_temperature_zero_is_argmax():
    logits = torch.randn(16, 50, generator=torch.Generator().manual_seed(0))
    out = sample(logits, [req(rid=str(i), temperature=0) for i in range(16)])
    assert torch.equal(out.token_ids, logits.argmax(-1))
    assert torch.equal(draws(LOGITS, 200, temperature=0), torch.full((200,), 1))


def test_temperature_one_follows_the_distribution():
    f = freqs(draws(LOGITS, 8000, temperature=1.0))
    assert torch.allclose(f, PROBS, atol=0.025), f


def test_temperature_scales_diversity():
    cold = freqs(draws(LOGITS, 4000, temperature=0.3))
    hot = freqs(draws(LOGITS, 4000, temperature=3.0))
    expected_cold = (LOGITS / 0.3).softmax(-1)
    expected_hot = (LOGITS / 3.0).softmax(-1)
    assert torch.allclose(cold, expected_cold, atol=0.025)
    assert torch.allclose(hot, expected_hot, atol=0.025)
    entropy = lambda p: -(p[p > 0] * p[p > 0].log()).sum()
    assert entropy(hot) > entropy(freqs(draws(LOGITS, 4000, temperature=1.0))) > entropy(cold)


# ---- top-k, top-p, min-p -----------------------------------------------------------------------

def test_top_k():
    assert torch.equal(draws(LOGITS, 500, temperature=1.0, top_k=1), torch.full((500,), 1))
    f = freqs(draws(LOGITS, 4000, temperature=1.0, top_k=3))
    assert set(torch.nonzero(f).flatten().tolist()) == {1, 2, 3}
    renorm = PROBS[[1, 2, 3]] / PROBS[[1, 2, 3]].sum()
    assert torch.allclose(f[[1, 2, 3]], renorm, atol=0.03)


def test_top_p():
    assert torch.equal(draws(LOGITS, 500, temperature=1.0, top_p=1e-6), torch.full((500,), 1))
    # 0.40 + 0.25 = 0.65 >= 0.6: exactly tokens 1 and 2 survive
    f = freqs(draws(LOGITS, 4000, temperature=1.0, top_p=0.6))
    assert set(torch.nonzero(f).flatten().tolist()) == {1, 2}
    assert f[1] == pytest.approx(0.40 / 0.65, abs=0.03)


def test_min_p():
    assert torch.equal(draws(LOGITS, 500, temperature=1.0, min_p=0.99), torch.full((500,), 1))
    # min_p 0.3: keep p >= 0.3 * 0.40 = 0.12 → tokens 1, 2, 3
    f = freqs(draws(LOGITS, 4000, temperature=1.0, min_p=0.3))
    assert set(torch.nonzero(f).flatten().tolist()) == {1, 2, 3}


def test_filters_are_per_row():
    rows = [req(rid="a", temperature=1.0, top_k=1), req(rid="b", temperature=1.0),
            req(rid="c", temperature=0)]
    seen_b = set()
    for seed in range(200):
        out = sample(LOGITS.expand(3, -1), rows, seed).token_ids.tolist()
        assert out[0] == 1 and out[2] == 1
        seen_b.add(out[1])
    assert len(seen_b) >= 4, "the unfiltered row must not inherit its neighbour's top_k"


# ---- penalties ------------------------------------------------------------------------------------

def test_repetition_penalty():
    logits = torch.tensor([[0.0, 2.0, 1.9, -1.0, -1.2, 0.5]])
    base = sample(logits, [req(prompt=[1, 3], temperature=0)]).token_ids.item()
    assert base == 1
    # token 1 was seen (prompt): 2.0 / 1.5 < 1.9 → token 2
    assert sample(logits, [req(prompt=[1, 3], temperature=0, repetition_penalty=1.5)]).token_ids.item() == 2
    # negative logits of seen tokens are multiplied (pushed further down), output tokens count too
    r = req(prompt=[5], outputs=[3], temperature=0, repetition_penalty=2.0)
    assert sample(torch.tensor([[-3.0, -5.0, -6.0, -1.0, -1.5, -4.0]]), [r]).token_ids.item() == 4


def test_presence_and_frequency_penalties_use_output_counts():
    logits = torch.tensor([[0.0, 3.0, 2.5, 2.2, 0.0]])
    # presence: token 1 appeared (once) in the output → 3.0 - 1.0 < 2.5
    r = req(prompt=[4], outputs=[1], temperature=0, presence_penalty=1.0)
    assert sample(logits, [r]).token_ids.item() == 2
    # the prompt does not count for presence/frequency (only for repetition_penalty)
    r = req(prompt=[1, 1, 1], temperature=0, presence_penalty=2.0, frequency_penalty=2.0)
    assert sample(logits, [r]).token_ids.item() == 1
    # frequency: token 1 three times (3.0 - 0.3 * 3 = 2.1), token 2 twice (2.5 - 0.6 = 1.9)
    r = req(outputs=[1, 1, 1, 2, 2], temperature=0, frequency_penalty=0.3)
    assert sample(logits, [r]).token_ids.item() == 3
    # presence alone would keep token 1 ahead of 3 (2.7 vs 2.2 after one step of 0.3)
    r = req(outputs=[1, 1, 1, 2, 2], temperature=0, presence_penalty=0.3)
    assert sample(logits, [r]).token_ids.item() == 1


def test_penalties_only_touch_their_own_row():
    logits = torch.tensor([[0.0, 3.0, 2.5], [0.0, 3.0, 2.5]])
    rows = [req(rid="a", outputs=[1], temperature=0, presence_penalty=2.0),
            req(rid="b", outputs=[1], temperature=0)]
    assert sample(logits, rows).token_ids.tolist() == [2, 1]


# ---- min_tokens / EOS ------------------------------------------------------------------------------

def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    logits = torch.tensor([[5.0, 1.0, 4.0, 3.0]])                 # EOS (0) is the argmax, then 2
    assert sample(logits, [req(temperature=0)]).token_ids.item() == EOS
    assert sample(logits, [req(temperature=0, min_tokens=2)]).token_ids.item() == 2
    assert sample(logits, [req(temperature=0, min_tokens=2, stop_token_ids=[2])]).token_ids.item() == 3
    # once min_tokens are out, EOS is allowed again
    assert sample(logits, [req(outputs=[3, 3], temperature=0, min_tokens=2)]).token_ids.item() == EOS
    # ignore_eos: EOS is not a stop token, so min_tokens does not mask it
    assert sample(logits, [req(temperature=0, min_tokens=2, ignore_eos=True)]).token_ids.item() == EOS
    # sampling rows are masked too
    toks = draws(logits[0], 300, temperature=5.0, min_tokens=1)
    assert EOS not in toks.tolist()


# ---- seeds ---------------------------------------------------------------------------------------

def test_seed_is_independent_of_batch_and_position():
    logits = torch.randn(1, 300, generator=torch.Generator().manual_seed(1))
    alone = [sample(logits, [req(seed=42, temperature=1.0)], seed=s).token_ids.item() for s in range(3)]
    assert len(set(alone)) == 1                               # the engine's own seed does not matter
    noise = torch.randn(4, 300)
    batch = torch.cat([noise[:2], logits, noise[2:]])
    rows = [req(rid="x", temperature=1.0), req(rid="y", seed=7, temperature=0.5),
            req(rid="s", seed=42, temperature=1.0), req(rid="z", temperature=0),
            req(rid="w", seed=42, temperature=1.0, top_k=5)]
    assert sample(batch, rows, seed=123).token_ids[2].item() == alone[0]
    # a request's generator advances from step to step; a different seed is a different stream
    streams = {}
    for seed in (1, 2):
        r = req(seed=seed, temperature=1.0)
        streams[seed] = [sample(logits, [r]).token_ids.item() for _ in range(8)]
    assert streams[1] != streams[2]
    assert len(set(streams[1])) > 1


# ---- logprobs ------------------------------------------------------------------------------------

def test_logprobs_top_k_and_rank():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5, -1.0]])
    ref = logits.log_softmax(-1)[0]
    out = sample(logits, [req(temperature=0, logprobs=3)])
    assert out.logprob_ids[0].tolist() == [1, 1, 2, 0]                 # chosen, then the top 3
    assert torch.allclose(out.logprobs[0], ref[[1, 1, 2, 0]])
    assert out.ranks.item() == 1
    # a sampled token that is not the best reports its true rank, and raw (unpenalised) logprobs
    r = req(prompt=[1, 2], temperature=0, repetition_penalty=100.0, logprobs=0)
    out = sample(logits, [r])
    assert out.token_ids.item() == 0 and out.ranks.item() == 3
    assert out.logprobs[0].tolist() == pytest.approx([ref[0].item()])


def test_no_logprobs_when_not_asked():
    out = sample(LOGITS[None], [req(temperature=0)])
    assert out.logprobs is None


# =================================== end to end, on the default model ==================================

CHAT = [{"role": "user", "content": "What is the capital of France?"}]
STORY = "Once upon a time,"
REPETITIVE = "The cat sat on the mat. The cat sat on the mat. The cat sat on the mat."


def one(llm, prompt, **params):
    return llm.generate([prompt], SamplingParams(**params), use_tqdm=False)[0].outputs[0]


def chat(llm, **params):
    return llm.chat(CHAT, SamplingParams(**params), use_tqdm=False)[0].outputs[0]


@pytest.fixture(scope="module")
def greedy_story(smollm2):
    out = one(smollm2, STORY, temperature=0, max_tokens=24, ignore_eos=True)
    assert len(out.text) > 60
    return out


def test_e2e_temperature_zero_is_deterministic(smollm2, greedy_story):
    again = one(smollm2, STORY, temperature=0, max_tokens=24, ignore_eos=True)
    assert again.token_ids == greedy_story.token_ids and again.text == greedy_story.text


@pytest.mark.parametrize("params", [dict(top_k=1), dict(top_p=1e-4), dict(min_p=0.999)],
                         ids=["top_k=1", "top_p=tiny", "min_p=~1"])
def test_e2e_filters_that_leave_one_token_are_greedy(smollm2, greedy_story, params):
    # high temperature and a seed: without the filter this would wander off immediately
    out = one(smollm2, STORY, temperature=1.5, seed=3, max_tokens=24, ignore_eos=True, **params)
    assert out.token_ids == greedy_story.token_ids


def test_e2e_high_temperature_is_more_diverse(smollm2):
    cold = smollm2.generate([STORY], SamplingParams(n=6, temperature=0, max_tokens=10),
                            use_tqdm=False)[0].outputs
    hot = smollm2.generate([STORY], SamplingParams(n=6, temperature=1.5, seed=0, max_tokens=10),
                           use_tqdm=False)[0].outputs
    assert len({tuple(o.token_ids) for o in cold}) == 1
    assert len({tuple(o.token_ids) for o in hot}) == 6


def _repeats(tokens, prompt=()):
    return sum(1 for i, t in enumerate(tokens) if t in prompt or t in tokens[:i])


def test_e2e_penalties_change_output_and_reduce_repeats(smollm2, smol_tokenizer):
    prompt = smol_tokenizer.encode(REPETITIVE)
    base = one(smollm2, prompt, temperature=0, max_tokens=32, ignore_eos=True).token_ids
    rep = one(smollm2, prompt, temperature=0, max_tokens=32, ignore_eos=True,
              repetition_penalty=1.3).token_ids
    assert rep != base
    assert _repeats(rep, prompt) < _repeats(base, prompt)
    for name in ("presence_penalty", "frequency_penalty"):
        out = one(smollm2, prompt, temperature=0, max_tokens=32, ignore_eos=True,
                  **{name: 1.0}).token_ids
        assert out != base, name
        assert _repeats(out) < _repeats(base), name


def test_e2e_seed_same_text_in_any_batch(smollm2, smol_tokenizer):
    sp = SamplingParams(temperature=1.0, seed=1234, max_tokens=16, ignore_eos=True)
    alone = smollm2.generate([STORY], sp, use_tqdm=False)[0].outputs[0]
    others = ["The weather today is", REPETITIVE, "def main():"]
    batch = smollm2.generate(
        others[:2] + [STORY] + others[2:],
        [SamplingParams(temperature=1.0, max_tokens=20), SamplingParams(temperature=0.7, seed=1234),
         sp, SamplingParams(temperature=1.0, seed=99, max_tokens=5)], use_tqdm=False)
    assert batch[2].outputs[0].token_ids == alone.token_ids
    assert batch[2].outputs[0].text == alone.text
    other_seed = one(smollm2, STORY, temperature=1.0, seed=1235, max_tokens=16, ignore_eos=True)
    assert other_seed.token_ids != alone.token_ids


def test_e2e_stop_strings(smollm2, greedy_story):
    text = greedy_story.text
    words = text.split()
    stop = words[len(words) // 2]                    # a word from the middle of the greedy text
    cut = text.index(stop)
    out = one(smollm2, STORY, temperature=0, max_tokens=24, ignore_eos=True, stop=[stop])
    assert out.text == text[:cut]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert len(out.token_ids) < len(greedy_story.token_ids)
    out = one(smollm2, STORY, temperature=0, max_tokens=24, ignore_eos=True, stop=stop,
              include_stop_str_in_output=True)
    assert out.text == text[:cut + len(stop)]
    # the earliest of several stop strings wins, even one that ends inside a token
    partial = text[cut + 1:cut + 3]
    late, early = words[-1], text[5:9]
    first = min((late, early), key=text.index)
    out = one(smollm2, STORY, temperature=0, max_tokens=24, ignore_eos=True, stop=[late, early])
    assert out.text == text[:text.index(first)] and out.stop_reason == first
    out = one(smollm2, STORY, temperature=0, max_tokens=24, ignore_eos=True, stop=[partial])
    assert out.text == text[:text.index(partial)]


def test_e2e_stop_string_never_streamed(smollm2, greedy_story):
    text = greedy_story.text
    stop = text[len(text) // 2:len(text) // 2 + 4]
    engine = smollm2.engine
    rid = engine.add_request(STORY, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                   stop=[stop]))
    seen = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id == rid
            seen.append(out.outputs[0].text)
    assert seen[-1] == text[:text.index(stop)]
    for partial in seen:
        assert seen[-1].startswith(partial) and stop not in partial


def test_e2e_stop_token_ids(smollm2, greedy_story):
    ids = greedy_story.token_ids
    k = next(i for i in range(3, len(ids)) if ids[i] not in ids[:i])
    out = one(smollm2, STORY, temperature=0, max_tokens=24, ignore_eos=True, stop_token_ids=[ids[k]])
    assert out.token_ids == ids[:k + 1]
    assert out.finish_reason == "stop" and out.stop_reason == ids[k]
    assert out.text == smollm2.engine.tokenizer.decode(ids[:k])


def test_e2e_eos_and_ignore_eos(smollm2):
    eos = smollm2.get_tokenizer().eos_token_id
    out = chat(smollm2, temperature=0, max_tokens=24)
    assert out.finish_reason == "stop" and out.token_ids[-1] == eos
    assert eos not in out.token_ids[:-1]
    assert out.text == "The capital of France is Paris."
    more = chat(smollm2, temperature=0, max_tokens=24, ignore_eos=True)
    assert more.finish_reason == "length" and len(more.token_ids) == 24
    assert more.token_ids[:len(out.token_ids)] == out.token_ids


def test_e2e_eos_text_not_in_output(smollm2):
    out = chat(smollm2, temperature=0, max_tokens=24, skip_special_tokens=False)
    assert out.finish_reason == "stop"
    assert out.text == "The capital of France is Paris."


def test_e2e_max_tokens(smollm2, greedy_story):
    for n in (1, 7):
        out = one(smollm2, STORY, temperature=0, max_tokens=n, ignore_eos=True)
        assert out.token_ids == greedy_story.token_ids[:n] and out.finish_reason == "length"


def test_e2e_min_tokens(smollm2):
    eos = smollm2.get_tokenizer().eos_token_id
    short = chat(smollm2, temperature=0, max_tokens=24)
    assert len(short.token_ids) < 12
    out = chat(smollm2, temperature=0, max_tokens=24, min_tokens=12)
    assert len(out.token_ids) >= 12 and eos not in out.token_ids[:11]
    assert out.token_ids[:len(short.token_ids) - 1] == short.token_ids[:-1]


def test_e2e_skip_special_tokens(smollm2):
    kept = chat(smollm2, temperature=0, max_tokens=12, ignore_eos=True, skip_special_tokens=False)
    skipped = chat(smollm2, temperature=0, max_tokens=12, ignore_eos=True)
    assert kept.token_ids == skipped.token_ids
    assert "<|im_end|>" in kept.text and "<|im_end|>" not in skipped.text
    assert kept.text.startswith("The capital of France is Paris.<|im_end|>")


def test_e2e_logprobs(smollm2):
    out = one(smollm2, STORY, temperature=1.0, seed=5, max_tokens=12, ignore_eos=True, logprobs=5)
    assert len(out.logprobs) == len(out.token_ids)
    total = 0.0
    for tok, entry in zip(out.token_ids, out.logprobs):
        chosen = entry[tok]
        total += chosen.logprob
        ranked = sorted(entry.values(), key=lambda lp: -lp.logprob)
        top = [lp for t, lp in entry.items() if t != tok or lp.rank <= 5]
        assert len(entry) == (5 if chosen.rank <= 5 else 6)
        # ranks 1..5 are the five best, in order of logprob; the chosen token's rank is true
        assert sorted(lp.rank for lp in top)[:5] == [1, 2, 3, 4, 5]
        assert [lp.rank for lp in ranked][:5] == [1, 2, 3, 4, 5]
        higher = sum(lp.logprob > chosen.logprob for lp in entry.values())
        assert chosen.rank == 1 + higher if chosen.rank <= 5 else higher == 5
        assert all(lp.logprob <= 0 and lp.decoded_token is not None for lp in entry.values())
    assert out.cumulative_logprob == pytest.approx(total)
    zero = one(smollm2, STORY, temperature=0, max_tokens=4, logprobs=0)
    assert all(len(e) == 1 and e[t].rank == 1 for t, e in zip(zero.token_ids, zero.logprobs))
    assert one(smollm2, STORY, temperature=0, max_tokens=4).logprobs is None


def test_e2e_n_distinct_samples_share_prompt_kv(smollm2, smol_tokenizer):
    cache = smollm2.engine.kv.prefix_cache
    if cache is not None:
        cache.reset()                       # any sharing below comes from the siblings
    prompt = smol_tokenizer.encode("List some unusual hobbies that people enjoy in their free "
                                   "time on weekends, such as origami, beekeeping, or")
    assert len(prompt) > 20
    sp = SamplingParams(n=4, temperature=1.0, seed=11, max_tokens=10, ignore_eos=True)
    res = smollm2.generate([prompt], sp, use_tqdm=False)[0]
    assert [o.index for o in res.outputs] == [0, 1, 2, 3]
    assert len({tuple(o.token_ids) for o in res.outputs}) == 4
    block = smollm2.engine.config.cache.block_size
    assert res.num_cached_tokens == (len(prompt) - 1) // block * block > 0
    again = smollm2.generate([prompt], sp, use_tqdm=False)[0]
    assert [o.token_ids for o in again.outputs] == [o.token_ids for o in res.outputs]
