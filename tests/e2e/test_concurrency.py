"""Many streams at once, client disconnects, and /metrics."""
from __future__ import annotations

import asyncio

import httpx
import openai


def test_32_concurrent_streams(server, model_name):
    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[str, str | None, int]:
        stream = await client.completions.create(
            model=model_name, prompt=f"Story number {i}: once upon a time", max_tokens=16,
            temperature=0.7, seed=i, stream=True, stream_options={"include_usage": True})
        text, finish, tokens = "", None, 0
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        return text, finish, tokens

    async def run():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x",
                                      max_retries=0, timeout=120) as client:
            return await asyncio.gather(*(one(client, i) for i in range(32)))

    results = asyncio.run(run())
    assert len(results) == 32
    for text, finish, tokens in results:
        assert finish in ("stop", "length") and 1 <= tokens <= 16
        assert text or finish == "stop"


def test_disconnect_frees_the_request(server, model_name):
    body = {"model": model_name, "prompt": "Count forever:", "max_tokens": 4000,
            "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{server.url}/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            for _ in range(6):          # a few events: the request is running
                next(lines)
            m = server.metrics()
            assert m["ember:num_requests_running"] >= 1 and m["ember:kv_cache_usage_perc"] > 0
    # leaving the block closed the connection mid-stream
    m = server.wait_idle()
    assert m["ember:num_requests_running"] == 0 and m["ember:kv_cache_usage_perc"] == 0, m


def test_non_streaming_disconnect_aborts(server, model_name):
    body = {"model": model_name, "prompt": "Count forever:", "max_tokens": 4000,
            "ignore_eos": True}
    try:
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=1.5)
    except httpx.TimeoutException:
        pass
    m = server.wait_idle()
    assert m["ember:num_requests_running"] == 0 and m["ember:kv_cache_usage_perc"] == 0, m


def test_metrics_series(server, client, model_name):
    client.completions.create(model=model_name, prompt="Hello", max_tokens=3)
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("ember:num_requests_running", "ember:num_requests_waiting",
                 "ember:kv_cache_usage_perc", "ember:prompt_tokens_total",
                 "ember:generation_tokens_total", "ember:prefix_cache_hits_total",
                 "ember:prefix_cache_queries_total", "ember:time_to_first_token_seconds_bucket",
                 "ember:inter_token_latency_seconds_bucket",
                 "ember:e2e_request_latency_seconds_count"):
        assert name in text, name
    m = server.metrics()
    assert m["ember:generation_tokens_total"] > 0 and m["ember:prompt_tokens_total"] > 0
    assert m["ember:e2e_request_latency_seconds_count"] > 0
