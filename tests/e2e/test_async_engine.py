"""AsyncLLMEngine's plumbing over a scripted stand-in engine (no weights, milliseconds):
streaming, validation before streaming, abort on leaving early, failure isolation, idling and
shutdown."""
from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest

from ember.engine.async_engine import AsyncLLMEngine, EngineError, EngineStopped
from ember.engine.llm_engine import EngineStats
from ember.outputs import CompletionOutput, RequestOutput
from ember.sampling_params import SamplingParams


class ScriptedEngine:
    """LLMEngine's surface: one token per request per step, text = the token ids as letters."""

    def __init__(self) -> None:
        self.config = SimpleNamespace(scheduler=SimpleNamespace(max_model_len=64))
        self.kv = SimpleNamespace(prefix_cache=None, usage=0.0, num_blocks=8,
                                  pool=SimpleNamespace(num_free=8))
        self.stats = EngineStats()
        self.scheduler = SimpleNamespace(running=[], waiting=[])
        self.requests: dict[str, tuple[SamplingParams, list[int]]] = {}
        self.states = self.requests
        self.aborted: list[str] = []
        self.fail_next_step = False
        self.polls = 0
        self.thread: threading.Thread | None = None

    def tokenize_prompt(self, prompt):
        ids = prompt["prompt_token_ids"] if isinstance(prompt, dict) else [1] * len(prompt)
        return None, list(ids)

    def validate(self, ids, params) -> None:
        if not ids:
            raise ValueError("the prompt is empty")

    def add_request(self, prompt, params, request_id):
        self.thread = threading.current_thread()
        self.requests[request_id] = (params, [])
        self.scheduler.running.append(request_id)

    def abort_request(self, request_id):
        if self.requests.pop(request_id, None) is not None:
            self.aborted.append(request_id)
            self.scheduler.running.remove(request_id)

    def has_unfinished_requests(self) -> bool:
        self.polls += 1
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        assert threading.current_thread() is self.thread, "engine used from two threads"
        time.sleep(0.002)
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("boom")
        outs = []
        for rid, (sp, tokens) in list(self.requests.items()):
            tokens.append(len(tokens))
            done = len(tokens) >= sp.max_tokens
            text = "".join(chr(97 + t % 26) for t in tokens)
            outs.append(RequestOutput(rid, None, [1], [CompletionOutput(
                0, text, list(tokens), None, None, "length" if done else None)], done))
            if done:
                del self.requests[rid]
                self.scheduler.running.remove(rid)
        return outs


@pytest.fixture
def engines():
    fake = ScriptedEngine()
    eng = AsyncLLMEngine(fake)
    yield fake, eng
    eng.shutdown()


async def _collect(eng, rid: str, n: int = 5) -> list[RequestOutput]:
    return [o async for o in eng.generate("hi", SamplingParams(max_tokens=n), rid)]


def test_streams_cumulative_outputs(engines):
    _, eng = engines
    outs = asyncio.run(_collect(eng, "a"))
    assert [o.outputs[0].text for o in outs] == ["a", "ab", "abc", "abcd", "abcde"]
    assert outs[-1].finished and not any(o.finished for o in outs[:-1])


def test_concurrent_requests_interleave(engines):
    _, eng = engines

    async def main():
        return await asyncio.gather(*(_collect(eng, f"r{i}", 3 + i) for i in range(8)))

    for i, outs in enumerate(asyncio.run(main())):
        assert len(outs) == 3 + i and outs[-1].finished


def test_validation_error_before_streaming(engines):
    fake, eng = engines

    async def main():
        with pytest.raises(ValueError, match="empty"):
            await eng.add_requests([("x", "", SamplingParams())])

    asyncio.run(main())
    assert "x" not in fake.requests and not fake.aborted


def test_leaving_early_aborts(engines):
    fake, eng = engines

    async def main():
        async for out in eng.generate("hi", SamplingParams(max_tokens=1000), "long"):
            if len(out.outputs[0].token_ids) == 3:
                break

    asyncio.run(main())
    deadline = time.monotonic() + 5
    while "long" not in fake.aborted and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fake.aborted == ["long"] and not fake.requests


def test_step_failure_fails_in_flight_and_keeps_serving(engines):
    fake, eng = engines

    async def main():
        stream = await eng.add_requests([("a", "hi", SamplingParams(max_tokens=1000)),
                                         ("b", "hi", SamplingParams(max_tokens=1000))])
        fake.fail_next_step = True
        with pytest.raises(EngineError, match="boom"):
            async for _ in stream:
                pass
        return await _collect(eng, "c", 3)

    outs = asyncio.run(main())
    assert outs[-1].finished and sorted(fake.aborted) == ["a", "b"]
    assert eng.healthy and eng.snapshot.step_errors == 1


def test_idle_engine_sleeps(engines):
    fake, eng = engines
    asyncio.run(_collect(eng, "a", 2))
    time.sleep(0.05)
    polls = fake.polls
    time.sleep(0.3)
    assert fake.polls - polls <= 2, "the engine thread spins while idle"


def test_shutdown_ends_streams_and_refuses_work(engines):
    _, eng = engines

    async def main():
        stream = await eng.add_requests([("a", "hi", SamplingParams(max_tokens=10 ** 6))])
        await stream.__anext__()
        eng.shutdown()
        with pytest.raises(EngineStopped):
            async for _ in stream:
                pass
        with pytest.raises(EngineStopped):
            await eng.add_requests([("b", "hi", SamplingParams())])

    asyncio.run(main())
    assert not eng.healthy


def test_snapshot_and_waiting_count(engines):
    _, eng = engines
    asyncio.run(_collect(eng, "a", 2))
    time.sleep(0.05)
    assert eng.num_waiting() == 0 and eng.snapshot.num_running == 0
