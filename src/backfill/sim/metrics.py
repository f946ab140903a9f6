"""The simulator's Prometheus metrics, under vLLM's names, on a registry of its own.

Gauges and counters are read from the engine model when scraped (nothing is updated per token); the latency
histograms are observed by the runner, in modelled seconds.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from backfill.sim.engine import EngineModel

# vLLM's buckets for time to first token and end-to-end latency.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
                960.0, 1920.0, 7680.0)  # fmt: skip


class SimMetrics:
    """The registry a simulator's ``GET /metrics`` renders."""

    def __init__(self, model: EngineModel, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(model, model_name))
        ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            ["model_name"],
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )
        e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of end to end request latency in seconds.",
            ["model_name"],
            buckets=_E2E_BUCKETS,
            registry=self.registry,
        )
        self.time_to_first_token = ttft.labels(model_name)
        self.e2e_latency = e2e.labels(model_name)
        # Not vLLM's: how far the real-time runner fell behind the model, to tell a bench that measures latency
        # on this server whether it measured the model or a process short of CPU.
        self.lost_seconds = Counter(
            "backfill_sim_lost_seconds",
            "Wall seconds the engine fell behind its modelled iteration times and did not make up.",
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """Reads the model's load and totals at scrape time."""

    def __init__(self, model: EngineModel, model_name: str) -> None:
        self._model = model
        self._labels = [model_name]

    def collect(self) -> Iterator[Metric]:
        model, labels = self._model, self._labels
        totals = model.totals
        for name, documentation, value in (
            ("vllm:num_requests_running", "Number of requests in model execution batches.", model.num_running),
            ("vllm:num_requests_waiting", "Number of requests waiting to be processed.", model.num_waiting),
            ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", model.kv_cache_usage),
        ):
            gauge = GaugeMetricFamily(name, documentation, labels=["model_name"])
            gauge.add_metric(labels, value)
            yield gauge
        for name, documentation, count in (
            ("vllm:prompt_tokens", "Number of prefill tokens processed.", totals.prompt_tokens),
            ("vllm:generation_tokens", "Number of generation tokens processed.", totals.generation_tokens),
            ("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.",
             totals.prefix_cache_queries),
            ("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
             totals.prefix_cache_hits),
            ("vllm:num_preemptions", "Cumulative number of preemption from the engine.", totals.preemptions),
        ):  # fmt: skip
            counter = CounterMetricFamily(name, documentation, labels=["model_name"])
            counter.add_metric(labels, count)
            yield counter
        success = CounterMetricFamily(
            "vllm:request_success",
            "Count of successfully processed requests.",
            labels=["model_name", "finished_reason"],
        )
        success.add_metric([*labels, "stop"], totals.finished_stop)
        success.add_metric([*labels, "length"], totals.finished_length)
        success.add_metric([*labels, "abort"], totals.aborted)
        yield success
