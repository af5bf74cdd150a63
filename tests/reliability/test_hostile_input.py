"""Hostile input, case by case: huge, negative and non-finite numbers, invalid UTF-8 and lone
surrogates, giant and deeply nested bodies, thousands of stop strings, n x prompts past the
queue, unknown nested fields. Each must be a 4xx in OpenAI's shape naming the parameter where
there is one, while a client streaming beside them is served without a hitch.
(tests/e2e/test_errors.py has the ordinary cases: wrong types, ranges, malformed JSON.)"""
from __future__ import annotations

import json
import threading

import httpx
import pytest

from reliability_helpers import assert_allocator_idle, assert_openai_error

BIG = 10 ** 30


def _raw(*pairs: str) -> bytes:
    """A completions body from raw JSON fragments (for what json.dumps will not write)."""
    return ('{"prompt": "hi", "max_tokens": 2, ' + ", ".join(pairs) + "}").encode()


class Neighbour:
    """Streams short completions in a loop while the bad input flies; every one must finish."""

    def __init__(self, server) -> None:
        self.server, self.results, self.stop = server, [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        body = {"prompt": "Count to ten:", "max_tokens": 8, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        with httpx.Client(base_url=self.server.url, headers=self.server.headers,
                          timeout=60) as http:
            while not self.stop.is_set():
                with http.stream("POST", "/v1/completions", json=body) as r:
                    self.results.append((r.status_code, [ln for ln in r.iter_lines() if ln]))


@pytest.fixture(scope="module")
def neighbour(small_server):
    n = Neighbour(small_server)
    yield n
    n.stop.set()
    n.thread.join(60)


def _post(server, path: str, **kw) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", headers={**server.headers, **kw.pop("headers", {})},
                      timeout=60, **kw)


BAD_COMPLETIONS = [                       # (body, the param the error names)
    ({"prompt": "hi", "max_tokens": BIG}, "max_tokens"),
    ({"prompt": "hi", "n": BIG}, "n"),
    ({"prompt": "hi", "top_k": BIG}, "top_k"),
    ({"prompt": "hi", "seed": 2 ** 64}, "seed"),
    ({"prompt": "hi", "seed": -2 ** 63 - 1}, "seed"),
    ({"prompt": "hi", "logprobs": BIG}, "logprobs"),
    ({"prompt": "hi", "min_tokens": BIG}, "min_tokens"),
    ({"prompt": "hi", "stop_token_ids": [BIG]}, "stop_token_ids"),
    ({"prompt": "hi", "stop_token_ids": [10 ** 6], "min_tokens": 1}, "stop_token_ids"),
    ({"prompt": [BIG]}, "prompt"),
    ({"prompt": "hi", "temperature": -1e308}, "temperature"),
    ({"prompt": "hi", "n": -1}, "n"),
    ({"prompt": "hi", "top_k": -5}, "top_k"),
    ({"prompt": "hi", "logprobs": -1}, "logprobs"),
    ({"prompt": "hi", "min_tokens": -1}, "min_tokens"),
    ({"prompt": "hi", "stop_token_ids": [-1]}, "stop_token_ids"),
    ({"prompt": "hi", "top_p": -0.5}, "top_p"),
    ({"prompt": "hi", "min_p": -1.0}, "min_p"),
    ({"prompt": "hi", "presence_penalty": -1e9}, "presence_penalty"),
    ({"prompt": "hi", "repetition_penalty": -1.0}, "repetition_penalty"),
    ({"prompt": "hi", "stop": [f"s{i}" for i in range(5000)]}, "stop"),
    ({"prompt": "hi", "stop": [f"s{i}" for i in range(65)]}, "stop"),
    ({"prompt": "hi", "stop": "x" * 5000}, "stop"),
    ({"prompt": "hi", "stop_token_ids": list(range(1000))}, "stop_token_ids"),
    ({"prompt": "hi", "n": 3}, "n"),                          # more than the whole queue (2)
    ({"prompt": ["a", "b"], "n": 2}, "n"),                    # prompts x n past the queue
    ({"prompt": [[1]] * 100_000}, "n"),                       # rejected before tokenizing
    ({"prompt": "hi", "max_tokens": 39, "n": 2, "echo": True, "logprobs": 1}, "echo"),
    ({"prompt": "hi " * 60, "max_tokens": 1}, "messages"),    # past the 40-token context
    ({"prompt": "hi", "max_tokens": 40}, "max_tokens"),       # prompt + max_tokens > context
    ({"prompt": "hi", "stream_options": {"include_usage": True, "extra": 1}, "stream": True},
     "stream_options"),
    ({"prompt": "hi", "nested": {"deep": [1, 2, 3]}}, "nested"),
]


@pytest.mark.parametrize("body, param", BAD_COMPLETIONS,
                         ids=[f"{i}-{p}" for i, (_, p) in enumerate(BAD_COMPLETIONS)])
def test_bad_completion_values(small_server, neighbour, body, param):
    err = assert_openai_error(_post(small_server, "/v1/completions", json=body), 400)
    assert err["param"] == param, err


RAW_BODIES = [
    _raw('"temperature": NaN'), _raw('"top_p": Infinity'), _raw('"presence_penalty": -Infinity'),
    _raw('"temperature": 1e99999'),                        # parses as inf
    b'{"prompt": "\xff\xfe bad bytes"}', b'{"prompt": "\xc0\xaf overlong"}',
    b'{"prompt": "\xed\xa0\x80 surrogate as UTF-8"}', b'{"prompt": "\\ud800 lone escape"}',
    _raw('"stop": ["\\udfff"]'), _raw('"user": "\\ud83d"'),
    b'{"prompt": "hi", "response_format": ' + b'{"a": ' * 50_000 + b"1" + b"}" * 50_001,
    b'{"prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    b'{"prompt": "hi", "max_tokens": 2' + b" " * (3 << 20) + b"}",   # 3 MiB of spaces: fine JSON
]


@pytest.mark.parametrize("content", RAW_BODIES, ids=range(len(RAW_BODIES)))
def test_bad_raw_bodies(small_server, neighbour, content):
    r = _post(small_server, "/v1/completions", content=content,
              headers={"Content-Type": "application/json"})
    if content.endswith(b" " * 100 + b"}"):
        assert r.status_code == 200, r.text                   # big but valid: served
        return
    assert_openai_error(r, 400)


def test_bad_chat_and_tokenizer_bodies(small_server, neighbour):
    user = {"role": "user", "content": "hi"}
    cases = [
        ("/v1/chat/completions", {"messages": [{**user, "extra": 1}]}, "messages"),
        ("/v1/chat/completions", {"messages": [user] * 50_000}, "messages"),   # 50k turns
        ("/v1/chat/completions", {"messages": [user], "top_logprobs": BIG, "logprobs": True},
         "top_logprobs"),
        ("/v1/chat/completions", {"messages": [user], "max_completion_tokens": -BIG},
         "max_completion_tokens"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": "file:///etc/passwd"}]}]}, "messages"),
        ("/tokenize", {"prompt": "hi", "messages": [user]}, "prompt"),
        ("/tokenize", {"prompt": "hi", "add_special_tokens": "yes"}, "add_special_tokens"),
        ("/detokenize", {"tokens": [BIG]}, "tokens"),
        ("/detokenize", {"tokens": [-1, 2]}, "tokens"),
    ]
    for path, body, param in cases:
        err = assert_openai_error(_post(small_server, path, json=body), 400)
        assert err["param"] == param, (path, err)
    for path in ("/tokenize", "/detokenize", "/v1/chat/completions"):
        assert_openai_error(_post(small_server, path, content=b'{"prompt": "\\udc00"}',
                                  headers={"Content-Type": "application/json"}), 400)


def test_limits_accept_their_boundary(small_server, neighbour):
    """The limits are not off by one: 64 stop strings of 1024 characters are served."""
    body = {"prompt": "hi", "max_tokens": 3, "stop": ["\u00e9" * 1024] * 63 + ["zz"],
            "stop_token_ids": list(range(5, 261)), "seed": 2 ** 63 - 1, "top_k": 2 ** 63 - 1}
    r = _post(small_server, "/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_neighbour_was_served_throughout(small_server, neighbour):
    """Runs last: every stream of the well-behaved client finished, with usage and [DONE]."""
    neighbour.stop.set()
    neighbour.thread.join(60)
    assert len(neighbour.results) >= 2, "the neighbour did not run alongside the bad input"
    for status, lines in neighbour.results:
        assert status == 200 and lines[-1] == "data: [DONE]", lines[-3:]
        events = [json.loads(ln[6:]) for ln in lines[:-1]]
        assert not any("error" in e for e in events), events
        assert events[-1]["usage"]["completion_tokens"] == 8
        assert [e["choices"][0]["finish_reason"] for e in events[:-1]][-1] == "length"
    assert httpx.get(f"{small_server.url}/health").status_code == 200
    assert_allocator_idle(small_server)
    print(f"\nbad input: {len(BAD_COMPLETIONS) + len(RAW_BODIES) + 12} cases; the neighbour "
          f"completed {len(neighbour.results)} streams meanwhile")
