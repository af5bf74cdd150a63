"""End-to-end fixtures: real `ember serve` processes on free loopback ports, default model.

One server for the whole session (most tests); test_limits.py starts its own small one with an
API key and a tiny waiting queue. Server logs go to a temp file that is printed if startup fails.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log_path: str
    api_key: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log(self) -> str:
        return Path(self.log_path).read_text(errors="replace")

    def metrics(self) -> dict[str, float]:
        """Unlabelled view of /metrics: series name (without labels) → value."""
        text = httpx.get(f"{self.url}/metrics", headers=self.headers, timeout=10).text
        out = {}
        for line in text.splitlines():
            m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$", line)
            if m and m.group(1) not in out:
                out[m.group(1)] = float(m.group(3))
        return out

    def wait_idle(self, timeout: float = 20.0) -> dict[str, float]:
        """Poll /metrics until nothing runs and no KV block is held; returns the last reading."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            idle = m["ember:num_requests_running"] == 0 and m["ember:kv_cache_usage_perc"] == 0
            if idle or time.monotonic() > deadline:
                return m
            time.sleep(0.1)

    def stop(self, sig=signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(*extra: str, api_key: str | None = None) -> Server:
    port = free_port()
    log = tempfile.NamedTemporaryFile("w", prefix="ember-serve-", suffix=".log", delete=False)
    cmd = [sys.executable, "-m", "ember.cli", "serve", "--port", str(port), *extra]
    if api_key:
        cmd += ["--api-key", api_key]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = Server(proc, port, log.name, api_key)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"ember serve exited with {proc.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    server.stop(signal.SIGKILL)
    pytest.fail(f"ember serve did not become healthy in {STARTUP_TIMEOUT} s:\n{server.log()}")


@pytest.fixture(scope="session")
def server_factory():
    """start_server, for modules that need a server with other options."""
    return start_server


@pytest.fixture(scope="session")
def server():
    srv = start_server()
    yield srv
    rc = srv.stop()
    assert rc == 0, f"server exited with {rc} on SIGTERM:\n{srv.log()[-3000:]}"


@pytest.fixture(scope="session")
def client(server):
    import openai
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                         timeout=120)


@pytest.fixture(scope="session")
def model_name(client) -> str:
    return client.models.list().data[0].id

