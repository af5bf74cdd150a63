"""Prometheus metrics on a dedicated registry (so tests and embedders can build many apps).

Engine-side numbers (queue lengths, KV usage, token counters) are read at scrape time from the
snapshot the engine thread publishes; latencies are measured where the client sees them, in the
serving layer, as outputs reach the HTTP handler.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:   # an EngineClient (ember/engine/process.py) serves the same calls
    from ember.engine.async_engine import AsyncLLMEngine


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
                0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                60.0, 120.0, 240.0, 480.0, 960.0)


class _EngineCollector:
    def __init__(self, engine: AsyncLLMEngine, model_name: str) -> None:
        self.engine, self.labels = engine, {"model_name": model_name}

    def _family(self, cls, name: str, doc: str, value: float):
        fam = cls(name, doc, labels=list(self.labels))
        fam.add_metric(list(self.labels.values()), value)
        return fam

    def collect(self):
        s = self.engine.snapshot
        g, c = GaugeMetricFamily, CounterMetricFamily
        yield self._family(g, "ember:num_requests_running", "Sequences running in the engine.",
                           s.num_running)
        yield self._family(g, "ember:num_requests_waiting", "Sequences waiting to be scheduled.",
                           s.num_waiting)
        yield self._family(g, "ember:kv_cache_usage_perc",
                           "Fraction of KV cache blocks in use (1 = full).", s.kv_cache_usage)
        yield self._family(g, "ember:engine_healthy", "1 while the engine serves requests.",
                           int(self.engine.healthy))
        # CounterMetricFamily appends the _total suffix itself.
        yield self._family(c, "ember:prompt_tokens", "Prefill tokens processed.",
                           s.stats.prompt_tokens)
        yield self._family(c, "ember:generation_tokens", "Tokens generated.",
                           s.stats.generation_tokens)
        yield self._family(c, "ember:prefix_cache_queries",
                           "Prompt tokens looked up in the prefix cache.", s.prefix_cache_queries)
        yield self._family(c, "ember:prefix_cache_hits",
                           "Prompt tokens found in the prefix cache.", s.prefix_cache_hits)
        yield self._family(c, "ember:num_preemptions", "Requests preempted.",
                           s.stats.preemptions)
        yield self._family(c, "ember:engine_step_errors", "Engine steps that raised.",
                           s.step_errors)
        yield self._family(c, "ember:engine_restarts", "Engine restarts after it died.",
                           s.restarts)
        yield self._family(g, "ember:engine_tracked_requests",
                           "Requests the engine holds state for (0 when idle).",
                           s.tracked_requests)
        # The allocator: total = free + cached (evictable) + held by requests.
        yield self._family(g, "ember:kv_blocks_total", "KV cache blocks.", s.kv_blocks_total)
        yield self._family(g, "ember:kv_blocks_free", "KV blocks on the free list.",
                           s.kv_blocks_free)
        yield self._family(g, "ember:kv_blocks_cached",
                           "KV blocks kept by the prefix cache, unreferenced (evictable).",
                           s.kv_blocks_cached)
        yield self._family(g, "ember:kv_blocks_held", "KV blocks referenced by requests.",
                           s.kv_blocks_total - s.kv_blocks_free - s.kv_blocks_cached)


class ServerMetrics:
    def __init__(self, engine: AsyncLLMEngine, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine, model_name))
        labels, self.model_name = ["model_name"], model_name

        def hist(name: str, doc: str, buckets) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets,
                             registry=self.registry).labels(model_name)

        self.ttft = hist("ember:time_to_first_token_seconds", "Time to first token.", _TTFT_BUCKETS)
        self.itl = hist("ember:inter_token_latency_seconds", "Time between tokens of a request.",
                        _ITL_BUCKETS)
        self.e2e = hist("ember:e2e_request_latency_seconds", "Request latency, arrival to finish.",
                        _E2E_BUCKETS)
        self.success = Counter("ember:request_success", "Requests finished, by reason.",
                               labels + ["finished_reason"], registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def timer(self) -> "RequestTimer":
        return RequestTimer(self)


class RequestTimer:
    """Latency bookkeeping of one HTTP request, which may hold several engine requests."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics
        self.start = time.monotonic()
        self._progress: dict[str, tuple[int, float]] = {}   # engine request id → (tokens, time)

    def on_output(self, out) -> None:
        now = time.monotonic()
        tokens = sum(len(c.token_ids) for c in out.outputs)
        seen, last = self._progress.get(out.request_id, (0, self.start))
        if tokens > seen:
            (self.metrics.itl if seen else self.metrics.ttft).observe(now - last)
            self._progress[out.request_id] = (tokens, now)
        if out.finished:
            self.metrics.e2e.observe(now - self.start)
            for c in out.outputs:
                self.metrics.success.labels(self.metrics.model_name,
                                            c.finish_reason or "abort").inc()
