"""Helpers for the reliability tests: real `ember serve` processes (the e2e suite's start_server,
loaded from its file under another module name) with extra environment, and checks shared by the
fuzz, soak and fault tests. A plain module, not a conftest: `import conftest` would be ambiguous.

Each test module starts the servers it needs (a few seconds each); generation is kept short by
a small --max-model-len so that every case stays fast on a 2-core CPU.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import time
from pathlib import Path

import httpx
import psutil

TESTS = Path(__file__).resolve().parents[1]


def load_test_module(relative: str):
    """A module of the test tree by path, under a name of its own (once per session)."""
    name = "ember_tests_" + relative.replace("/", "_").removesuffix(".py")
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, TESTS / relative)
        sys.modules[name] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[name]


e2e = load_test_module("e2e/conftest.py")

ERROR_KEYS = {"message", "type", "param", "code"}
SMALL_KEY = "small-key-5f1c0e-do-not-log"      # the shared small server's API key (conftest.py)


def start_server(*args: str, env: dict[str, str] | None = None, api_key: str | None = None):
    """e2e.start_server with extra environment variables for the server process."""
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        return e2e.start_server(*args, api_key=api_key)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def assert_openai_error(r: httpx.Response, status: int | None = None) -> dict:
    """An error in OpenAI's shape; status None: any 4xx."""
    if status is None:
        assert 400 <= r.status_code < 500, (r.status_code, r.text[:500])
    else:
        assert r.status_code == status, (r.status_code, r.text[:500])
    err = r.json()["error"]
    assert set(err) == ERROR_KEYS and isinstance(err["message"], str) and err["message"], err
    return err


def debug_engine(server) -> dict:
    r = httpx.get(f"{server.url}/debug/engine", headers=server.headers, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def assert_allocator_idle(server, timeout: float = 30.0) -> dict:
    """Wait until the engine holds no request, then check the allocator on the engine thread:
    integrity holds, no block table is left, every block is free or cached-but-unreferenced."""
    deadline = time.monotonic() + timeout
    while True:
        state = debug_engine(server)
        if state["requests"] == 0 and state["kv_blocks"]["held"] == 0:
            break
        assert time.monotonic() < deadline, f"the engine did not drain: {state}"
        time.sleep(0.1)
    blocks = state["kv_blocks"]
    assert state["integrity"] == "ok", state
    assert state["running"] == state["waiting"] == state["block_tables"] == 0, state
    assert blocks["free"] + blocks["cached"] == blocks["total"], state
    m = server.metrics()
    assert m["ember:kv_blocks_held"] == 0 and m["ember:engine_tracked_requests"] == 0, m
    assert m["ember:num_requests_running"] == m["ember:num_requests_waiting"] == 0, m
    return state


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def assert_no_leftovers(server, children: list[psutil.Process]) -> None:
    """After the server exited: it was reaped, and none of its children survive (nor zombies)."""
    assert server.proc.poll() is not None
    with contextlib.suppress(psutil.NoSuchProcess):
        me = psutil.Process()
        assert server.proc.pid not in [c.pid for c in me.children()], "the server is a zombie"
    deadline = time.monotonic() + 10
    alive = [c for c in children if c.is_running()]
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [c for c in alive if c.is_running()]
    assert not alive, f"child processes outlived the server: {alive}"
    orphans = [p for p in psutil.process_iter(["ppid", "cmdline"])
               if p.info["ppid"] == server.proc.pid]
    assert not orphans, orphans
