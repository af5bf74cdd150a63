"""Soak: many concurrent clients for EMBER_SOAK_SECONDS (default 60) against a server with a
small KV cache (so preemption and prefix-cache eviction happen), mixing completions and chat,
streaming and not, n = 1 and 2, stop strings, seeds; some clients disconnect mid-stream, some
give up on a timeout (the server aborts both).

Every request that was not given up must end with a complete answer (each choice has a
finish_reason and as many tokens as usage says; "length" means exactly max_tokens) or a clear
error (503 + Retry-After, OpenAI's shape); a greedy probe must still say "Paris" in the crowd.
Afterwards the allocator is all free (checked on the engine thread), and the server's RSS grew
by less than RSS_GROWTH_BOUND between the end of warm-up and the end. Then SIGKILL leaves no
process behind.
"""
from __future__ import annotations

import asyncio
import collections
import json
import os
import random
import signal
import time

import httpx
import psutil
import pytest

from reliability_helpers import (assert_allocator_idle, assert_no_leftovers, descendants,
                                 start_server)

SECONDS = float(os.environ.get("EMBER_SOAK_SECONDS", "60"))
CLIENTS = int(os.environ.get("EMBER_SOAK_CLIENTS", "12"))
WARMUP = min(15.0, SECONDS / 4)                # RSS is measured from here to the end
RSS_GROWTH_BOUND = 64 << 20                    # bytes, warm-up → end
PREFIX = ("You are a careful assistant. Answer briefly and stay on topic. Here are some notes "
          "about the history of bridges, canals, lighthouses and harbours in old port towns. ")
QUESTIONS = ["Tell me about bridges.", "What is a canal?", "Describe a lighthouse.",
             "Why do harbours silt up?", "Name a famous port.", "Count to five."]


@pytest.fixture(scope="module")
def soak_server():
    srv = start_server("--max-model-len", "256", "--max-num-seqs", "16", "--max-waiting", "64",
                       "--kv-cache-memory", "12MB", "--debug-endpoints")
    yield srv
    srv.stop(signal.SIGKILL)


class Tally:
    def __init__(self) -> None:
        self.counts: collections.Counter = collections.Counter()
        self.lost: list[str] = []

    def fail(self, what: str) -> None:
        self.counts["lost"] += 1
        self.lost.append(what[:500])


def _request(rng: random.Random, i: int) -> tuple[str, dict, str]:
    """(path, body, action) for the i-th request of a client."""
    if rng.random() < 0.05:
        return "/v1/completions", {"prompt": "The capital of France is", "max_tokens": 3,
                                   "temperature": 0, "logprobs": 0}, "probe"
    chat, stream = rng.random() < 0.5, rng.random() < 0.5
    body = {"max_tokens": rng.randint(1, 32), "n": 2 if rng.random() < 0.2 else 1,
            "temperature": rng.choice([0.0, 0.7, 1.0]), "stream": stream}
    if rng.random() < 0.3:
        body["seed"] = rng.randrange(1 << 31)
    if rng.random() < 0.2:
        body["stop"] = rng.choice([["\n\n"], ["."], [" the", "!"]])
    question = f"{rng.choice(QUESTIONS)} (request {i})"
    if chat:
        body.update(messages=[{"role": "system", "content": PREFIX},
                              {"role": "user", "content": question}], logprobs=True)
    else:
        body.update(prompt=PREFIX + question, logprobs=0)
    if stream:
        body["stream_options"] = {"include_usage": True}
    roll = rng.random()
    action = ("disconnect" if stream and roll < 0.15 else
              "timeout" if not stream and roll < 0.15 else "complete")
    return "/v1/chat/completions" if chat else "/v1/completions", body, action


def _choice_tokens(choice: dict, chat: bool) -> int:
    lp = choice.get("logprobs")
    if lp is None:
        return 0
    return len(lp["content"]) if chat else len(lp["tokens"])


def _check_choices(finals: dict[int, tuple[str, int]], usage: dict, body: dict) -> str | None:
    """finals: choice index → (finish_reason, tokens). None when consistent, else why not."""
    n, limit = body.get("n", 1), body["max_tokens"]
    if sorted(finals) != list(range(n)):
        return f"choices {sorted(finals)} for n={n}"
    for reason, tokens in finals.values():
        if reason not in ("stop", "length"):
            return f"finish_reason {reason!r}"
        if not 1 <= tokens <= limit or (reason == "length" and tokens != limit):
            return f"{tokens} tokens with finish_reason {reason} and max_tokens {limit}"
    if usage is None or usage["completion_tokens"] != sum(t for _, t in finals.values()):
        return f"usage {usage} disagrees with the choices {finals}"
    if usage["total_tokens"] != usage["prompt_tokens"] + usage["completion_tokens"]:
        return f"usage totals {usage}"
    return None


def _check_plain(path: str, body: dict, data: dict) -> str | None:
    chat = "chat" in path
    finals = {c["index"]: (c["finish_reason"], _choice_tokens(c, chat)) for c in data["choices"]}
    return _check_choices(finals, data["usage"], body)


def _check_stream(path: str, body: dict, events: list[str]) -> str | None:
    chat = "chat" in path
    if not events or events[-1] != "[DONE]":
        return f"stream did not end with [DONE]: {events[-2:]}"
    chunks = [json.loads(e) for e in events[:-1]]
    if any("error" in c for c in chunks):
        return f"error event: {chunks[-1]}"
    if len({c["id"] for c in chunks}) != 1:
        return "chunks of one stream carry different ids"
    tokens, finals = collections.Counter(), {}
    for c in chunks:
        for ch in c["choices"]:
            if ch["index"] in finals:
                return f"choice {ch['index']} continued after its finish_reason"
            tokens[ch["index"]] += _choice_tokens(ch, chat)
            if ch["finish_reason"] is not None:
                finals[ch["index"]] = (ch["finish_reason"], tokens[ch["index"]])
    return _check_choices(finals, chunks[-1]["usage"], body)


async def _one(http: httpx.AsyncClient, rng: random.Random, i: int, tally: Tally) -> None:
    path, body, action = _request(rng, i)
    tally.counts["sent"] += 1
    tally.counts[action] += 1
    try:
        if body.get("stream"):
            async with http.stream("POST", path, json=body) as r:
                if r.status_code != 200:
                    return _check_error(r.status_code, await r.aread(), r.headers, tally)
                events, cut = [], rng.randint(1, 8)
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                    if action == "disconnect" and len(events) >= cut:
                        return                 # leaving the block closes the connection
            why = _check_stream(path, body, events)
        else:
            timeout = rng.uniform(0.05, 1.0) if action == "timeout" else 300
            r = await http.post(path, json=body, timeout=timeout)
            if r.status_code != 200:
                return _check_error(r.status_code, r.content, r.headers, tally)
            data = r.json()
            why = _check_plain(path, body, data)
            if why is None and action == "probe" and "Paris" not in data["choices"][0]["text"]:
                why = f"the greedy probe answered {data['choices'][0]['text']!r}"
    except httpx.TimeoutException:
        if action == "timeout":
            tally.counts["timed_out"] += 1
            return
        return tally.fail(f"{path} timed out: {body}")
    except httpx.HTTPError as e:
        return tally.fail(f"{path} transport error {e!r}: {body}")
    if why is None:
        tally.counts["completed"] += 1
    else:
        tally.fail(f"{path} {why}: {body}")


def _check_error(status: int, content: bytes, headers, tally: Tally) -> None:
    try:
        err = json.loads(content)["error"]
    except (ValueError, KeyError):
        return tally.fail(f"error {status} not in OpenAI's shape: {content[:200]!r}")
    if status == 503 and headers.get("retry-after") and err["message"]:
        tally.counts["overloaded_503"] += 1
    else:
        tally.fail(f"error {status}: {err}")


async def _client(base: str, seed: int, deadline: float, tally: Tally) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=base, timeout=300) as http:
        i = 0
        while time.monotonic() < deadline:
            await _one(http, rng, i, tally)
            i += 1


async def _soak(server, tally: Tally, rss: dict) -> None:
    proc = psutil.Process(server.proc.pid)
    start = time.monotonic()
    clients = asyncio.gather(*(_client(server.url, 1000 + k, start + SECONDS, tally)
                               for k in range(CLIENTS)))
    while not clients.done():
        await asyncio.sleep(1.0)
        mem = proc.memory_info().rss
        rss["peak"] = max(rss.get("peak", 0), mem)
        if "warm" not in rss and time.monotonic() - start >= WARMUP:
            rss["warm"] = mem
    await clients


def test_soak(soak_server):
    tally, rss = Tally(), {}
    began = time.monotonic()
    asyncio.run(_soak(soak_server, tally, rss))
    elapsed = time.monotonic() - began
    state = assert_allocator_idle(soak_server, timeout=60)
    rss["end"] = psutil.Process(soak_server.proc.pid).memory_info().rss
    m = soak_server.metrics()
    c = tally.counts
    print(f"\nsoak: {elapsed:.0f} s, {CLIENTS} clients: {dict(c)}; KV {state['kv_blocks']}; "
          f"preemptions {m['ember:num_preemptions_total']:.0f}, prefix-cache hit tokens "
          f"{m['ember:prefix_cache_hits_total']:.0f}; RSS MiB warm {rss['warm'] >> 20} "
          f"peak {rss['peak'] >> 20} end {rss['end'] >> 20}")
    assert not tally.lost, f"{len(tally.lost)} requests lost, e.g.:\n" + "\n".join(tally.lost[:5])
    assert c["sent"] >= 2 * CLIENTS and c["completed"] >= c["sent"] // 2, dict(c)
    assert c["disconnect"] > 0 and c["timeout"] > 0 and c["probe"] > 0, dict(c)
    assert rss["end"] - rss["warm"] < RSS_GROWTH_BOUND, rss
    assert m["ember:engine_step_errors_total"] == 0 and m["ember:engine_healthy"] == 1
    assert m["ember:num_preemptions_total"] > 0, "the small KV cache should force preemption"
    r = httpx.post(f"{soak_server.url}/v1/completions", timeout=60,
                   json={"prompt": "The capital of France is", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and "Paris" in r.json()["choices"][0]["text"]


def test_sigkill_leaves_no_process_behind(soak_server):
    children = descendants(soak_server.proc.pid)
    soak_server.proc.send_signal(signal.SIGKILL)
    assert soak_server.proc.wait(30) == -signal.SIGKILL
    assert_no_leftovers(soak_server, children)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{soak_server.url}/health", timeout=2)
