"""/v1/chat/completions through the official openai client."""
from __future__ import annotations

import httpx

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_capital_of_france(client, model_name):
    # no max_tokens: up to the context; the model ends its short answer itself
    r = client.chat.completions.create(model=model_name, messages=QUESTION, temperature=0)
    assert r.choices[0].finish_reason == "stop"
    assert r.object == "chat.completion"
    msg = r.choices[0].message
    assert msg.role == "assistant" and "Paris" in msg.content


def test_streamed_equals_non_streamed_and_role_first(client, model_name):
    kw = dict(model=model_name, messages=[{"role": "system", "content": "You are terse."}]
              + QUESTION, temperature=0, max_tokens=24)
    full = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:])
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_multi_turn_and_content_parts(client, model_name):
    messages = QUESTION + [{"role": "assistant", "content": "Paris."},
                           {"role": "user", "content": [{"type": "text", "text": "And Italy?"}]}]
    r = client.chat.completions.create(model=model_name, messages=messages, temperature=0,
                                       max_tokens=16)
    assert r.choices[0].message.content


def test_usage_matches_tokenize(client, server, model_name):
    r = client.chat.completions.create(model=model_name, messages=QUESTION, temperature=0,
                                       max_tokens=4)
    count = httpx.post(f"{server.url}/tokenize", json={"messages": QUESTION}).json()["count"]
    assert r.usage.prompt_tokens == count
    assert r.usage.completion_tokens <= 4
    assert r.usage.total_tokens == count + r.usage.completion_tokens
    again = client.chat.completions.create(model=model_name, messages=QUESTION, temperature=0,
                                           max_tokens=4)
    # the same prompt again: its full blocks come from the prefix cache
    assert again.usage.prompt_tokens_details.cached_tokens > 0


def test_stream_usage(client, model_name):
    chunks = list(client.chat.completions.create(
        model=model_name, messages=QUESTION, temperature=0, max_tokens=6, stream=True,
        stream_options={"include_usage": True}))
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens >= 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text


def test_logprobs_chat_format(client, model_name):
    r = client.chat.completions.create(model=model_name, messages=QUESTION, temperature=0,
                                       max_tokens=6, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        assert t.top_logprobs[0].token == t.token          # greedy: rank 1 is the chosen one
        assert abs(t.top_logprobs[0].logprob - t.logprob) < 1e-4
        assert [a.logprob for a in t.top_logprobs] == sorted(
            (a.logprob for a in t.top_logprobs), reverse=True)
        assert bytes(t.bytes).decode("utf-8", "replace") == t.token


def test_n_seed_stop(client, model_name):
    kw = dict(model=model_name, messages=QUESTION, temperature=1.0, max_tokens=10, n=2, seed=5)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    r = client.chat.completions.create(model=model_name, messages=QUESTION, temperature=0,
                                       max_tokens=20, stop=[" of"])
    assert r.choices[0].finish_reason == "stop" and " of" not in r.choices[0].message.content
