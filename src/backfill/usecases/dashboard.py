"""What the dashboard (/ui) shows: batches of every API as one list, a batch with its errors, and usage.
`scope` is the tenant a caller may see, None for an admin (every tenant)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from backfill.domain.batches import CANCELLABLE, Batch
from backfill.errors import NotFound
from backfill.services import Services
from backfill.store.dashboard import BatchFilter, DashboardQueries
from backfill.usecases import usage

MAX_LIST = 2000


@dataclass(frozen=True)
class Progress:
    done: int
    throughput_per_s: float | None  # lines ended a second since the batch started
    eta_at: int | None  # the scheduler's estimate, else extrapolated from the throughput
    late: bool  # expected to end after its deadline


def progress_of(batch: Batch, now: float) -> Progress:
    """How far a batch is and how fast it goes; time is an argument."""
    done = batch.completed + batch.failed
    throughput = None
    if batch.in_progress_at is not None and now > batch.in_progress_at and done:
        throughput = done / (now - batch.in_progress_at)
    eta = batch.eta_at
    if eta is None and throughput and not batch.status.is_terminal:
        eta = int(now + (batch.total - done) / throughput)
    late = eta is not None and not batch.status.is_terminal and eta > batch.expires_at
    return Progress(done, throughput, eta, late)


def batch_view(batch: Batch, tenant: str, now: float) -> dict[str, Any]:
    progress = progress_of(batch, now)
    return {
        "id": batch.id,
        "api": batch.api.value,
        "tenant": tenant,
        "status": batch.status.value,
        "model": batch.model,
        "endpoint": batch.endpoint,
        "created_at": batch.created_at,
        "expires_at": batch.expires_at,
        "total": batch.total,
        "completed": batch.completed,
        "failed": batch.failed,
        "done": progress.done,
        "throughput_per_s": progress.throughput_per_s,
        "eta_at": progress.eta_at,
        "late": progress.late,
        "schedule": None if batch.status.is_terminal else batch.schedule_state,
        "waiting": batch.waiting if batch.is_waiting else None,
        "metadata": batch.metadata,
    }


def queries(services: Services) -> DashboardQueries:
    store: Any = services.store
    return DashboardQueries(getattr(store, "read_engine", None) or store.engine)


def metadata_fragment(text: str) -> str:
    """What the metadata filter looks for in the stored JSON: `key=value` becomes `"key":"value"` (the stored form);
    anything else is looked for as typed."""
    key, equals, value = text.partition("=")
    if not equals:
        return text
    return (orjson.dumps(key.strip()) + b":" + orjson.dumps(value.strip())).decode()


async def list_batches(services: Services, scope: str | None, where: BatchFilter, limit: int) -> list[dict[str, Any]]:
    """Newest first; a tenant's caller gets its own tenant's whatever `where.tenant_id` asks."""
    tenant_id = where.tenant_id if scope is None else scope
    metadata = metadata_fragment(where.metadata) if where.metadata else None
    scoped = BatchFilter(tenant_id, where.status, where.model, metadata)
    rows = await queries(services).list_batches(scoped, min(limit, MAX_LIST))
    now = services.clock()
    return [batch_view(batch, tenant, now) for batch, tenant in rows]


async def get_batch(services: Services, scope: str | None, batch_id: str) -> Batch:
    """The batch if the caller may see it; a tenant asking for another's gets NotFound, as if it did not exist."""
    batch = await services.store.get_batch(scope, batch_id)
    if batch is None:
        raise NotFound(f"No such batch: {batch_id}", param="batch_id")
    return batch


async def batch_detail(services: Services, scope: str | None, batch_id: str) -> dict[str, Any]:
    batch = await get_batch(services, scope, batch_id)
    names = await queries(services).tenant_names()
    groups = await queries(services).error_groups(batch.id)
    view = batch_view(batch, names.get(batch.tenant_id, batch.tenant_id), services.clock())
    return view | {
        "usage": batch.usage.to_openai(),
        "errors": [error.to_dict() for error in batch.errors or []],
        "error_groups": [
            {"code": g.code, "count": g.count, "examples": [{"custom_id": c, "message": m} for c, m in g.examples]}
            for g in groups
        ],
        "files": {
            "input": batch.input_file_id,
            "output": batch.output_file_id,
            "error": batch.error_file_id,
        },
        "cancellable": batch.status in CANCELLABLE,
        "retryable": batch.status.is_terminal and batch.api.value == "openai" and batch.failed > 0,
    }


async def usage_report(services: Services, scope: str | None, start: int) -> dict[str, Any]:
    """Tokens and cost by day, tenant and model (batch and interactive apart), and deadlines met."""
    tenant = scope
    by = ["project_id", "model", "batch"]
    query = usage.ReportQuery(start_time=start, end_time=None, bucket_width="1d", group_by=by, limit=31)
    costs_query = usage.ReportQuery(
        start_time=start, end_time=None, bucket_width="1d", group_by=["project_id", "line_item"], limit=31
    )
    slas = usage.ReportQuery(start_time=start, end_time=None, bucket_width="1d", group_by=["project_id"], limit=31)
    return {
        "usage": await usage.completions_usage(services, tenant, query),
        "costs": await usage.costs(services, tenant, costs_query),
        "slas": await usage.batch_slas(services, tenant, slas),
    }
