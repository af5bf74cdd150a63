"""One small server shared by the fuzz, bad-input and security tests: an API key, the debug
endpoint, info-level logs (so that a leaked key would show), and short generations."""
from __future__ import annotations

import httpx
import pytest

from reliability_helpers import SMALL_KEY, start_server


@pytest.fixture(scope="session")
def small_server():
    srv = start_server("--max-model-len", "40", "--max-waiting", "2", "--max-num-seqs", "4",
                       "--debug-endpoints", "--log-level", "info", api_key=SMALL_KEY)
    srv.model = httpx.get(f"{srv.url}/v1/models", headers=srv.headers).json()["data"][0]["id"]
    yield srv
    assert srv.stop() == 0, srv.log()[-3000:]
    assert SMALL_KEY not in srv.log(), "the API key appears in the server log"
