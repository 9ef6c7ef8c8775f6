"""GET /metrics: Prometheus text from prometheus-client.

Counters and histograms are updated by the worker as it steps (TTFT from a
request's arrival, queueing included; the gap between a request's tokens);
gauges that describe the engine now (requests running and waiting, expert
cache traffic, memory against the budget) are read at scrape time by a
collector, so they are never stale. Names follow vLLM's where one exists
(`..._time_to_first_token_seconds`, `..._time_per_output_token_seconds`).
"""

from __future__ import annotations

import psutil
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80)
TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5, 5)


class ServerMetrics:
    """The server's registry (its own, so two servers in a process never mix)."""

    def __init__(self, worker_ref):
        self.registry = r = CollectorRegistry()
        self._worker = worker_ref  # () -> Worker
        p = "edgemoe_"
        self.prompt_tokens = Counter(
            p + "prompt_tokens", "Prompt tokens of finished requests", registry=r
        )
        self.cached_tokens = Counter(
            p + "prompt_cached_tokens", "Prompt tokens served from a kept prefix", registry=r
        )
        self.generation_tokens = Counter(p + "generation_tokens", "Tokens generated", registry=r)
        self.requests = Counter(
            p + "requests", "Finished requests by finish reason", ["finish_reason"], registry=r
        )
        self.rejected = Counter(
            p + "requests_rejected", "Requests refused, by reason", ["reason"], registry=r
        )
        self.ttft = Histogram(
            p + "time_to_first_token_seconds",
            "From a request's arrival to its first token (queueing included)",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            p + "time_per_output_token_seconds",
            "Between two tokens of a request",
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        r.register(_EngineCollector(worker_ref))

    # called on the worker thread
    def on_first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def on_token(self, seconds: float) -> None:
        self.tpot.observe(seconds)

    def on_finish(self, job, seq) -> None:
        self.prompt_tokens.inc(seq.stats.prompt_tokens)
        self.cached_tokens.inc(job.cached)
        self.generation_tokens.inc(len(seq.out))
        self.requests.labels(seq.finish_reason or "unknown").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    def __init__(self, worker_ref):
        self._worker = worker_ref

    def collect(self):
        w = self._worker()
        p = "edgemoe_"
        yield GaugeMetricFamily(
            p + "requests_running", "Requests in the running batch", len(w.running)
        )
        yield GaugeMetricFamily(p + "requests_waiting", "Requests waiting for a slot", w.waiting)
        yield GaugeMetricFamily(
            p + "serving",
            "1 while the engine serves, 0 while loading or failed",
            w.state == "serving",
        )
        m = w.model
        if m is None:
            return
        ex = m.executor_stats()
        yield CounterMetricFamily(p + "expert_hits", "Expert uses served from memory", ex.hits)
        yield CounterMetricFamily(p + "expert_misses", "Expert uses read from flash", ex.misses)
        yield CounterMetricFamily(p + "expert_reads", "Expert reads issued", ex.reads)
        yield CounterMetricFamily(
            p + "flash_read_bytes", "Bytes read from flash (expert slices)", ex.bytes_read
        )
        yield CounterMetricFamily(
            p + "io_wait_seconds", "Time the model waited on reads", ex.io_wait_s
        )
        yield GaugeMetricFamily(
            p + "memory_budget_bytes", "The --mem budget (0: unlimited)", int(m.mem or 0)
        )
        yield GaugeMetricFamily(
            p + "memory_used_bytes",
            "Resident set of the server process",
            psutil.Process().memory_info().rss,
        )
        plan = GaugeMetricFamily(
            p + "memory_plan_bytes", "The budget's planned parts", labels=["part"]
        )
        for part in ("floor", "resident", "kv_cache", "io_buffers", "workspace", "expert_cache"):
            plan.add_metric([part], int(getattr(m.plan, part)))
        yield plan
        cache = getattr(m.executor, "cache", None)
        if cache is not None:
            yield GaugeMetricFamily(
                p + "expert_cache_used_bytes", "Bytes held by the expert cache", int(cache.used)
            )
        yield GaugeMetricFamily(p + "kv_cache_used_bytes", "KV cache filled", w.kv_used())
