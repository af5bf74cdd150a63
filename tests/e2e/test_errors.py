"""Every error comes back in OpenAI's shape with the right status, and never disturbs others."""
from __future__ import annotations

import httpx
import openai
import pytest

from ember.server.serving_common import admit


def _post(server, path: str, **kw) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", timeout=30, **kw)


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


@pytest.mark.parametrize("body, param", [
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": -3}, "max_tokens"),
    ({"prompt": "hi", "temperature": -1}, "temperature"),
    ({"prompt": "hi", "temperature": "hot"}, "temperature"),
    ({"prompt": "hi", "max_tokens": "5"}, "max_tokens"),
    ({"prompt": "hi", "n": True}, "n"),
    ({"prompt": "hi", "top_p": 0}, "top_p"),
    ({"prompt": "hi", "logprobs": 50}, "logprobs"),
    ({"prompt": 42}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": [10 ** 9]}, "prompt"),
    ({"prompt": ""}, None),
    ({"prompt": "hi", "frobnicate": 1}, "frobnicate"),
    ({"max_tokens": 5}, "prompt"),
    ({"prompt": "hi", "n": 100000}, "n"),
    ({"prompt": "hi", "logit_bias": {"1": 5}}, "logit_bias"),
    ({"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options"),
])
def test_bad_completion_requests(server, body, param):
    err = _error(_post(server, "/v1/completions", json=body), 400)
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param


def test_unknown_field_message(server):
    err = _error(_post(server, "/v1/completions", json={"prompt": "x", "best_of_luck": 2}), 400)
    assert "Unrecognized request argument supplied: best_of_luck" in err["message"]


def test_bad_chat_requests(server):
    for body in ({"messages": []}, {"messages": [{"role": "wizard", "content": "hi"}]},
                 {"messages": "hello"}, {"messages": [{"role": "user", "content": "x"}],
                                         "top_logprobs": 3}):
        _error(_post(server, "/v1/chat/completions", json=body), 400)


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"\xff\xfe", b"", b"[" * 100000])
def test_malformed_json(server, content):
    r = _post(server, "/v1/completions", content=content,
              headers={"Content-Type": "application/json"})
    _error(r, 400)


def test_context_length(server):
    err = _error(_post(server, "/v1/completions", json={"prompt": "hi", "max_tokens": 10 ** 6}),
                 400)
    assert "maximum context length" in err["message"]
    long_prompt = " hello" * 9000
    err = _error(_post(server, "/v1/chat/completions",
                       json={"messages": [{"role": "user", "content": long_prompt}]}), 400)
    assert "maximum context length" in err["message"]


def test_unknown_model_is_404(client, server):
    err = _error(_post(server, "/v1/completions", json={"model": "nope", "prompt": "hi"}), 404)
    assert err["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    _error(httpx.get(f"{server.url}/no/such/route"), 404)


def test_body_too_large_is_413(server):
    big = b'{"prompt": "' + b"a" * (5 << 20) + b'"}'
    _error(_post(server, "/v1/completions", content=big,
                 headers={"Content-Type": "application/json"}), 413)

    def chunked():                     # no content-length: the limit applies while reading
        for _ in range(5):
            yield b"x" * (1 << 20)
    _error(_post(server, "/v1/completions", content=chunked()), 413)


def test_openai_client_raises_bad_request(client, model_name):
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=model_name, prompt="hi", max_tokens=0)
    assert exc.value.status_code == 400


def test_admission_rule():
    assert admit(0, None) and admit(10 ** 6, None)
    assert admit(0, 1) and not admit(1, 1) and not admit(5, 1)


def test_server_survives_bad_requests(client, model_name, server):
    r = client.completions.create(model=model_name, prompt="The capital of France is",
                                  max_tokens=4, temperature=0)
    assert "Paris" in r.choices[0].text
    assert httpx.get(f"{server.url}/health").status_code == 200
