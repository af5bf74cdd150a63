"""What the server does when the engine dies (`--on-engine-failure`).

Under `ember serve` the engine runs in a process of its own (ember/engine/process.py), stepping in
a thread there. A failing step only fails its batch; the engine *dies* when its thread ends
unexpectedly or it marks its own state broken, or when its whole process dies (then there is
nothing to restart, and the server exits as under `exit`).
Its requests in flight have then already received a 5xx error and /health answers 503. The
supervisor, an asyncio task of the server, notices within `POLL_S` and either

  restart  rebuilds the scheduler, block pool and prefix cache (the weights stay loaded) after a
           back-off (1 s, doubling, at most 30 s), and serves again; more than `max_restarts`
           restarts within `WINDOW_S` is a crash loop, and then it exits as below;
  exit     stops the server (in-flight responses are already failed) with exit status
           EXIT_ENGINE_FAILED, for a process supervisor (systemd, Kubernetes) to restart it.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Callable, TYPE_CHECKING

if TYPE_CHECKING:   # an EngineClient (ember/engine/process.py) serves the same calls
    from ember.engine.async_engine import AsyncLLMEngine


log = logging.getLogger("ember.server")

EXIT_ENGINE_FAILED = 3
POLICIES = ("restart", "exit")


class EngineSupervisor:
    POLL_S = 0.1
    WINDOW_S = 600.0
    BACKOFF_S, MAX_BACKOFF_S = 1.0, 30.0

    def __init__(self, engine: AsyncLLMEngine, policy: str, max_restarts: int,
                 stop_server: Callable[[int], None]) -> None:
        if policy not in POLICIES:
            raise ValueError(f"on_engine_failure must be one of {POLICIES}, got {policy!r}")
        self.engine, self.policy, self.max_restarts = engine, policy, max_restarts
        self.stop_server = stop_server
        self._recent: deque[float] = deque()     # times of restarts within WINDOW_S

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.POLL_S)
            if self.engine.failed and not await self._recover():
                return

    async def _recover(self) -> bool:
        """Handle one failure; False when the server is being stopped."""
        log.error("the engine failed (%r); --on-engine-failure=%s", self.engine.error, self.policy)
        now = time.monotonic()
        while self._recent and now - self._recent[0] > self.WINDOW_S:
            self._recent.popleft()
        if self.policy == "exit" or len(self._recent) >= self.max_restarts:
            if self.policy == "restart":
                log.error("%d engine restarts in %.0f s: giving up", len(self._recent),
                          self.WINDOW_S)
            self.stop_server(EXIT_ENGINE_FAILED)
            return False
        await asyncio.sleep(min(self.BACKOFF_S * 2 ** len(self._recent), self.MAX_BACKOFF_S))
        try:
            await asyncio.to_thread(self.engine.restart)
        except Exception:  # noqa: BLE001 — cannot restart: stop rather than serve 503s forever
            log.exception("the engine could not be restarted")
            self.stop_server(EXIT_ENGINE_FAILED)
            return False
        self._recent.append(time.monotonic())
        log.warning("the engine was restarted (%d in the last %.0f s)", len(self._recent),
                    self.WINDOW_S)
        return True
