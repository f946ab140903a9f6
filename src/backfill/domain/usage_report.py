"""Usage, cost and SLA reports (docs/usage.md): token counts folded into per-minute rows, rows into the buckets
of OpenAI's Usage and Costs APIs, finished batches into turnaround percentiles. Pure: rows in, reports out."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from enum import StrEnum
from typing import Any

from backfill.domain.usage import Usage

ROW_S = 60  # usage is kept per minute: exact sums for 1m, 1h and 1d buckets alike
BUCKET_WIDTHS = {"1m": 60, "1h": 3600, "1d": 86400}
# OpenAI's default and largest page (buckets) per width.
BUCKET_LIMITS = {"1m": (60, 1440), "1h": (24, 168), "1d": (7, 31)}
USAGE_GROUPS = ("project_id", "model", "batch", "kind")
COST_GROUPS = ("project_id", "line_item")
SLA_GROUPS = ("project_id", "completion_window")


class UsageKind(StrEnum):
    BATCH = "batch"
    INTERACTIVE = "interactive"  # through the proxy
    FLEX = "flex"  # `service_tier: "flex"` calls the proxy waited for (run as one-line batches)
    BACKGROUND = "background"  # `background: true` Responses calls (run as one-line batches)


class Capacity(StrEnum):
    """Why a batch line ran where it did, as the dispatcher saw it when it started the line."""

    HARVESTED = "harvested"  # an endpoint shared with interactive traffic, under its harvest ceiling
    OFF_PEAK = "off_peak"  # the same, inside an off-peak window of the line's pool (a larger share)
    PROMOTED = "promoted"  # its batch was promoted for its deadline: a guaranteed share, whatever the load
    DEDICATED = "dedicated"  # an endpoint batch work has to itself (harvest off, or "auto" with no interactive yet)


# Kinds billed at the batch discount: they all run as batch lines, in harvested capacity.
BATCH_PRICED = frozenset({UsageKind.BATCH, UsageKind.FLEX, UsageKind.BACKGROUND})


def kind_of_api(api: str) -> UsageKind:
    """The usage kind of a batch line, by the API its batch came through (`BatchApi`'s values)."""
    return {"flex": UsageKind.FLEX, "responses": UsageKind.BACKGROUND}.get(api, UsageKind.BATCH)


@dataclass(frozen=True, slots=True, order=True)
class UsageKey:
    tenant_id: str
    model: str
    start_time: int  # the minute (unix seconds, a multiple of ROW_S)
    kind: UsageKind


@dataclass(frozen=True, slots=True)
class UsageCounts:
    """Requests and tokens of one row; `*_tokens` by capacity are input + output tokens of batch lines."""

    requests: int = 0
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    harvested_tokens: int = 0
    off_peak_tokens: int = 0
    promoted_tokens: int = 0
    dedicated_tokens: int = 0
    # Batch lines answered from the result cache (domain.result_cache): no model request, no token spent; the
    # tokens (input + output) their answers carry, beside.
    result_cache_hits: int = 0
    result_cache_tokens: int = 0

    def __add__(self, other: UsageCounts) -> UsageCounts:
        return UsageCounts(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    @classmethod
    def of_request(cls, usage: Usage, capacity: Capacity | None = None, *, cached: bool = False) -> UsageCounts:
        """One request's counts; `capacity` for a batch line (None: interactive); `cached`: a batch line answered
        from the result cache, which counts as a hit and nothing else (it cost nothing)."""
        if cached:
            return cls(result_cache_hits=1, result_cache_tokens=usage.total_tokens)
        by_capacity = {f"{capacity.value}_tokens": usage.total_tokens} if capacity is not None else {}
        return cls(1, usage.input_tokens, usage.cached_tokens, usage.output_tokens, **by_capacity)

    @classmethod
    def of_requests(
        cls, usages: Sequence[Usage], capacity: Capacity | None = None, *, cached: bool = False
    ) -> UsageCounts:
        """The sum of `of_request` over requests of one kind, without an object per request (a group commit
        counts thousands of lines)."""
        usage = Usage.total(usages)
        if cached:
            return cls(result_cache_hits=len(usages), result_cache_tokens=usage.total_tokens)
        by_capacity = {f"{capacity.value}_tokens": usage.total_tokens} if capacity is not None else {}
        return cls(len(usages), usage.input_tokens, usage.cached_tokens, usage.output_tokens, **by_capacity)

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


UsageRows = list[tuple[UsageKey, UsageCounts]]


def row_start(at: float) -> int:
    return int(at // ROW_S) * ROW_S


def fold(items: Iterable[tuple[UsageKey, UsageCounts]]) -> dict[UsageKey, UsageCounts]:
    """Sum counts with the same key (a group commit's lines, a flush of the proxy's requests)."""
    rows: dict[UsageKey, UsageCounts] = defaultdict(UsageCounts)
    for key, counts in items:
        rows[key] = rows[key] + counts
    return dict(rows)


@dataclass(frozen=True)
class Window:
    """The buckets a report covers: [start, end) cut at multiples of `width_s` (UTC), `limit` buckets a page."""

    start: int
    end: int
    width_s: int
    limit: int

    def bucket_starts(self) -> list[int]:
        first = self.start // self.width_s * self.width_s
        return list(range(first, self.end, self.width_s))[: self.limit]

    def next_page(self) -> int | None:
        starts = self.bucket_starts()
        following = starts[-1] + self.width_s if starts else self.end
        return following if following < self.end else None


@dataclass(frozen=True)
class Bucket:
    start_time: int
    end_time: int
    results: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {"object": "bucket", "start_time": self.start_time, "end_time": self.end_time, "results": self.results}


def _grouped(
    rows: Iterable[tuple[UsageKey, UsageCounts]], window: Window, group_by: Sequence[str]
) -> dict[int, dict[tuple[Any, ...], UsageCounts]]:
    out: dict[int, dict[tuple[Any, ...], UsageCounts]] = defaultdict(lambda: defaultdict(UsageCounts))
    for key, counts in rows:
        if not window.start <= key.start_time < window.end:
            continue
        bucket = key.start_time // window.width_s * window.width_s
        group = tuple(_group_value(key, name) for name in group_by)
        out[bucket][group] = out[bucket][group] + counts
    return out


def _group_value(key: UsageKey, name: str) -> Any:
    if name == "project_id":
        return key.tenant_id
    if name == "model":
        return key.model
    if name == "kind":
        return key.kind.value
    return key.kind is UsageKind.BATCH


def usage_buckets(
    rows: Iterable[tuple[UsageKey, UsageCounts]],
    window: Window,
    group_by: Sequence[str],
    tenant_names: Mapping[str, str],
) -> list[Bucket]:
    """OpenAI's `organization.usage.completions.result`s per bucket, with backfill's extra counts beside them."""
    grouped = _grouped(rows, window, group_by)
    buckets = []
    for start in window.bucket_starts():
        results = []
        for group, counts in sorted(grouped.get(start, {}).items(), key=lambda item: repr(item[0])):
            named = dict(zip(group_by, group, strict=True))
            results.append(
                {
                    "object": "organization.usage.completions.result",
                    "input_tokens": counts.input_tokens,
                    "output_tokens": counts.output_tokens,
                    "input_cached_tokens": counts.cached_tokens,
                    "input_audio_tokens": 0,
                    "output_audio_tokens": 0,
                    "num_model_requests": counts.requests,
                    "project_id": _tenant(named, tenant_names),
                    "user_id": None,
                    "api_key_id": None,
                    "model": named.get("model"),
                    "batch": named.get("batch"),
                    # Extension: batch, interactive, flex or background (docs/usage.md), when grouped by it.
                    "kind": named.get("kind"),
                    # Extension: batch tokens (input + output) by the capacity they ran in.
                    "harvested_tokens": counts.harvested_tokens,
                    "off_peak_tokens": counts.off_peak_tokens,
                    "promoted_tokens": counts.promoted_tokens,
                    "dedicated_tokens": counts.dedicated_tokens,
                    # Extension: batch lines answered from the result cache, and the tokens their answers carry.
                    "result_cache_hits": counts.result_cache_hits,
                    "result_cache_tokens": counts.result_cache_tokens,
                }
            )
        buckets.append(Bucket(start, start + window.width_s, results))
    return buckets


def _tenant(named: Mapping[str, Any], tenant_names: Mapping[str, str]) -> str | None:
    tenant_id = named.get("project_id")
    return None if tenant_id is None else tenant_names.get(tenant_id, tenant_id)


@dataclass(frozen=True)
class Price:
    """US dollars per million tokens; cached input at the input price unless given."""

    input_per_million: float
    output_per_million: float
    cached_input_per_million: float | None = None


def line_items(
    model: str, counts: UsageCounts, price: Price, *, batch: bool, batch_discount: float
) -> dict[str, float]:
    """What a row costs, by line item (`<model>, input` …; `(batch)` after batch items, at the discount)."""
    factor = (1.0 - batch_discount) if batch else 1.0
    cached_price = price.cached_input_per_million
    if cached_price is None:
        cached_price = price.input_per_million
    suffix = " (batch)" if batch else ""
    uncached = counts.input_tokens - counts.cached_tokens
    items = {
        f"{model}, input{suffix}": uncached * price.input_per_million * factor / 1e6,
        f"{model}, cached input{suffix}": counts.cached_tokens * cached_price * factor / 1e6,
        f"{model}, output{suffix}": counts.output_tokens * price.output_per_million * factor / 1e6,
    }
    return {name: value for name, value in items.items() if value}


def cost_buckets(
    rows: Iterable[tuple[UsageKey, UsageCounts]],
    window: Window,
    group_by: Sequence[str],
    tenant_names: Mapping[str, str],
    prices: Mapping[str, Price],
    batch_discount: float,
) -> list[Bucket]:
    """OpenAI's `organization.costs.result`s per bucket; models without a price cost nothing."""
    sums: dict[int, dict[tuple[str | None, str | None], float]] = defaultdict(lambda: defaultdict(float))
    for key, counts in rows:
        price = prices.get(key.model)
        if price is None or not window.start <= key.start_time < window.end:
            continue
        bucket = key.start_time // window.width_s * window.width_s
        tenant = key.tenant_id if "project_id" in group_by else None
        batch = key.kind in BATCH_PRICED
        for item, value in line_items(key.model, counts, price, batch=batch, batch_discount=batch_discount).items():
            sums[bucket][(tenant, item if "line_item" in group_by else None)] += value
    buckets = []
    for start in window.bucket_starts():
        results = [
            {
                "object": "organization.costs.result",
                "amount": {"value": round(value, 10), "currency": "usd"},
                "line_item": item,
                "project_id": None if tenant is None else tenant_names.get(tenant, tenant),
            }
            for (tenant, item), value in sorted(sums.get(start, {}).items(), key=lambda kv: repr(kv[0]))
        ]
        buckets.append(Bucket(start, start + window.width_s, results))
    return buckets


@dataclass(frozen=True)
class EndedBatch:
    """A batch that reached a terminal status, as the SLA report needs it."""

    tenant_id: str
    completion_window: str
    status: str  # completed, failed, expired, cancelled
    created_at: int
    ended_at: int
    expires_at: int
    lines_expired: int = 0

    @property
    def turnaround_s(self) -> int:
        return self.ended_at - self.created_at

    @property
    def is_in_window(self) -> bool:
        return self.status == "completed" and self.ended_at <= self.expires_at


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None when there are no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def sla_buckets(
    ended: Iterable[EndedBatch], window: Window, group_by: Sequence[str], tenant_names: Mapping[str, str]
) -> list[Bucket]:
    """Per bucket (by when batches ended) and group: batches ended, completed in their window, p50 / p95
    turnaround of completed batches, lines expired."""
    grouped: dict[int, dict[tuple[str | None, str | None], list[EndedBatch]]] = defaultdict(lambda: defaultdict(list))
    for batch in ended:
        if not window.start <= batch.ended_at < window.end:
            continue
        bucket = batch.ended_at // window.width_s * window.width_s
        tenant = batch.tenant_id if "project_id" in group_by else None
        completion_window = batch.completion_window if "completion_window" in group_by else None
        grouped[bucket][(tenant, completion_window)].append(batch)
    buckets = []
    for start in window.bucket_starts():
        results = []
        for (tenant, completion_window), group in sorted(grouped.get(start, {}).items(), key=lambda kv: repr(kv[0])):
            turnarounds = [b.turnaround_s for b in group if b.status == "completed"]
            by_status = {status: sum(b.status == status for b in group) for status in _ENDED}
            results.append(
                {
                    "object": "organization.usage.batch_slas.result",
                    "project_id": None if tenant is None else tenant_names.get(tenant, tenant),
                    "completion_window": completion_window,
                    "batches_ended": len(group),
                    "batches_in_window": sum(b.is_in_window for b in group),
                    **{f"batches_{status}": count for status, count in by_status.items()},
                    "turnaround_p50_s": percentile(turnarounds, 50),
                    "turnaround_p95_s": percentile(turnarounds, 95),
                    "lines_expired": sum(b.lines_expired for b in group),
                }
            )
        buckets.append(Bucket(start, start + window.width_s, results))
    return buckets


_ENDED = ("completed", "failed", "expired", "cancelled")
