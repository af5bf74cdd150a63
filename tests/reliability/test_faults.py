"""Fault injection (EMBER_FAULT_INJECT, test-only): a step that raises mid-step, and the engine
thread dying (ember's stand-in for "the worker was killed": the engine is a thread, there are no
worker processes). In-flight requests get a 5xx in OpenAI's shape (streams: an error event, then
[DONE]); /health says 503 while the engine is dead; then, per --on-engine-failure, the server
restarts the engine with fresh state and serves again, or exits with status 3. Either way no
KV block leaks and no process is left behind."""
from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import psutil
import pytest

from reliability_helpers import (assert_allocator_idle, assert_no_leftovers, assert_openai_error,
                                 descendants, start_server)

KEY = "fault-key-env-only-7d2a"
EXIT_ENGINE_FAILED = 3
# Steps are counted over the server's life: the tests below run in order and are the only
# clients, so the step_raise falls inside the first test's requests and engine_die inside the
# second's (each request runs far more steps than the margins).
RESTART_FAULTS = "step_raise:40,engine_die:150"
EXIT_FAULTS = "engine_die:20"
FAULTS_INJECTED = []


class Client(threading.Thread):
    """One request in the background: a stream's events, or a plain response."""

    def __init__(self, server, stream: bool, max_tokens: int = 100) -> None:
        super().__init__(daemon=True)
        self.server, self.stream, self.max_tokens = server, stream, max_tokens
        self.status, self.events, self.body = None, [], None
        self.start()

    def run(self) -> None:
        body = {"prompt": "Count slowly:", "max_tokens": self.max_tokens, "ignore_eos": True,
                "stream": self.stream}
        with httpx.Client(base_url=self.server.url, headers=self.server.headers,
                          timeout=120) as http:
            if not self.stream:
                r = http.post("/v1/completions", json=body)
                self.status, self.body = r.status_code, r
                return
            with http.stream("POST", "/v1/completions", json=body) as r:
                self.status = r.status_code
                self.events = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]


def _assert_failed_with_5xx(clients: list[Client], reason: str) -> None:
    for c in clients:
        c.join(120)
        assert not c.is_alive(), "a request hangs after the fault"
        if c.stream:
            assert c.status == 200 and c.events[-1] == "[DONE]", c.events[-3:]
            err = json.loads(c.events[-2])["error"]
            assert err["type"] == "server_error" and err["code"] == 500, err
            assert reason in err["message"], err
            tokens = [json.loads(e) for e in c.events[:-2]]
            assert all(t["choices"][0]["finish_reason"] is None for t in tokens)
            assert 0 < len(tokens) < c.max_tokens       # it was cut mid-way, and said so
        else:
            err = assert_openai_error(c.body, None) if c.body.status_code < 500 else \
                c.body.json()["error"]
            assert c.body.status_code == 500 and err["type"] == "server_error", c.body.text
            assert reason in err["message"], err


class HealthWatch(threading.Thread):
    """Polls /health every 20 ms; `seen` is the sequence of distinct answers (or 'down')."""

    def __init__(self, server) -> None:
        super().__init__(daemon=True)
        self.server, self.seen, self.done = server, [], threading.Event()
        self.start()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                state = httpx.get(f"{self.server.url}/health", timeout=5).status_code
            except httpx.TransportError:
                state = "down"
            if not self.seen or self.seen[-1] != state:
                self.seen.append(state)
            time.sleep(0.02)

    def stop(self) -> list:
        self.done.set()
        self.join(10)
        return self.seen


@pytest.fixture(scope="module")
def restarting():
    srv = start_server("--on-engine-failure", "restart", "--max-model-len", "256",
                       "--debug-endpoints", "--metrics-public",
                       env={"EMBER_FAULT_INJECT": RESTART_FAULTS, "EMBER_API_KEY": KEY})
    srv.api_key = KEY                   # given through the environment, not the command line
    yield srv
    srv.stop(signal.SIGKILL)


def test_step_raise_fails_the_batch_and_serving_goes_on(restarting):
    assert "EMBER_FAULT_INJECT is set" in restarting.log()
    clients = [Client(restarting, True), Client(restarting, True), Client(restarting, False)]
    _assert_failed_with_5xx(clients, "injected fault step_raise")
    FAULTS_INJECTED.append("step_raise")
    assert httpx.get(f"{restarting.url}/health").status_code == 200
    m = restarting.metrics()
    assert m["ember:engine_step_errors_total"] == 1 and m["ember:engine_restarts_total"] == 0
    assert_allocator_idle(restarting)
    ok = Client(restarting, False, max_tokens=5)
    ok.join(60)
    assert ok.status == 200 and ok.body.json()["usage"]["completion_tokens"] == 5


def test_engine_death_restarts_the_engine(restarting):
    watch = HealthWatch(restarting)
    clients = [Client(restarting, True, 200), Client(restarting, True, 200),
               Client(restarting, False, 200)]
    _assert_failed_with_5xx(clients, "the engine died")
    FAULTS_INJECTED.append("engine_die")
    deadline = time.monotonic() + 60
    while watch.seen[-1] != 200 or 503 not in watch.seen:
        assert time.monotonic() < deadline, f"no recovery: /health went {watch.seen}"
        time.sleep(0.05)
    seen = watch.stop()
    assert seen[:3] == [200, 503, 200] and "down" not in seen, seen
    m = restarting.metrics()
    assert m["ember:engine_restarts_total"] == 1 and m["ember:engine_healthy"] == 1
    assert_allocator_idle(restarting)
    r = httpx.post(f"{restarting.url}/v1/completions", headers=restarting.headers, timeout=60,
                   json={"prompt": "The capital of France is", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and "Paris" in r.json()["choices"][0]["text"], r.text
    assert "the engine was restarted" in restarting.log()


def test_key_from_environment_guards_but_metrics_are_public(restarting):
    assert httpx.get(f"{restarting.url}/metrics").status_code == 200      # --metrics-public
    assert_openai_error(httpx.get(f"{restarting.url}/v1/models"), 401)
    assert_openai_error(httpx.get(f"{restarting.url}/debug/engine"), 401)
    cmdline = " ".join(psutil.Process(restarting.proc.pid).cmdline())
    assert KEY not in cmdline and KEY not in restarting.log()


def test_sigterm_after_a_restart_exits_cleanly(restarting):
    children = descendants(restarting.proc.pid)
    assert restarting.stop(signal.SIGTERM) == 0, restarting.log()[-3000:]
    assert_no_leftovers(restarting, children)


def test_engine_death_with_exit_policy_exits_nonzero():
    srv = start_server("--on-engine-failure", "exit", "--max-model-len", "256",
                       env={"EMBER_FAULT_INJECT": EXIT_FAULTS})
    try:
        children = descendants(srv.proc.pid)
        watch = HealthWatch(srv)
        clients = [Client(srv, True), Client(srv, True)]
        _assert_failed_with_5xx(clients, "the engine died")
        FAULTS_INJECTED.append("engine_die")
        rc = srv.proc.wait(30)
        seen = watch.stop()
    finally:
        srv.stop(signal.SIGKILL)
    _assert_exited_for_the_engine(srv, rc, seen, children, "exiting with status 3")
    print(f"\nfaults injected: {FAULTS_INJECTED}")


def test_engine_process_killed_fails_in_flight_and_exits():
    """The engine runs in its own process (ember/engine/process.py). If that process is killed,
    the requests in flight end with a 5xx, and the server, which has no engine left to restart
    even under --on-engine-failure restart, exits with EXIT_ENGINE_FAILED, leaving no process."""
    srv = start_server("--on-engine-failure", "restart", "--max-model-len", "256")
    try:
        children = descendants(srv.proc.pid)
        assert len(children) == 1, children            # the engine process
        watch = HealthWatch(srv)
        clients = [Client(srv, True, max_tokens=200), Client(srv, False, max_tokens=200)]
        deadline = time.monotonic() + 60
        while srv.metrics()["ember:num_requests_running"] < 2:
            assert time.monotonic() < deadline, "the requests never ran"
            time.sleep(0.05)
        children[0].kill()
        _assert_failed_with_5xx(clients, "the engine process died")
        rc = srv.proc.wait(30)
        seen = watch.stop()
    finally:
        srv.stop(signal.SIGKILL)
    _assert_exited_for_the_engine(srv, rc, seen, children, "could not be restarted")


def _assert_exited_for_the_engine(srv, rc: int, seen: list, children: list, said: str) -> None:
    """Exit status 3, /health healthy until the failure and never again, the reason in the log,
    and no process left behind."""
    assert rc == EXIT_ENGINE_FAILED, srv.log()[-3000:]
    assert seen[0] == 200 and 200 not in seen[1:] and seen[-1] == "down", seen
    assert said in srv.log()
    assert_no_leftovers(srv, children)
