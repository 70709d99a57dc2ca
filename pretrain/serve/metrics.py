"""gpt2-serve's Prometheus metrics (``GET /metrics``), one registry per app: requests by status, prompt
tokens, and from the engine the tokens generated, rows admitted / reused, cancellations, decode steps,
the queue depth and running rows, and the time-to-first-token and inter-token latency histograms."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _EngineCollector:
    def __init__(self, engine) -> None:
        self.engine = engine

    def collect(self):
        e, c = self.engine, self.engine.counters
        for name, value, doc in [("generation_tokens", c.tokens, "tokens generated"),
                                 ("rows_admitted", c.admitted, "sequences given a row"),
                                 ("rows_reused", c.reused, "sequences given a row an earlier one had used"),
                                 ("sequences_cancelled", c.cancelled, "sequences cancelled (client gone)"),
                                 ("decode_steps", c.steps, "decode steps of the engine")]:
            yield CounterMetricFamily(f"gpt2_serve_{name}", doc, value=value)
        yield GaugeMetricFamily("gpt2_serve_queue_depth", "sequences waiting for a row", value=e.waiting)
        yield GaugeMetricFamily("gpt2_serve_running_rows", "rows generating now", value=e.running)


class Metrics:
    """The registry; ``first_token`` / ``next_token`` are the engine's observer hooks."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engine) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("gpt2_serve_requests", "completion requests by HTTP status", ["status"],
                                registry=self.registry)
        self.prompt_tokens = Counter("gpt2_serve_prompt_tokens", "prompt tokens of accepted requests",
                                     registry=self.registry)
        self.ttft = Histogram("gpt2_serve_time_to_first_token_seconds", "arrival to first token",
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("gpt2_serve_inter_token_latency_seconds", "between a sequence's tokens",
                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_EngineCollector(engine))
        engine.observer = self

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def next_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
