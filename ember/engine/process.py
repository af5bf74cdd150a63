"""The engine in a process of its own, and the client the HTTP server drives it through.

`ember serve` forks before it imports anything heavy. The child imports torch, loads the model and
runs an AsyncLLMEngine (its step thread). Meanwhile the parent imports FastAPI, loads the
tokenizer and builds the app. On this 2-core machine that takes FastAPI's import (0.3-0.45 s)
and the tokenizer's (0.1 s, which held the GIL the engine's load needed) off the path to the first
token, as vLLM's engine core process does; and HTTP parsing and SSE framing no longer take the
engine process's GIL.

The two talk over a pipe (multiprocessing.Connection; each send is one pickled list of messages):

  front end -> engine   ("add", call_id, [(request_id, prompt_ids, params), ...])
                        ("cancel", call_id)       the caller left: abort what is unfinished
                        ("abort_all", reason)     ("call", call_id, fn)     ("restart", call_id)
                        ("shutdown",)
  engine -> front end   ("ready", EngineInfo) or ("load_failed", error), once; then
                        ("started", call_id)      the requests are queued (or ("error", ...))
                        ("output", call_id, RequestDelta)    ("end", call_id)
                        ("error", call_id, exception)        ("result", call_id, value)
                        ("state", EngineState)    after anything that changed it

Prompts are tokenized and checked in the front end, with the engine's own checks
(ember/engine/interface.py). Text is made there too, as vLLM does: the engine runs
LLMEngine(detokenize=False), whose steps give RequestDeltas (each sequence's new token id, its
logprobs as ids, how it ended), and the front end detokenizes them into the RequestOutputs an
in-process engine gives (output_processor.RemoteRequest). So the engine process loads no
tokenizer (reading it held the GIL 0.1 s, which the first request after a start waited for), its
steps skip detokenization (~25 us per sequence), and a step's message is a few KB. Only a request
with stop strings makes the engine load the tokenizer, to stop the sequence on the step that
completes one; the front end then finds the same string in the same text, and cuts it there.
Outputs are batched: one send per engine step, not one per request.

The engine process ignores SIGINT and SIGTERM: the front end drains its requests first, then
sends "shutdown". It exits when the pipe closes, so it never outlives the front end. If it dies,
every request in flight fails with EngineError, `failed` turns true, and `restart()` refuses
(there is no engine left to restart): the server's supervisor then stops the server.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import pickle
import signal
import sys
import threading
from concurrent.futures import Future
from contextlib import suppress
from dataclasses import dataclass, field
from typing import AsyncIterator, Sequence

from ember import startup_gc
from ember.engine.interface import (EngineError, EngineSnapshot, EngineStopped, FaultInjector,
                                    tokenize_prompt, validate_prompt)
from ember.engine.output_processor import RemoteRequest
from ember.models.source import resolve_model
from ember.outputs import RequestOutput
from ember.sampling_params import SamplingParams
from ember.tokenizer import Tokenizer

log = logging.getLogger("ember")


@dataclass(frozen=True)
class EngineInfo:
    """What the front end learns of the loaded engine."""
    model_name: str
    max_model_len: int
    vocab_size: int
    summary: str


@dataclass(frozen=True)
class EngineState:
    snapshot: EngineSnapshot = field(default_factory=EngineSnapshot)
    num_waiting: int = 0               # includes requests posted but not yet scheduled
    healthy: bool = True
    failed: bool = False
    error: str | None = None           # repr of what broke the engine


def _portable(e: BaseException) -> BaseException:
    """e itself if it crosses the pipe intact, else an EngineError that says what it was."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001 — any pickling failure
        return EngineError(repr(e))


# ---- the engine process -------------------------------------------------------------------------

def _engine_main(conn, front_end_conn, model: str | None, options: dict) -> None:
    front_end_conn.close()                   # so that the pipe closes when the front end exits
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)   # the front end decides when we stop: it drains first
    try:
        from ember.engine.async_engine import AsyncLLMEngine
        from ember.engine.llm_engine import LLMEngine
        faults = FaultInjector.from_env()    # test-only; None unless EMBER_FAULT_INJECT is set
        engine = AsyncLLMEngine(LLMEngine(model, detokenize=False, **options), faults)
    except BaseException as e:  # noqa: BLE001 — the front end reports it and exits
        conn.send([("load_failed", _portable(e))])
        return
    if faults is not None:
        print(f"ember: EMBER_FAULT_INJECT is set: faults will be injected at steps "
              f"{sorted(faults.plan.items())} (test only)", file=sys.stderr, flush=True)
    eng = engine.engine
    startup_gc.started()
    try:
        conn.send([("ready", EngineInfo(eng.source.name, engine.max_model_len, engine.vocab_size,
                                        eng.summary))])
        asyncio.run(_EngineServer(conn, engine).run())
    except OSError:                          # the front end left while we loaded
        pass
    finally:
        engine.shutdown()


class _EngineServer:
    """Runs the front end's commands on the AsyncLLMEngine. Outputs go back from the engine
    thread itself, one message per step (`_sink`), with no event loop between the step and the
    pipe; this process's event loop only reads commands and answers calls."""
    STATE_POLL_S = 0.1       # how soon a change without outputs (a failure, a restart) is sent

    def __init__(self, conn, engine) -> None:
        self.conn, self.engine = conn, engine
        self.streams: dict[int, object] = {}     # call id → its stream, until it ends
        self.send_lock = threading.RLock()       # the engine thread and the loop both send
        self.state: EngineState | None = None
        self.closed: asyncio.Future | None = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.loop, self.closed = loop, loop.create_future()
        loop.add_reader(self.conn.fileno(), self._on_readable)
        try:
            while not self.closed.done():
                self._send([])                   # the state, if it changed
                await asyncio.wait([self.closed], timeout=self.STATE_POLL_S)
        finally:
            loop.remove_reader(self.conn.fileno())

    def _on_readable(self) -> None:
        try:
            while self.conn.poll():
                for msg in self.conn.recv():
                    self._handle(msg)
        except (EOFError, OSError):          # the front end is gone
            self._close()

    def _close(self) -> None:
        if self.closed is not None and not self.closed.done():
            self.closed.set_result(None)

    def _handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "add":
            self._start(msg[1], msg[2])
        elif kind == "cancel":
            stream = self.streams.pop(msg[1], None)
            for rid in list(stream.unfinished) if stream is not None else ():
                self.engine.abort(rid)
        elif kind == "abort_all":
            self.engine.abort_all(msg[1])
        elif kind == "call":
            asyncio.ensure_future(self._reply(msg[1], self.engine.call(msg[2])))
        elif kind == "restart":
            asyncio.ensure_future(self._reply(msg[1], asyncio.to_thread(self.engine.restart)))
        elif kind == "shutdown":
            self._close()

    def _start(self, call_id: int, requests: list) -> None:
        # The engine thread may send the first outputs before "started": the front end takes
        # those as the start too.
        try:
            stream = self.engine.open_stream(
                [(rid, {"prompt_token_ids": ids}, sp) for rid, ids, sp in requests],
                self._sink, tag=call_id)
        except Exception as e:  # noqa: BLE001 — ValueError, EngineStopped: the caller gets it
            self._send([("error", call_id, _portable(e))])
            return
        self.streams[call_id] = stream
        self._send([("started", call_id)])

    def _sink(self, batch: list) -> None:
        """The engine thread's outputs (or a stream's ending error), sent at once."""
        msgs = []
        for stream, item in batch:
            call_id = stream.tag
            if isinstance(item, BaseException):
                msgs.append(("error", call_id, _portable(item)))
                self.streams.pop(call_id, None)
                continue
            msgs.append(("output", call_id, item))
            if item.finished:
                stream.unfinished.discard(item.request_id)
                if not stream.unfinished:
                    msgs.append(("end", call_id))
                    self.streams.pop(call_id, None)
        self._send(msgs)

    async def _reply(self, call_id: int, awaitable) -> None:
        try:
            value = await awaitable
            pickle.dumps(value)
            msg = ("result", call_id, value)
        except Exception as e:  # noqa: BLE001 — the caller gets it (a value that won't pickle too)
            msg = ("error", call_id, _portable(e))
        self._send([msg])

    def _send(self, msgs: list) -> None:
        """Send msgs, and the engine's state after them if it changed. Never raises: the engine
        thread calls this. The state is read before the lock (reading takes the engine's lock,
        which the engine thread may hold while it sends); so two threads may send theirs out of
        order, and the front end keeps the one of the latest snapshot."""
        state = self._state()
        with self.send_lock:
            if state != self.state:
                self.state = state
                msgs = [*msgs, ("state", state)]
            if not msgs:
                return
            try:
                self.conn.send(msgs)
            except (OSError, EOFError, ValueError):   # the front end is gone
                with suppress(RuntimeError):          # and so is this loop
                    self.loop.call_soon_threadsafe(self._close)

    def _state(self) -> EngineState:
        eng = self.engine
        return EngineState(eng.snapshot, eng.num_waiting(), eng.healthy, eng.failed,
                           None if eng.error is None else repr(eng.error))


# ---- the front end ------------------------------------------------------------------------------

class _Call:
    """Where the engine's answers to one call go: an asyncio queue on the caller's loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.queue = loop, asyncio.Queue()


class EngineProcess:
    """The engine process, from the front end's side: making one forks it at once; `connect`
    returns the EngineClient once the engine has loaded."""

    def __init__(self, model: str | None, options: dict) -> None:
        self.model = model
        ctx = multiprocessing.get_context("fork")    # before any thread or heavy import exists
        self.conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(target=_engine_main, args=(child_conn, self.conn, model, options),
                                   name="ember-engine")
        self.process.start()
        child_conn.close()

    def kill(self) -> None:
        """Stop a process that never connected (the front end failed while starting)."""
        self.process.kill()
        self.process.join()
        self.conn.close()

    def connect(self) -> "EngineClient":
        """Load the tokenizer (while the engine loads, when its cache is on disk), then wait for
        the engine. Raises what the engine's load raised."""
        source = resolve_model(self.model)
        tokenizer = Tokenizer.load(source) if Tokenizer.is_cached(source) else None
        try:
            (kind, payload), = self.conn.recv()
        except EOFError:
            self.process.join()
            raise EngineError(f"the engine process exited ({self.process.exitcode}) while "
                              f"loading") from None
        if kind == "load_failed":
            self.process.join()
            raise payload
        if tokenizer is None:                # first start: the engine wrote the cache by now
            tokenizer = Tokenizer.load(source)
        return EngineClient(self, payload, tokenizer)


class EngineClient:
    """The HTTP server's view of an engine in another process: the calls AsyncLLMEngine serves
    the server, over the pipe."""

    def __init__(self, process: EngineProcess, info: EngineInfo, tokenizer: Tokenizer) -> None:
        self._process, self._conn = process, process.conn
        self.info, self.tokenizer = info, tokenizer
        self._send_lock = threading.Lock()
        self._calls: dict[int, _Call] = {}
        self._restarts: dict[int, Future] = {}
        self._unacked: dict[int, int] = {}          # call id → sequences posted, not yet queued
        self._ids = itertools.count(1)              # next() is atomic: callers on two threads
        self._state = EngineState()
        self._closing = False
        self._dead: BaseException | None = None     # the engine process is gone
        self._reader = threading.Thread(target=self._read, name="ember-engine-pipe", daemon=True)
        self._reader.start()

    # -- what the server reads --
    model_name = property(lambda self: self.info.model_name)
    max_model_len = property(lambda self: self.info.max_model_len)
    vocab_size = property(lambda self: self.info.vocab_size)
    summary = property(lambda self: self.info.summary)
    snapshot = property(lambda self: self._state.snapshot)

    @property
    def healthy(self) -> bool:
        return self._dead is None and not self._closing and self._state.healthy

    @property
    def failed(self) -> bool:
        return not self._closing and (self._dead is not None or self._state.failed)

    @property
    def error(self) -> BaseException | None:
        if self._dead is not None:
            return self._dead
        return None if self._state.error is None else EngineError(self._state.error)

    def num_waiting(self) -> int:
        return self._state.num_waiting + sum(self._unacked.values())

    def tokenize_prompt(self, prompt) -> tuple[str | None, list[int]]:
        return tokenize_prompt(self.tokenizer.encode, self.vocab_size, prompt)

    # -- requests --
    async def add_requests(self, requests: Sequence[tuple[str, object, SamplingParams]]
                           ) -> AsyncIterator[RequestOutput]:
        """As AsyncLLMEngine.add_requests: raises ValueError or EngineStopped before anything
        runs; the iterator aborts what is unfinished when it is left early."""
        remote = {}
        for rid, prompt, sp in requests:
            text, ids = self.tokenize_prompt(prompt)
            validate_prompt(ids, sp, self.max_model_len)
            remote[rid] = RemoteRequest(rid, text, ids, sp, self.tokenizer)
        if not self.healthy:
            raise EngineStopped("the engine is not serving: "
                                + ("shutting down" if self._closing else repr(self.error)))
        call_id, call = self._open_call()
        self._unacked[call_id] = sum(sp.n for _, _, sp in requests)
        self._post(("add", call_id, [(rid, r.state.prompt_token_ids, sp)
                                     for (rid, _, sp), r in zip(requests, remote.values())]))
        first = await call.queue.get()
        if first[0] == "error":
            self._calls.pop(call_id, None)
            raise first[1]
        return self._iterate(call_id, call, remote, None if first[0] == "started" else first)

    async def _iterate(self, call_id: int, call: _Call, remote: dict[str, RemoteRequest],
                       first: tuple | None) -> AsyncIterator[RequestOutput]:
        """The call's RequestDeltas, detokenized here into cumulative RequestOutputs."""
        done = False
        try:
            while True:
                msg = first if first is not None else await call.queue.get()
                first = None
                if msg[0] == "started":
                    continue
                if msg[0] == "output":
                    yield remote[msg[1].request_id].apply(msg[1])
                elif msg[0] == "end":
                    done = True
                    return
                else:
                    done = True
                    raise msg[1]
        finally:
            self._calls.pop(call_id, None)
            if not done:
                self._post(("cancel", call_id))

    def abort_all(self, reason: str = "the server is shutting down") -> None:
        self._post(("abort_all", reason))

    async def call(self, fn):
        """fn(LLMEngine) on the engine's thread, in the engine process (fn must pickle)."""
        call_id, call = self._open_call()
        self._post(("call", call_id, fn))
        try:
            kind, value = await call.queue.get()
        finally:
            self._calls.pop(call_id, None)
        if kind == "error":
            raise value
        return value

    def restart(self, timeout: float = 60.0) -> None:
        """Blocking, as AsyncLLMEngine.restart: a fresh scheduler and KV state, same weights."""
        if self._dead is not None:
            raise EngineStopped(f"the engine process is gone ({self._dead}): nothing to restart")
        call_id = self._new_id()
        done = self._restarts[call_id] = Future()
        self._post(("restart", call_id))
        try:
            done.result(timeout)
        finally:
            self._restarts.pop(call_id, None)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine process (it aborts whatever is in flight). Idempotent."""
        if self._closing:
            return
        self._closing = True
        self._post(("shutdown",))
        proc = self._process.process
        proc.join(timeout)
        if proc.is_alive():
            log.error("the engine process did not stop within %.0f s: killing it", timeout)
            proc.kill()
            proc.join()
        self._conn.close()

    # -- the pipe --
    def _new_id(self) -> int:
        return next(self._ids)

    def _open_call(self) -> tuple[int, _Call]:
        call_id = self._new_id()
        call = self._calls[call_id] = _Call(asyncio.get_running_loop())
        return call_id, call

    def _post(self, msg: tuple) -> None:
        try:
            with self._send_lock:
                self._conn.send([msg])
        except (OSError, ValueError):     # the process is gone (or the pipe closed at shutdown)
            if msg[0] in ("add", "call"):
                self._deliver(msg[1], ("error", EngineStopped("the engine is not running")))

    def _read(self) -> None:
        try:
            while True:
                by_loop: dict[asyncio.AbstractEventLoop, list] = {}
                for msg in self._conn.recv():
                    target = self._dispatch(msg)
                    if target is not None:
                        call, item = target
                        by_loop.setdefault(call.loop, []).append((call.queue, item))
                for loop, items in by_loop.items():     # one wake-up per loop and batch
                    with suppress(RuntimeError):        # the caller's loop is closed
                        loop.call_soon_threadsafe(_put_all, items)
        except (EOFError, OSError):
            pass
        if not self._closing:
            code = self._process.process.exitcode
            self._dead = EngineError(f"the engine process died (exit code {code})")
            log.error("%s", self._dead)
        err = self._dead if self._dead is not None else EngineStopped("the engine stopped")
        for call_id in list(self._calls):
            self._deliver(call_id, ("error", err))
        for done in list(self._restarts.values()):
            done.set_exception(err)

    def _dispatch(self, msg: tuple) -> tuple[_Call, tuple] | None:
        """Apply one message; returns (call, item) when it is for a waiting caller."""
        kind = msg[0]
        if kind == "state":
            if msg[1].snapshot.version >= self._state.snapshot.version:
                self._state = msg[1]
            return None
        call_id = msg[1]
        if kind in ("started", "error"):
            self._unacked.pop(call_id, None)
        done = self._restarts.get(call_id)
        if done is not None:
            done.set_exception(msg[2]) if kind == "error" else done.set_result(None)
            return None
        call = self._calls.get(call_id)
        if call is None:
            return None                      # the caller left meanwhile
        return call, (kind, *msg[2:])

    def _deliver(self, call_id: int, item: tuple) -> None:
        call = self._calls.get(call_id)
        if call is not None:
            with suppress(RuntimeError):     # the caller's loop is closed: nobody listens
                call.loop.call_soon_threadsafe(call.queue.put_nowait, item)


def _put_all(items: list[tuple[asyncio.Queue, tuple]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)
