"""Rows for store tests: tenants, files, batches and their lines, built through the Store port itself."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select

from backfill import ids
from backfill.domain.batches import Batch, BatchStatus, RequestState
from backfill.domain.files import FileRecord
from backfill.domain.leases import LeasedLine, LineUpdate
from backfill.domain.usage import Usage
from backfill.domain.valid_lines import ValidLine
from backfill.ports import Store
from backfill.store.sql import SqlStore
from backfill.store.tables import requests
from backfill.testing import InMemoryStore

NOW = 1_700_000_000
DAY_S = 86_400
MODEL = "m"
VALIDATOR = "validator-1"


async def add_tenant(store: Store, name: str = "acme") -> str:
    return await store.ensure_tenant(name, NOW)


async def add_file(
    store: Store, tenant_id: str, *, purpose: str = "batch", created_at: int = NOW, expires_at: int | None = None
) -> FileRecord:
    file_id = ids.file_id()
    record = FileRecord(
        id=file_id,
        tenant_id=tenant_id,
        filename="input.jsonl",
        purpose=purpose,
        bytes=123,
        blob_key=f"files/{file_id}",
        created_at=created_at,
        expires_at=expires_at,
    )
    await store.add_file(record)
    return record


async def add_batch(
    store: Store, tenant_id: str, input_file_id: str | None = None, *, expires_at: int = NOW + DAY_S
) -> Batch:
    """A `validating` batch (with a fresh input file unless one is given)."""
    if input_file_id is None:
        input_file_id = (await add_file(store, tenant_id)).id
    batch = Batch(
        id=ids.batch_id(),
        tenant_id=tenant_id,
        endpoint="/v1/chat/completions",
        input_file_id=input_file_id,
        completion_window="24h",
        status=BatchStatus.VALIDATING,
        created_at=NOW,
        expires_at=expires_at,
        metadata={"job": "nightly"},
    )
    await store.create_batch(batch)
    return batch


def valid_lines(numbers: Sequence[int]) -> list[ValidLine]:
    return [ValidLine(n, f"request-{n}", offset=100 * n, length=90, est_prompt_tokens=22) for n in numbers]


async def start(store: Store, batch_id: str, numbers: Sequence[int]) -> None:
    """validating -> in_progress with lines numbered `numbers`, as the lifecycle does it."""
    assert await store.claim_batch(batch_id, VALIDATOR, NOW, 60.0)
    assert await store.start_batch(batch_id, VALIDATOR, MODEL, valid_lines(numbers), NOW)
    await store.release_batch(batch_id, VALIDATOR)


async def running_batch(
    store: Store, lines: int | Sequence[int], tenant: str = "acme", *, expires_at: int = NOW + DAY_S
) -> Batch:
    """An in_progress batch with lines 1..lines (or the given line numbers), all queued."""
    tenant_id = await add_tenant(store, tenant)
    batch = await add_batch(store, tenant_id, expires_at=expires_at)
    await start(store, batch.id, range(1, lines + 1) if isinstance(lines, int) else lines)
    fresh = await store.get_batch(None, batch.id)
    assert fresh is not None
    return fresh


async def current(store: Store, batch_id: str) -> Batch:
    batch = await store.get_batch(None, batch_id)
    assert batch is not None
    return batch


NO_USAGE = Usage()


def succeeded(line: LeasedLine, usage: Usage = NO_USAGE, body: bytes | None = None) -> LineUpdate:
    return LineUpdate(
        line.id,
        line.batch_id,
        line.lease_seq,
        RequestState.SUCCEEDED,
        line.attempts + 1,
        result_id=ids.batch_request_id(),
        status_code=200,
        request_id=ids.request_id(),
        body=body if body is not None else b'{"line":%d}' % line.line_no,
        usage=usage,
    )


def failed(line: LeasedLine, status_code: int | None = 400) -> LineUpdate:
    return LineUpdate(
        line.id,
        line.batch_id,
        line.lease_seq,
        RequestState.FAILED,
        line.attempts + 1,
        result_id=ids.batch_request_id(),
        status_code=status_code,
        request_id=ids.request_id() if status_code else None,
        body=b'{"error":{"message":"bad"}}' if status_code else None,
        error_code=None if status_code else "timeout",
        error_message=None if status_code else "no answer",
    )


def requeued(line: LeasedLine, retry_at: float) -> LineUpdate:
    return LineUpdate(line.id, line.batch_id, line.lease_seq, RequestState.QUEUED, line.attempts + 1, retry_at)


async def line_rows(store: Store, batch_id: str) -> dict[int, tuple[str, str | None, int, int]]:
    """line_no -> (state, lease_owner, lease_seq, attempts), read behind the port: the fake's rows, or SQL."""
    if isinstance(store, InMemoryStore):
        return {
            line.line_no: (line.state.value, line.lease_owner, line.lease_seq, line.attempts)
            for line in store.lines(batch_id)
        }
    assert isinstance(store, SqlStore)
    query = select(
        requests.c.line_no, requests.c.state, requests.c.lease_owner, requests.c.lease_seq, requests.c.attempts
    ).where(requests.c.batch_id == batch_id)
    async with store.engine.connect() as conn:
        return {
            row.line_no: (row.state, row.lease_owner, row.lease_seq, row.attempts) for row in await conn.execute(query)
        }
