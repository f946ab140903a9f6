"""Usage, cost and SLA reports in the shape of OpenAI's Usage and Costs APIs (docs/usage.md). The HTTP routes
(`/v1/organization/...`) and `backfill usage` both call these. `tenant_id` None: every tenant (an admin)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from backfill.domain.usage_report import (
    BUCKET_LIMITS,
    BUCKET_WIDTHS,
    COST_GROUPS,
    SLA_GROUPS,
    USAGE_GROUPS,
    Bucket,
    UsageKind,
    UsageRows,
    Window,
    cost_buckets,
    sla_buckets,
    usage_buckets,
)
from backfill.errors import InvalidRequest
from backfill.usecases.deps import BatchDeps


@dataclass(frozen=True)
class ReportQuery:
    """The query parameters OpenAI's Usage and Costs APIs take (`project_ids` are tenant names here)."""

    start_time: int
    end_time: int | None = None
    bucket_width: str = "1d"
    group_by: Sequence[str] = ()
    limit: int | None = None
    page: str | None = None
    project_ids: Sequence[str] = ()
    models: Sequence[str] = ()
    batch: bool | None = None
    completion_windows: Sequence[str] = field(default_factory=tuple)


def _window(query: ReportQuery, now: int) -> Window:
    if query.bucket_width not in BUCKET_WIDTHS:
        raise InvalidRequest(
            f"Invalid bucket_width {query.bucket_width!r}: expected one of {', '.join(BUCKET_WIDTHS)}.",
            param="bucket_width",
        )
    default, largest = BUCKET_LIMITS[query.bucket_width]
    limit = default if query.limit is None else query.limit
    if not 1 <= limit <= largest:
        raise InvalidRequest(
            f"limit must be between 1 and {largest} for bucket_width {query.bucket_width}.", param="limit"
        )
    start = query.start_time
    if query.page is not None:
        if not query.page.isdigit():
            raise InvalidRequest(f"Invalid page {query.page!r}.", param="page")
        start = int(query.page)
    end = query.end_time if query.end_time is not None else now
    if end <= start:
        raise InvalidRequest("end_time must be after start_time.", param="end_time")
    return Window(start, end, BUCKET_WIDTHS[query.bucket_width], limit)


def _groups(query: ReportQuery, allowed: Sequence[str]) -> list[str]:
    for name in query.group_by:
        if name not in allowed:
            raise InvalidRequest(f"Invalid group_by {name!r}: expected any of {', '.join(allowed)}.", param="group_by")
    return [name for name in allowed if name in query.group_by]


def _page(buckets: list[Bucket], window: Window) -> dict[str, Any]:
    following = window.next_page()
    return {
        "object": "page",
        "data": [bucket.to_dict() for bucket in buckets],
        "has_more": following is not None,
        "next_page": None if following is None else str(following),
    }


async def _scope(deps: BatchDeps, tenant_id: str | None, query: ReportQuery) -> tuple[dict[str, str], set[str] | None]:
    """Tenant names by id, and the tenant ids the report may show (None: all)."""
    names = {tenant.id: tenant.name for tenant in await deps.store.list_tenants()}
    wanted: set[str] | None = None
    if query.project_ids:
        by_name = {name: tenant for tenant, name in names.items()}
        wanted = {by_name.get(name, name) for name in query.project_ids}
    if tenant_id is not None:
        wanted = {tenant_id} if wanted is None else wanted & {tenant_id}
    return names, wanted


async def _rows(
    deps: BatchDeps, tenant_id: str | None, query: ReportQuery, window: Window
) -> tuple[UsageRows, dict[str, str]]:
    names, wanted = await _scope(deps, tenant_id, query)
    rows = await deps.store.usage_rows(window.start, window.end, tenant_id)
    kept = [
        (key, counts)
        for key, counts in rows
        if (wanted is None or key.tenant_id in wanted)
        and (not query.models or key.model in query.models)
        and (query.batch is None or (key.kind is UsageKind.BATCH) == query.batch)
    ]
    return kept, names


async def completions_usage(deps: BatchDeps, tenant_id: str | None, query: ReportQuery) -> dict[str, Any]:
    """`GET /v1/organization/usage/completions`: every endpoint's requests and tokens (embeddings count input)."""
    window = _window(query, deps.now())
    group_by = _groups(query, USAGE_GROUPS)
    aligned = _aligned(window)
    rows, names = await _rows(deps, tenant_id, query, aligned)
    return _page(usage_buckets(rows, aligned, group_by, names), window)


async def costs(deps: BatchDeps, tenant_id: str | None, query: ReportQuery) -> dict[str, Any]:
    """`GET /v1/organization/costs`: the usage at the configured prices, batch at the batch discount."""
    window = _window(query, deps.now())
    group_by = _groups(query, COST_GROUPS)
    aligned = _aligned(window)
    rows, names = await _rows(deps, tenant_id, query, aligned)
    prices = {entry.model: entry.to_price() for entry in deps.settings.prices}
    buckets = cost_buckets(rows, aligned, group_by, names, prices, deps.settings.batch_discount)
    return _page(buckets, window)


async def batch_slas(deps: BatchDeps, tenant_id: str | None, query: ReportQuery) -> dict[str, Any]:
    """`GET /v1/organization/usage/batch_slas` (backfill's own): batches that ended, by when they ended."""
    window = _window(query, deps.now())
    group_by = _groups(query, SLA_GROUPS)
    names, wanted = await _scope(deps, tenant_id, query)
    aligned = _aligned(window)
    ended = [
        batch
        for batch in await deps.store.ended_batches(aligned.start, aligned.end, tenant_id)
        if (wanted is None or batch.tenant_id in wanted)
        and (not query.completion_windows or batch.completion_window in query.completion_windows)
    ]
    return _page(sla_buckets(ended, aligned, group_by, names), window)


def _aligned(window: Window) -> Window:
    """The window widened to whole buckets: a bucket holds everything between its start and end."""
    start = window.start // window.width_s * window.width_s
    starts = window.bucket_starts()
    end = starts[-1] + window.width_s if starts else window.end
    return Window(start, end, window.width_s, window.limit)
