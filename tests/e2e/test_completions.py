"""/v1/completions through the official openai client."""
from __future__ import annotations

import httpx

PROMPT = "The capital of France is"


def _tokenize(server, prompt: str) -> list[int]:
    r = httpx.post(f"{server.url}/tokenize", json={"prompt": prompt}, timeout=10)
    r.raise_for_status()
    return r.json()["tokens"]


def test_completion_basic_and_usage(client, server, model_name):
    r = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=8, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.model == model_name
    choice = r.choices[0]
    assert "Paris" in choice.text
    assert choice.finish_reason == "length"
    assert r.usage.prompt_tokens == len(_tokenize(server, PROMPT))
    assert r.usage.completion_tokens == 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8
    assert r.usage.prompt_tokens_details.cached_tokens >= 0


def test_streamed_equals_non_streamed(client, model_name):
    kw = dict(model=model_name, prompt="Once upon a time", max_tokens=24, temperature=0)
    full = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_stream_include_usage(client, model_name):
    chunks = list(client.completions.create(
        model=model_name, prompt=PROMPT, max_tokens=5, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert all(c.usage is None for c in chunks[:-1])


def test_stop_string(client, model_name):
    kw = dict(model=model_name, prompt=PROMPT, max_tokens=20, temperature=0, stop=["\n"])
    r = client.completions.create(**kw)
    assert r.choices[0].finish_reason == "stop"
    assert "\n" not in r.choices[0].text and "Paris" in r.choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw))
    assert streamed == r.choices[0].text


def test_n_and_seed_reproducible(client, model_name):
    kw = dict(model=model_name, prompt="My favourite animal is", max_tokens=12, temperature=1.0,
              extra_body={"ignore_eos": True})
    a = client.completions.create(n=2, seed=1234, **kw)
    assert sorted(c.index for c in a.choices) == [0, 1]
    assert a.usage.completion_tokens == 24      # both samples counted (ignore_eos)
    b = client.completions.create(n=2, seed=1234, **kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    others = [client.completions.create(seed=s, **kw).choices[0].text for s in (1, 2, 3)]
    assert len(set(others)) > 1, "different seeds should give different samples"


def test_logprobs(client, model_name):
    r = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=6, temperature=0,
                                  logprobs=3, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset[0] == 0
    for tok, val, top, i in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, range(6)):
        assert val <= 0
        assert 1 <= len(top) <= 4
        # greedy: the chosen token is the most likely one, so it heads the alternatives
        assert tok in top and abs(top[tok] - max(top.values())) < 1e-4
        if i:
            assert lp.text_offset[i] == lp.text_offset[i - 1] + len(lp.tokens[i - 1])


def test_streamed_logprobs_match(client, model_name):
    kw = dict(model=model_name, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2)
    full = client.completions.create(**kw).choices[0].logprobs
    tokens, offsets = [], []
    for c in client.completions.create(stream=True, **kw):
        if c.choices and c.choices[0].logprobs:
            tokens += c.choices[0].logprobs.tokens
            offsets += c.choices[0].logprobs.text_offset
    assert tokens == full.tokens and offsets == full.text_offset


def test_echo_multiple_prompts_and_token_ids(client, server, model_name):
    ids = _tokenize(server, PROMPT)
    r = client.completions.create(model=model_name, prompt=[PROMPT, "Hello"], max_tokens=3,
                                  temperature=0, echo=True)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text.startswith(PROMPT) and r.choices[1].text.startswith("Hello")
    by_ids = client.completions.create(model=model_name, prompt=ids, max_tokens=3, temperature=0)
    assert r.choices[0].text == PROMPT + by_ids.choices[0].text
    both = client.completions.create(model=model_name, prompt=[ids, ids], max_tokens=3,
                                     temperature=0)
    assert [c.text for c in both.choices] == [by_ids.choices[0].text] * 2
    assert both.usage.prompt_tokens == 2 * len(ids)


def test_sampling_knobs_accepted(client, model_name):
    r = client.completions.create(
        model=model_name, prompt=PROMPT, max_tokens=6, temperature=0.8, top_p=0.9,
        presence_penalty=0.5, frequency_penalty=0.5, seed=7,
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "min_tokens": 4,
                    "ignore_eos": False})
    assert r.usage.completion_tokens >= 4
