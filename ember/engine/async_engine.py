"""Asyncio front end for LLMEngine: the engine loop runs in its own thread.

LLMEngine is not thread-safe, so after construction only the engine thread touches its mutable
state. Callers post commands (add, abort) to a list that the thread drains between steps; outputs
go back through `loop.call_soon_threadsafe` (one call per step and event loop, not per token) into
one asyncio.Queue per stream. Tokenizing and validating a prompt only read the tokenizer and the
frozen config, so callers do that in their own thread and get ValueError before anything streams.
torch releases the GIL inside its ops, so the HTTP event loop keeps serving while a step runs.
The thread sleeps on a condition variable when there is nothing to do.

Failures: a step that raises fails the requests in that batch and the loop goes on. If the thread
itself dies (anything that escapes the loop), every request in flight gets an EngineError, new
work is refused (EngineStopped), `failed` turns true, and `restart()` brings the engine back with
fresh scheduler/KV state and the same weights; the server decides whether to (ember/server/
supervisor.py). Under `ember serve` this runs in the engine process (ember/engine/process.py).

Fault injection, for tests only: EMBER_FAULT_INJECT="step_raise:N,engine_die:M" makes the N-th
scheduled step raise mid-step (after scheduling, before the model runs), and kills the engine
thread at the M-th step. Steps are counted from the start of the process, across restarts.
"""
from __future__ import annotations

import asyncio
import logging
import sys
import threading
import dataclasses
from typing import AsyncIterator, Callable, Sequence

from ember import platforms
from ember.engine.interface import (EngineError, EngineSnapshot, EngineStopped,  # noqa: F401
                                    EngineThreadKilled, FaultInjector, InjectedFault)
from ember.engine.llm_engine import LLMEngine
from ember.outputs import RequestOutput
from ember.sampling_params import SamplingParams

log = logging.getLogger("ember")
_DEFAULT_SWITCH_INTERVAL = 0.005      # Python's own


class _Stream:
    """Where the outputs of one caller's requests go (several requests may share one): a queue on
    the caller's event loop, or a `sink` the engine thread calls itself (see `open_stream`)."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None, request_ids: Sequence[str],
                 sink: Callable[[list], None] | None = None, tag=None) -> None:
        self.loop, self.sink, self.tag = loop, sink, tag
        self.queue: asyncio.Queue | None = asyncio.Queue() if sink is None else None
        self.unfinished = set(request_ids)


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, faults: FaultInjector | None = None) -> None:
        self.engine = engine
        if faults is not None:
            engine.fault_hook = faults
        self._cv = threading.Condition()
        self._commands: list[tuple] = []             # guarded by _cv
        self._pending_waiting = 0                    # sequences posted but not yet in the scheduler
        self._stopping = False                       # the current thread is asked to stop
        self._closed = False                         # shutdown() was called: no restart
        self._accepting = False                      # a thread drains _commands (guarded by _cv)
        self._owners: dict[str, _Stream] = {}        # engine thread only
        self._step_errors = 0
        self._restarts = 0
        self.error: BaseException | None = None      # set when the engine can no longer serve
        self.snapshot = EngineSnapshot()
        platforms.release_host_threads()             # the engine thread computes from now on
        _shorten_gil_switch_interval()
        self._start_thread()

    @classmethod
    def from_options(cls, model: str | None = None, **options) -> "AsyncLLMEngine":
        return cls(LLMEngine(model, **options))

    # ---- caller side (any thread; streams belong to the caller's event loop) ------------------

    @property
    def healthy(self) -> bool:
        return self._thread.is_alive() and not self._stopping and self.error is None

    @property
    def failed(self) -> bool:
        """The engine cannot serve and was not asked to stop: its thread died or it marked its
        state broken. `restart()` may bring it back."""
        return not self._closed and not self._stopping and (
            self.error is not None or not self._thread.is_alive())

    # What the server reads of the engine (ember/engine/process.py's EngineClient has the same).
    @property
    def max_model_len(self) -> int:
        return self.engine.config.scheduler.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.config.model_config.vocab_size

    @property
    def model_name(self) -> str:
        return self.engine.source.name

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def tokenize_prompt(self, prompt) -> tuple[str | None, list[int]]:
        return self.engine.tokenize_prompt(prompt)

    def num_waiting(self) -> int:
        """Sequences waiting to be scheduled, including those posted since the last step."""
        with self._cv:
            return self.snapshot.num_waiting + self._pending_waiting

    def prepare(self, prompt, params: SamplingParams) -> list[int]:
        """Tokenize and validate; raises ValueError. Reads only immutable engine state."""
        _, ids = self.engine.tokenize_prompt(prompt)
        self.engine.validate(ids, params)
        return ids

    async def add_requests(self, requests: Sequence[tuple[str, object, SamplingParams]]
                           ) -> AsyncIterator[RequestOutput]:
        """Validate every (request_id, prompt, params), then start them all at once.

        Raises ValueError (bad input) or EngineStopped before anything runs. Returns an async
        iterator of cumulative RequestOutputs of all the requests, interleaved, that ends when
        all have finished; leaving it early (break, cancellation) aborts the unfinished ones.
        """
        stream = self._open(requests, asyncio.get_running_loop())
        return self._iterate(stream)

    def open_stream(self, requests: Sequence[tuple[str, object, SamplingParams]],
                    sink: Callable[[list], None], tag=None) -> _Stream:
        """add_requests for a caller without an event loop (the engine process's pipe): the same
        checks, then `sink(list of (stream, item))` is called with the outputs, on the engine
        thread (a refusal, on the caller's), with no event loop in between. An item is what
        the engine's step gives (a cumulative RequestOutput, or a RequestDelta from an engine
        that does not detokenize) or the exception that ended the stream; the sink keeps
        `stream.unfinished` (abort those to leave early)."""
        return self._open(requests, None, sink, tag)

    def _open(self, requests, loop, sink=None, tag=None) -> _Stream:
        prepared = [(rid, self.prepare(prompt, sp), sp) for rid, prompt, sp in requests]
        if not self.healthy:
            raise EngineStopped("the engine is not serving: "
                                + ("shutting down" if self._stopping else repr(self.error)))
        stream = _Stream(loop, [rid for rid, _, _ in prepared], sink, tag)
        self._post([("add", rid, ids, sp, stream) for rid, ids, sp in prepared],
                   waiting=sum(sp.n for _, _, sp in prepared))
        return stream

    async def generate(self, prompt, params: SamplingParams, request_id: str
                       ) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs of one request (vLLM's AsyncLLMEngine.generate)."""
        stream = await self.add_requests([(request_id, prompt, params)])
        try:
            async for out in stream:
                yield out
        finally:
            await stream.aclose()            # aborts the request if the caller left early

    def abort(self, request_id: str) -> None:
        self._post([("abort", request_id)])

    def abort_all(self, reason: str = "the server is shutting down") -> None:
        """End every request in flight; their streams raise EngineStopped(reason)."""
        self._post([("abort_all", reason)])

    def shutdown(self, timeout: float = 10.0) -> None:
        """Abort everything in flight and stop the engine thread. Idempotent."""
        with self._cv:
            self._stopping = self._closed = True
            self._cv.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def restart(self, timeout: float = 30.0) -> None:
        """After a failure: stop the engine thread if it still runs (its requests get
        EngineStopped), drop every request and all scheduler/KV state, keep the loaded weights,
        and start a fresh thread. Blocking; call it from a worker thread, not the event loop."""
        with self._cv:
            if self._closed:
                raise EngineStopped("the engine was shut down")
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise EngineError(f"the engine thread did not stop within {timeout} s")
        self.engine.reset()
        platforms.release_host_threads()
        with self._cv:
            if self._closed:
                raise EngineStopped("the engine was shut down")
            self._owners, self._pending_waiting, self.error = {}, 0, None
            self._restarts += 1
            self._publish(0)                 # no thread runs yet: the fresh state is ours
            self._stopping = False
            self._start_thread()

    def _start_thread(self) -> None:
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name="ember-engine", daemon=True)
        self._thread.start()

    async def call(self, fn):
        """fn(LLMEngine) run on the engine thread between steps (LLMEngine is not thread-safe);
        returns its result or raises what it raised. Raises EngineStopped if nothing runs it."""
        stream = _Stream(asyncio.get_running_loop(), ["call"])
        self._post([("call", fn, stream)])
        item = await stream.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item[0]

    async def _iterate(self, stream: _Stream) -> AsyncIterator[RequestOutput]:
        try:
            while stream.unfinished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    stream.unfinished.discard(item.request_id)
                yield item
        finally:
            for rid in list(stream.unfinished):
                self.abort(rid)

    def _post(self, commands: list[tuple], waiting: int = 0) -> None:
        with self._cv:
            if not self._accepting:          # no thread will run them: refuse, never hang
                self._deliver(_refusals(commands, EngineStopped("the engine is not running")))
                return
            self._commands.extend(commands)
            self._pending_waiting += waiting
            self._cv.notify()

    # ---- engine thread -------------------------------------------------------------------------

    def _run(self) -> None:
        died = None
        try:
            while True:
                with self._cv:
                    while not (self._commands or self._stopping
                               or self.engine.has_unfinished_requests()):
                        self._cv.wait()
                    commands, self._commands = self._commands, []
                    if self._stopping:
                        self._deliver(_refusals(commands, EngineStopped(
                            "the engine is shutting down")))
                        break
                applied = self._apply(commands)
                results = self._step() if self.engine.has_unfinished_requests() else []
                try:
                    self._publish(applied)   # first, so that whoever gets a result sees its state
                finally:
                    self._deliver(results)
        except BaseException as e:  # noqa: BLE001 — a dead loop must not hang its callers
            log.error("the engine thread died", exc_info=e)
            died = self.error = e
        with self._cv:                       # from here on _post refuses instead of queueing
            self._accepting = False
            commands, self._commands = self._commands, []
        self._deliver(_refusals(commands, EngineStopped("the engine stopped")))
        self._fail_all(EngineStopped("the engine stopped") if died is None else
                       EngineError(f"the engine died while running this request: {died!r}"))
        try:
            self._publish(0)
        except Exception:  # noqa: BLE001 — state may be broken; the old snapshot stays
            log.exception("could not publish the engine state after it stopped")

    def _apply(self, commands: list[tuple]) -> int:
        """Run posted commands in order; returns the waiting sequences they added."""
        added, failed = 0, []
        for cmd in commands:
            if cmd[0] == "abort":
                self._owners.pop(cmd[1], None)
                self.engine.abort_request(cmd[1])
                continue
            if cmd[0] == "abort_all":
                self._fail_all(EngineStopped(cmd[1]))
                continue
            if cmd[0] == "call":
                try:
                    failed.append((cmd[2], (cmd[1](self.engine),)))
                except Exception as e:  # noqa: BLE001 — the caller gets it
                    failed.append((cmd[2], e))
                continue
            _, rid, ids, sp, stream = cmd
            added += sp.n
            try:
                self.engine.add_request({"prompt_token_ids": ids}, sp, rid)
                self._owners[rid] = stream
            except Exception as e:  # noqa: BLE001 — e.g. a request id already in use
                failed.append((stream, e))
        self._deliver(failed)
        return added

    def _step(self) -> list[tuple[_Stream, object]]:
        """One engine step; returns what to deliver to whom."""
        try:
            outputs = self.engine.step()
        except Exception as e:  # noqa: BLE001 — fail the batch, keep serving the next one
            log.exception("engine step failed; failing %d in-flight request(s)", len(self._owners))
            self._step_errors += 1
            return self._fail_all_results(
                EngineError(f"the engine failed while running this request: {e!r}"))
        items = []
        for out in outputs:
            stream = self._owners.get(out.request_id)
            if stream is None:
                continue                     # aborted by its caller meanwhile
            if out.finished:
                del self._owners[out.request_id]
            items.append((stream, out))
        return items

    def _fail_all(self, error: BaseException) -> None:
        self._deliver(self._fail_all_results(error))

    def _fail_all_results(self, error: BaseException) -> list[tuple[_Stream, object]]:
        owners, self._owners = self._owners, {}
        for rid in owners:
            try:
                self.engine.abort_request(rid)
            except Exception as e:  # noqa: BLE001 — state is broken: stop taking work
                log.exception("abort after a failed step failed; marking the engine unhealthy")
                self.error = e
        return [(stream, error) for stream in owners.values()]

    def _deliver(self, items: list[tuple[_Stream, object]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        by_sink: dict[Callable, list] = {}
        for stream, item in items:
            if stream.sink is not None:
                by_sink.setdefault(stream.sink, []).append((stream, item))
            else:
                by_loop.setdefault(stream.loop, []).append((stream.queue, item))
        for sink, batch in by_sink.items():
            sink(batch)
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:             # the caller's loop is closed: nobody listens
                pass

    def _publish(self, applied_waiting: int) -> None:
        eng = self.engine
        pc = eng.kv.prefix_cache
        snap = EngineSnapshot(
            num_running=len(eng.scheduler.running), num_waiting=len(eng.scheduler.waiting),
            kv_cache_usage=eng.kv.usage,
            prefix_cache_hits=pc.hit_tokens if pc else 0,
            prefix_cache_queries=pc.queried_tokens if pc else 0,
            step_errors=self._step_errors, restarts=self._restarts,
            tracked_requests=len(eng.states), kv_blocks_total=eng.kv.num_blocks,
            kv_blocks_free=eng.kv.pool.num_free, kv_blocks_cached=pc.num_evictable if pc else 0,
            stats=dataclasses.replace(eng.stats), version=self.snapshot.version + 1)
        with self._cv:
            self.snapshot = snap
            self._pending_waiting -= applied_waiting


def _shorten_gil_switch_interval() -> None:
    """The engine thread takes the GIL back after every kernel call, and between steps it runs
    the scheduler and sampler in Python while the event loop streams the last step's outputs.
    At Python's default 5 ms switch interval it can wait that long for each handover, with the
    whole OpenMP team idle; 0.2 ms cut W1's median decode step from 68-69 to 63-66 ms. Only when
    nobody changed the default."""
    if sys.getswitchinterval() == _DEFAULT_SWITCH_INTERVAL:
        sys.setswitchinterval(0.0002)


def _refusals(commands: list[tuple], error: BaseException) -> list[tuple[_Stream, object]]:
    """The error for each command that has a caller waiting on it (add, call)."""
    return [(c[-1], error) for c in commands if c[0] in ("add", "call")]


def _put_all(batch: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, item in batch:
        queue.put_nowait(item)
