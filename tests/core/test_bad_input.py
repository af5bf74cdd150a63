"""Bad input is a clear ValueError raised before any work starts; the detokenizer is exact."""
from __future__ import annotations

import pytest

from ember import SamplingParams
from ember.tokenizer import IncrementalDetokenizer


# ---- SamplingParams: validated on construction -------------------------------------------------

@pytest.mark.parametrize("params", [
    dict(max_tokens=0), dict(max_tokens=-3), dict(max_tokens=2.5),
    dict(top_p=0), dict(top_p=0.0), dict(top_p=1.01), dict(top_p=-0.5), dict(top_p=float("nan")),
    dict(temperature=-0.1), dict(temperature=float("inf")),
    dict(top_k=-2), dict(top_k=1.5), dict(min_p=1.5), dict(min_p=-0.1),
    dict(repetition_penalty=0), dict(presence_penalty=2.5), dict(frequency_penalty=-3),
    dict(n=0), dict(min_tokens=-1), dict(min_tokens=5, max_tokens=4),
    dict(logprobs=-1), dict(logprobs=21), dict(seed="x"),
    dict(stop=[""]), dict(stop_token_ids=[-1]),
    dict(unknown_parameter=1), dict(max_new_tokens=5), dict(topp=0.5),
], ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()))
def test_bad_sampling_params_raise_value_error(params):
    with pytest.raises(ValueError):
        SamplingParams(**params)


def test_good_sampling_params_edges():
    SamplingParams(top_p=1.0, max_tokens=1, temperature=0, top_k=-1, min_p=1.0, logprobs=20)
    assert SamplingParams(stop="x").stop == ["x"]


# ---- prompts: rejected before anything is queued -------------------------------------------

def _assert_nothing_started(llm, stats_before):
    engine = llm.engine
    assert not engine.has_unfinished_requests()
    assert not engine.states and not engine.scheduler.waiting and not engine.scheduler.running
    assert not engine.kv.tables
    engine.kv.check_integrity()
    assert engine.stats == stats_before


@pytest.fixture
def llm(smollm2):
    engine = smollm2.engine
    assert not engine.has_unfinished_requests()
    return smollm2


def _bad_prompts(llm):
    limit = llm.engine.config.scheduler.max_model_len
    vocab = llm.engine.config.model_config.vocab_size
    return {
        "empty text": "",
        "empty ids": [],
        "empty dict": {"prompt_token_ids": []},
        "too long ids": [100] * limit,
        "too long text": "hello " * (limit + 10),
        "negative id": [5, -1, 7],
        "id past vocab": [5, vocab, 7],
        "float ids": [1.0, 2.0],
        "unknown field": {"prompt": "hi", "temperature": 0},
        "wrong type": 42,
    }


BAD = ["empty text", "empty ids", "empty dict", "too long ids", "too long text", "negative id",
       "id past vocab", "float ids", "unknown field", "wrong type"]


@pytest.mark.parametrize("name", BAD)
def test_bad_prompt_rejected_before_any_work(llm, name):
    import dataclasses

    bad = _bad_prompts(llm)[name]
    before = dataclasses.replace(llm.engine.stats)
    # the bad prompt comes after a good one: nothing at all may start
    with pytest.raises(ValueError):
        llm.generate(["The capital of France is", bad], SamplingParams(max_tokens=4), use_tqdm=False)
    _assert_nothing_started(llm, before)
    # add_request (the server's path) rejects it too
    with pytest.raises(ValueError):
        llm.engine.add_request(bad, SamplingParams(max_tokens=4))
    _assert_nothing_started(llm, before)


def test_prompt_just_inside_the_context_is_accepted(llm):
    limit = llm.engine.config.scheduler.max_model_len
    # validation only; no generation needed
    llm.engine.validate([100] * (limit - 1), SamplingParams(max_tokens=1))


def test_bad_params_in_a_list_rejected_before_any_work(llm):
    import dataclasses

    before = dataclasses.replace(llm.engine.stats)
    with pytest.raises(ValueError):
        llm.generate(["a", "b"], [SamplingParams(max_tokens=2)], use_tqdm=False)     # 1 for 2 prompts
    with pytest.raises(ValueError):
        llm.generate(["a", "b"], [SamplingParams(max_tokens=2), {"max_tokens": 2}], use_tqdm=False)
    _assert_nothing_started(llm, before)


def test_engine_still_works_after_rejections(llm):
    out = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=3),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3


def test_bad_engine_options(make_smollm2):
    with pytest.raises(ValueError):
        make_smollm2(dtype="float33")
    with pytest.raises(ValueError):
        make_smollm2(attention_backend="nonexistent")


# ---- incremental detokenization ------------------------------------------------------------------

TEXTS = [
    "Hello 🙂 world! 日本語のテキスト and 中文字符 — naïve café ☕🎉🎉",
    "👨‍👩‍👧‍👦 family; 🇫🇷 flag; ñ, ü, ß, Ω, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "def f(x):\n    return x  # 注释 ✓\n\n\tindented\r\nline",
    "  leading spaces, trailing   ",
]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("prompt", ["", "Say something:", "日本"])
def test_incremental_detokenizer_across_split_characters(smollm2, text, prompt):
    tok = smollm2.engine.tokenizer
    prompt_ids = tok.encode(prompt) if prompt else []
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, prompt_ids, skip_special_tokens=True)
    deltas = [detok.add(t) for t in ids]
    assert "".join(deltas) == tok.decode(ids)
    assert not any("\ufffd" in d for d in deltas)


def test_detokenizer_test_really_splits_characters(smollm2):
    """Guard for the test above: some single tokens are incomplete UTF-8 on their own."""
    tok = smollm2.engine.tokenizer
    ids = tok.encode(TEXTS[0], add_special_tokens=False)
    assert any("\ufffd" in tok.decode([t]) for t in ids)


def test_detokenizer_special_tokens(smollm2):
    tok = smollm2.engine.tokenizer
    ids = tok.encode("<|im_start|>assistant\nHi 🙂<|im_end|>", add_special_tokens=False)
    for skip in (True, False):
        detok = IncrementalDetokenizer(tok, [], skip_special_tokens=skip)
        assert "".join(detok.add(t) for t in ids) == tok.decode(ids, skip_special_tokens=skip)


# ---- aborts ----------------------------------------------------------------------------------------

def test_abort_mid_prefill_and_mid_decode_frees_everything(llm, assert_engine_idle):
    engine = llm.engine
    decoding = engine.add_request("The capital of France is",
                                  SamplingParams(max_tokens=50, ignore_eos=True))
    long_prompt = engine.add_request([100 + i % 50 for i in range(300)], SamplingParams(max_tokens=5))
    n = SamplingParams(n=3, temperature=1.0, seed=0, max_tokens=50, ignore_eos=True)
    siblings = engine.add_request("Tell me a story about a dragon.", n)
    for _ in range(3):
        engine.step()
    assert engine.has_unfinished_requests()
    for rid in (decoding, long_prompt, siblings, "no-such-request"):
        engine.abort_request(rid)
    assert_engine_idle(llm)


def test_a_failing_sibling_leaves_no_partial_request(llm, monkeypatch, assert_engine_idle):
    """n > 1: if building the k-th sibling fails, none of the earlier ones stays registered (the
    next step would otherwise meet a half-built request)."""
    from ember.engine import llm_engine as le
    engine = llm.engine
    made = []
    real = le.IncrementalDetokenizer

    def flaky(*args, **kwargs):
        if len(made) == 2:
            raise RuntimeError("sibling 3 fails")
        made.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(le, "IncrementalDetokenizer", flaky)
    with pytest.raises(RuntimeError):
        engine.add_request("Hello", SamplingParams(n=4, max_tokens=2))
    monkeypatch.setattr(le, "IncrementalDetokenizer", real)
    assert not engine.states and not engine.has_unfinished_requests()
    engine.add_request("Hello", SamplingParams(n=2, max_tokens=2))
    while engine.has_unfinished_requests():
        engine.step()
    assert_engine_idle(llm)
