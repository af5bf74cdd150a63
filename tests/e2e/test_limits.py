"""A second server with an API key, one sequence at a time and a one-slot waiting queue:
authentication, admission control (503) and graceful shutdown on SIGTERM."""
from __future__ import annotations

import signal
import threading
import time

import httpx
import openai
import pytest

KEY = "sekret-key"


@pytest.fixture(scope="module")
def small(server_factory):
    srv = server_factory("--max-num-seqs", "1", "--max-waiting", "1", "--shutdown-timeout", "1",
                       api_key=KEY)
    yield srv
    srv.stop(signal.SIGKILL)


def _stream_in_background(small, body: dict) -> tuple[threading.Thread, threading.Event, list]:
    """POST a long streaming request; reads until `stop` is set, then disconnects."""
    stop, events = threading.Event(), []

    def run():
        with httpx.Client(timeout=60, headers=small.headers) as http:
            with http.stream("POST", f"{small.url}/v1/completions", json=body) as r:
                events.append(r.status_code)
                for line in r.iter_lines():
                    events.append(line)
                    if stop.is_set():
                        return

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, stop, events


LONG = {"prompt": "Count:", "max_tokens": 3000, "ignore_eos": True, "stream": True}


def test_api_key_required(small):
    url = small.url
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert httpx.get(f"{url}/metrics").status_code == 401        # not --metrics-public
    assert httpx.get(f"{url}/health").status_code == 200         # always open
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
    good = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    r = good.completions.create(model=good.models.list().data[0].id, prompt="Hi", max_tokens=2)
    assert r.usage.completion_tokens >= 1


def test_503_when_waiting_queue_full(small):
    first, stop1, ev1 = _stream_in_background(small, LONG)
    deadline = time.monotonic() + 30
    while small.metrics()["ember:num_requests_running"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    second, stop2, ev2 = _stream_in_background(small, LONG)      # waits: one sequence at a time
    while small.metrics()["ember:num_requests_waiting"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        r = httpx.post(f"{small.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                       headers=small.headers, timeout=30)
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] and r.json()["error"]["code"] == "server_overloaded"
    finally:
        stop1.set(), stop2.set()
        first.join(30), second.join(30)
    assert ev1[0] == 200 and ev2[0] == 200
    m = small.wait_idle()
    assert m["ember:num_requests_running"] == 0 and m["ember:num_requests_waiting"] == 0


def test_sigterm_is_graceful(small):
    """Runs last here: SIGTERM during a stream ends the process with status 0."""
    t, _stop, events = _stream_in_background(small, LONG)
    deadline = time.monotonic() + 30
    while len(events) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert events and events[0] == 200
    start = time.monotonic()
    rc = small.stop(signal.SIGTERM, timeout=30)
    assert rc == 0, small.log()[-3000:]
    assert time.monotonic() - start < 20
    t.join(10)
    assert not t.is_alive()
    # the stream was ended by an abort, cleanly: an error event, then [DONE]
    data = [e for e in events[1:] if e]
    assert data[-1] == "data: [DONE]" and "shutting down" in data[-2], data[-3:]
    assert "Traceback" not in small.log(), small.log()[-3000:]
