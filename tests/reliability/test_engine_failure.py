"""The failure plumbing of AsyncLLMEngine over the scripted stand-in engine of the e2e tests (no
weights, milliseconds): fault specs, a dying engine thread fails its requests and refuses new
work without hanging, and restart() serves again; shutdown() is final."""
from __future__ import annotations

import asyncio
import time

import pytest

from ember.engine.async_engine import AsyncLLMEngine, EngineError, EngineStopped, FaultInjector
from ember.sampling_params import SamplingParams
from reliability_helpers import load_test_module

ScriptedEngine = load_test_module("e2e/test_async_engine.py").ScriptedEngine


class RestartableEngine(ScriptedEngine):
    def __init__(self, faults: str) -> None:
        super().__init__()
        self.faults, self.resets = FaultInjector(faults), 0

    def step(self):
        self.faults()
        return super().step()

    def reset(self) -> None:
        self.requests.clear()
        self.scheduler.running.clear()
        self.resets += 1


@pytest.mark.parametrize("spec", ["boom:1", "step_raise:0", "step_raise:x", "engine_die"])
def test_bad_fault_specs_are_refused(spec):
    with pytest.raises(ValueError, match="EMBER_FAULT_INJECT"):
        FaultInjector(spec)


def test_fault_plan_fires_once_at_its_step():
    f = FaultInjector("step_raise:2, engine_die:4")
    f()
    with pytest.raises(RuntimeError, match="step_raise at step 2"):
        f()
    f()
    with pytest.raises(BaseException, match="engine_die at step 4"):
        f()
    f(), f()
    assert f.injected == [(2, "step_raise"), (4, "engine_die")] and not f.plan


def _wait(pred, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_death_fails_in_flight_refuses_work_and_restart_serves_again():
    fake = RestartableEngine("engine_die:3")
    eng = AsyncLLMEngine(fake)

    async def main():
        stream = await eng.add_requests([("a", "hi", SamplingParams(max_tokens=100))])
        with pytest.raises(EngineError, match="the engine died") as exc:
            async for _ in stream:
                pass
        assert not isinstance(exc.value, EngineStopped)       # a 500, not a 503
        _wait(lambda: eng.failed)
        assert not eng.healthy
        with pytest.raises(EngineStopped):
            await eng.add_requests([("b", "hi", SamplingParams(max_tokens=2))])
        with pytest.raises(EngineStopped):                     # posted straight: no hang
            await asyncio.wait_for(eng.call(lambda e: 1), 5)
        await asyncio.to_thread(eng.restart)
        assert eng.healthy and not eng.failed and fake.resets == 1
        assert eng.snapshot.restarts == 1
        outs = [o async for o in eng.generate("hi", SamplingParams(max_tokens=3), "c")]
        assert outs[-1].finished
        assert await eng.call(lambda e: len(e.requests)) == 0

    try:
        asyncio.run(main())
    finally:
        eng.shutdown()
    assert not eng.failed and not eng.healthy
    with pytest.raises(EngineStopped):
        eng.restart()
