"""Read an inference server's load from its own Prometheus `/metrics`, by flavour.

One scrape gives an `EngineLoad`: requests running and waiting in the engine, how full its KV cache is, and its
cumulative time-to-first-token histogram, which `ttft_between` turns into one interval's and `quantile` reads
like Prometheus's `histogram_quantile`. A continuous-batching engine is full exactly when requests wait in it for
a slot; the adaptive concurrency limit follows that (policy/limits.py, `on_engine_load`). Servers of flavour
`openai` have no such metrics; nothing is scraped for them.

Metric names and meanings, checked against each engine's source and real `/metrics` text (tests/fixtures/metrics,
each file's header says where it comes from):

- vLLM V1 (vllm/v1/metrics/loggers.py and docs/design/metrics.md; real 0.10 output pasted in vllm-project/vllm#22227
  and vllm-project/production-stack#617): gauges `vllm:num_requests_running`, `vllm:num_requests_waiting`,
  `vllm:kv_cache_usage_perc` (0..1; `vllm:gpu_cache_usage_perc` in older releases, the V0 engine's), the histogram
  `vllm:time_to_first_token_seconds` and the counters `vllm:prompt_tokens_total`, `vllm:generation_tokens_total`,
  labelled `engine` and `model_name`. The prompt counter counts whole prompts, cached tokens included (newer releases
  split it by source in `vllm:prompt_tokens_by_source_total`, vllm-project/vllm#33290), so the cached-token counter
  they also export must not be added to it. No capture with every one of these was found: vllm.txt is assembled.
- SGLang with `--enable-metrics` (a capture published in its docs/references/production_metrics.md;
  sglang/srt/metrics/collector.py): gauges `sglang:num_running_reqs`, `sglang:num_queue_reqs`, `sglang:token_usage`
  (0..1), the histogram `sglang:time_to_first_token_seconds` and the counters `sglang:prompt_tokens_total`,
  `sglang:generation_tokens_total` (whole prompts, counted when a request finishes; `sglang:cached_tokens_total` is
  a part of the prompt count, not added), labelled `model_name` and, in newer releases, `engine_type`, `tp_rank`,
  `pp_rank`, `moe_ep_rank`, `dp_rank`.
- llama.cpp's server with `--metrics` (captures of llama-server b11434; tools/server/server-task.cpp and
  server-context.cpp): gauges `llamacpp:requests_processing` and `llamacpp:requests_deferred`, the counters
  `llamacpp:prompt_tokens_total`, `llamacpp:tokens_predicted_total`, unlabelled. The prompt counter leaves out
  prompt tokens reused from the slot's cache; b11434 counts those in `llamacpp:prompt_tokens_cached_total` (their
  sum equals the prompt tokens in the responses' usage); older builds have no such counter. No KV-cache gauge (the
  old `llamacpp:kv_cache_usage_ratio` went in ggml-org/llama.cpp#13660) and no latency histogram.

Samples are matched by their exposed names, so the parser's habit of naming a counter's family without `_total`
and a histogram's without `_bucket`/`_sum`/`_count` does not matter. Counts are summed over label sets (one per
model, engine or rank); the KV usage is the largest of them, the cache closest to full.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

from backfill.config import BackendSettings
from backfill.domain.engine_load import EngineLoad, Histogram

_SCRAPE_TIMEOUT_S = 2.0


@dataclass(frozen=True, slots=True)
class MetricNames:
    """One flavour's metric names."""

    running: str
    waiting: str
    kv_usage: tuple[str, ...] = ()  # the first one present is read
    ttft: str | None = None
    tokens: tuple[str, ...] = ()  # counters added up, each one required: prompt tokens and generated tokens
    # Counters of prompt tokens served from the cache where `tokens` leaves them out, added where reported: a
    # release without one still has a token count, short of those tokens.
    cached_tokens: tuple[str, ...] = ()


METRIC_NAMES = {
    "vllm": MetricNames(
        running="vllm:num_requests_running",
        waiting="vllm:num_requests_waiting",
        kv_usage=("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
        ttft="vllm:time_to_first_token_seconds",
        tokens=("vllm:prompt_tokens_total", "vllm:generation_tokens_total"),
    ),
    "sglang": MetricNames(
        running="sglang:num_running_reqs",
        waiting="sglang:num_queue_reqs",
        kv_usage=("sglang:token_usage",),
        ttft="sglang:time_to_first_token_seconds",
        tokens=("sglang:prompt_tokens_total", "sglang:generation_tokens_total"),
    ),
    "llamacpp": MetricNames(
        running="llamacpp:requests_processing",
        waiting="llamacpp:requests_deferred",
        tokens=("llamacpp:prompt_tokens_total", "llamacpp:tokens_predicted_total"),
        cached_tokens=("llamacpp:prompt_tokens_cached_total",),
    ),
}
WAITING_METRIC = {flavour: names.waiting for flavour, names in METRIC_NAMES.items()}

Labels = dict[str, str]
Samples = dict[str, list[tuple[Labels, float]]]


def parse_samples(text: str) -> Samples | None:
    """Every sample by its exposed name; None if the text is not Prometheus exposition format."""
    samples: Samples = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if math.isfinite(sample.value):  # NaN or Inf says nothing about a count or a fill level
                    samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    except (ValueError, IndexError, KeyError, TypeError):  # what the parser raises on text it cannot read
        return None
    return samples


def parse_waiting(text: str, metric: str) -> int | None:
    """Requests waiting, summed over the metric's samples (one per served model); None if it is absent or
    the text is not Prometheus exposition format."""
    samples = parse_samples(text)
    return _total(samples, metric) if samples is not None else None


def parse_load(text: str, names: MetricNames) -> EngineLoad | None:
    """The load in one scrape's text; None if it is unreadable or reports none of the four signals."""
    samples = parse_samples(text)
    if samples is None:
        return None
    kv_usage = next((max(v for _, v in samples[name]) for name in names.kv_usage if samples.get(name)), None)
    load = EngineLoad(
        running=_total(samples, names.running),
        waiting=_total(samples, names.waiting),
        kv_usage=kv_usage,
        ttft=_histogram(samples, names.ttft) if names.ttft is not None else None,
        tokens=_counters(samples, names.tokens, names.cached_tokens),
    )
    return None if load == EngineLoad(None, None, None, None) else load


def _counters(samples: Samples, required: tuple[str, ...], optional: tuple[str, ...]) -> int | None:
    """The sum of the counters, or None unless every required one is reported; an optional one adds where it is."""
    totals = [_total(samples, name) for name in required]
    if not totals or None in totals:
        return None
    return sum(t for t in totals + [_total(samples, name) for name in optional] if t is not None)


def _total(samples: Samples, name: str) -> int | None:
    values = samples.get(name)
    return round(sum(value for _, value in values)) if values else None


def _histogram(samples: Samples, name: str) -> Histogram | None:
    """The histogram `name` summed over its label sets, on the bucket bounds they all share."""
    series: dict[tuple[tuple[str, str], ...], dict[float, float]] = {}
    for labels, value in samples.get(f"{name}_bucket", ()):
        try:
            le = float(labels["le"])
        except (KeyError, ValueError):
            return None
        key = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
        series.setdefault(key, {})[le] = value
    if not series:
        return None
    bounds = sorted(set.intersection(*(set(counts) for counts in series.values())))
    if not bounds or bounds[-1] != math.inf:
        return None
    buckets = tuple((le, sum(counts[le] for counts in series.values())) for le in bounds)
    counts = samples.get(f"{name}_count")
    count = sum(value for _, value in counts) if counts else buckets[-1][1]
    return Histogram(buckets, count, sum(value for _, value in samples.get(f"{name}_sum", ())))


def ttft_between(prev: Histogram, cur: Histogram) -> Histogram | None:
    """The observations made between two scrapes of one cumulative histogram; None if it was reset in between
    (a count went down: the engine restarted) or its buckets changed."""
    if len(prev.buckets) != len(cur.buckets) or cur.count < prev.count:
        return None
    buckets = []
    for (le, count), (prev_le, prev_count) in zip(cur.buckets, prev.buckets, strict=True):
        if le != prev_le or count < prev_count:
            return None
        buckets.append((le, count - prev_count))
    return Histogram(tuple(buckets), cur.count - prev.count, cur.sum - prev.sum)


def quantile(h: Histogram, q: float) -> float | None:
    """The q-quantile (0 <= q <= 1) as Prometheus's `histogram_quantile` estimates it: linear interpolation inside
    the bucket holding it, the lowest bucket starting at 0, and the highest finite bound when it falls in the +Inf
    bucket. None for an empty histogram."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be between 0 and 1, got {q}")
    if len(h.buckets) < 2 or h.buckets[-1][0] != math.inf:
        return None
    total = max(count for _, count in h.buckets)
    if total <= 0:
        return None
    rank = q * total
    lower_le, lower_count = 0.0, 0.0
    for index, (le, raw_count) in enumerate(h.buckets):
        count = max(raw_count, lower_count)  # buckets read at slightly different moments may dip: keep monotonic
        if count >= rank:
            if le == math.inf:
                return lower_le
            if index == 0 and le <= 0:
                return le
            in_bucket = count - lower_count
            return lower_le if in_bucket <= 0 else lower_le + (le - lower_le) * (rank - lower_count) / in_bucket
        lower_le, lower_count = le, count
    return lower_le


class EngineMetrics:
    """Scrapes one backend's `/metrics` (at the server root, beside `/v1`)."""

    def __init__(self, settings: BackendSettings, client: httpx.AsyncClient) -> None:
        self.name = settings.name
        self.names = METRIC_NAMES[settings.flavour]
        self.metric = self.names.waiting
        self.url = settings.url.rstrip("/").removesuffix("/v1") + "/metrics"
        self.client = client
        self.error: str | None = None  # why the last scrape gave nothing (None: it was read)

    @classmethod
    def supports(cls, settings: BackendSettings) -> bool:
        return settings.flavour in METRIC_NAMES

    async def load(self) -> EngineLoad | None:
        """None when the server cannot be read: the controller then goes on without it."""
        text = await self._scrape()
        load = parse_load(text, self.names) if text is not None else None
        if text is not None:
            self.error = None if load is not None else f"{self.url} reports none of the {self.names.waiting} metrics"
        return load

    async def waiting(self) -> int | None:
        """Requests waiting in the engine; None when the server cannot be read."""
        text = await self._scrape()
        return parse_waiting(text, self.metric) if text is not None else None

    async def _scrape(self) -> str | None:
        try:
            response = await self.client.get(self.url, timeout=_SCRAPE_TIMEOUT_S)
        except httpx.HTTPError as exc:
            self.error = f"{self.url} could not be read: {type(exc).__name__}"
            return None
        if response.status_code != 200:
            self.error = f"{self.url} answered {response.status_code}"
            return None
        return response.text
