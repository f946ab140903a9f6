"""Line queries: lease with fencing, group-commit results, reclaim lapsed leases, read results in order."""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import orjson
from sqlalchemy import bindparam, func, literal_column, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from backfill.domain.batches import OPEN_STATES, BatchStatus, RequestState
from backfill.domain.leases import DispatchBatch, LeasedLine, LineUpdate
from backfill.domain.result_cache import metadata_flag
from backfill.domain.results import StoredResult
from backfill.domain.usage import Usage
from backfill.domain.usage_report import Capacity, UsageCounts, UsageKey, UsageKind, fold, kind_of_api, row_start
from backfill.store.result_cache import keep_results
from backfill.store.tables import batches, files, requests, tenants
from backfill.store.usage import add_usage

_FAILED_STATES = [RequestState.FAILED.value, RequestState.EXPIRED.value, RequestState.CANCELLED.value]
_STATES = {state.value: state for state in RequestState}
_KEYS_KEPT = 1024  # batches whose tenant, model and api a process remembers
_USAGE_COLUMNS = ("input_tokens", "cached_tokens", "output_tokens", "reasoning_tokens")

_LEASED_COLUMNS = (
    requests.c.id,
    requests.c.batch_id,
    requests.c.line_no,
    requests.c.custom_id,
    requests.c.body_offset,
    requests.c.body_length,
    requests.c.attempts,
    requests.c.lease_seq,
    requests.c.est_prompt_tokens,
    requests.c.max_output_tokens,
    requests.c.prefix_group,
)

# The states the partial indexes over `requests` are on (store/tables.py), as literals: a planner can use such an
# index only where the query says them so, never for a bound parameter.
IS_QUEUED = requests.c.state == literal_column(f"'{RequestState.QUEUED.value}'")
IS_OPEN = requests.c.state.in_([literal_column(f"'{state.value}'") for state in OPEN_STATES])
IS_LEASED = requests.c.state == literal_column(f"'{RequestState.LEASED.value}'")

# Fenced: only the holder of this exact lease (owner and lease_seq) may write the line.
_FENCE = (
    (requests.c.id == bindparam("_id"))
    & (requests.c.lease_owner == bindparam("_owner"))
    & (requests.c.lease_seq == bindparam("_seq"))
    & (requests.c.state == RequestState.LEASED.value)
)

# Written through the driver's own executemany with one tuple a line: SQLAlchemy's compiled UPDATE built a
# parameter dict per row (construct_params), the largest single cost of recording a result (BENCHMARKS.md,
# "embeddings"). `{p}` is the dialect's placeholder.
_FINISH_LINE_SQL = (
    "UPDATE requests SET state = {p}, attempts = {p}, lease_owner = NULL, lease_expires_at = NULL, result_id = {p},"
    " status_code = {p}, request_id = {p}, body = {p}, error_code = {p}, error_message = {p}, input_tokens = {p},"
    " cached_tokens = {p}, output_tokens = {p}, reasoning_tokens = {p}, cached_from = {p}"
    " WHERE id = {p} AND lease_owner = {p} AND lease_seq = {p} AND state = 'leased'"
)
_REQUEUE_LINE = (
    update(requests)
    .where(_FENCE)
    .values(
        state=RequestState.QUEUED.value,
        attempts=bindparam("_attempts"),
        next_attempt_at=bindparam("_next_attempt_at"),
        lease_owner=None,
        lease_expires_at=None,
        # The last backend error the line met (kept when a hand-back has none): shown if its batch expires.
        error_message=func.coalesce(bindparam("_error_message"), requests.c.error_message),
    )
)


def _metadata(text: str | None) -> dict[str, str] | None:
    if not text:
        return None
    parsed = orjson.loads(text)
    return parsed if isinstance(parsed, dict) else None


def _finish_params(owner: str, u: LineUpdate) -> tuple[Any, ...]:
    usage = u.usage
    return (
        u.state.value,
        u.attempts,
        u.result_id,
        u.status_code,
        u.request_id,
        u.body,
        u.error_code,
        u.error_message,
        usage.input_tokens,
        usage.cached_tokens,
        usage.output_tokens,
        usage.reasoning_tokens,
        u.cached_from,
        u.id,
        owner,
        u.lease_seq,
    )


class LineQueries:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.is_postgres = engine.dialect.name == "postgresql"
        self._finish_line = _FINISH_LINE_SQL.format(p="%s" if self.is_postgres else "?")
        self._keys: dict[str, tuple[str, str, str]] = {}  # by batch id: its tenant, model and api

    async def dispatchable_batches(self, now: float) -> list[DispatchBatch]:
        """In-progress batches inside their window with lines not yet finished, earliest deadline first."""
        query = (
            select(
                batches.c.id,
                batches.c.tenant_id,
                batches.c.model,
                batches.c.endpoint,
                batches.c.expires_at,
                files.c.blob_key,
                batches.c.created_at,
                batches.c.seq,
                tenants.c.weight,
                (batches.c.total - batches.c.completed - batches.c.failed).label("open_lines"),
                batches.c.est_prompt_tokens,
                batches.c.est_output_tokens,
                batches.c.total,
                batches.c.metadata,
            )
            .select_from(
                batches.join(files, files.c.id == batches.c.input_file_id).join(
                    tenants, tenants.c.id == batches.c.tenant_id
                )
            )
            .where(
                batches.c.status == BatchStatus.IN_PROGRESS.value,
                batches.c.expires_at > now,
                batches.c.completed + batches.c.failed < batches.c.total,
            )
            .order_by(batches.c.expires_at, batches.c.seq)
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [
            dataclasses.replace(DispatchBatch(*row[:-1]), result_cache=metadata_flag(_metadata(row.metadata)))
            for row in rows
        ]

    async def set_outlooks(
        self, outlooks: Sequence[tuple[str, int | None, str | None]], waiting: Mapping[str, str] | None = None
    ) -> None:
        """Write the scheduler's (batch id, estimated completion, schedule state) onto in-progress batches, and what
        each waits for (`waiting`, by batch id; cleared for the others)."""
        if not outlooks:
            return
        waiting = waiting or {}
        async with self.engine.begin() as conn:
            await conn.execute(
                update(batches)
                .where(batches.c.id == bindparam("_id"), batches.c.status == BatchStatus.IN_PROGRESS.value)
                .values(eta_at=bindparam("_eta"), schedule_state=bindparam("_state"), waiting=bindparam("_waiting")),
                [
                    {"_id": batch_id, "_eta": eta, "_state": state, "_waiting": waiting.get(batch_id)}
                    for batch_id, eta, state in sorted(outlooks)  # batch rows in id order, as a group commit
                ],
            )

    async def batch_statuses(self, batch_ids: Sequence[str]) -> dict[str, tuple[BatchStatus, int]]:
        """Status and expires_at of each batch."""
        if not batch_ids:
            return {}
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(batches.c.id, batches.c.status, batches.c.expires_at).where(batches.c.id.in_(batch_ids))
            )
            return {row.id: (BatchStatus(row.status), row.expires_at) for row in rows}

    async def lease_lines(self, batch_id: str, owner: str, limit: int, now: float, ttl_s: float) -> list[LeasedLine]:
        """Claim up to `limit` queued lines of a batch whose retry time has come, in (prefix key, line number)
        order, so lines that share a prompt prefix go out together."""
        pick = (
            select(requests.c.id)
            .where(
                requests.c.batch_id == batch_id,
                IS_QUEUED,
                requests.c.next_attempt_at <= now,
            )
            .order_by(requests.c.prefix_group, requests.c.line_no)
            .limit(limit)
        )
        if self.is_postgres:
            pick = pick.with_for_update(skip_locked=True)
        stmt = (
            update(requests)
            .where(requests.c.id.in_(pick.scalar_subquery()))
            .values(
                state=RequestState.LEASED.value,
                lease_owner=owner,
                lease_expires_at=now + ttl_s,
                lease_seq=requests.c.lease_seq + 1,
            )
            .returning(*_LEASED_COLUMNS)
        )
        async with self.engine.begin() as conn:
            rows = (await conn.execute(stmt)).all()
        leased = [LeasedLine(*row) for row in rows]
        leased.sort(key=lambda line: (line.prefix_group, line.line_no))
        return leased

    async def renew_leases(self, owner: str, now: float, ttl_s: float) -> None:
        """Heartbeat: push back the expiry of every lease and batch claim this owner holds.

        On PostgreSQL it never waits on a line another transaction holds: that is this owner's own group commit,
        which ends the line or requeues it (if it rolls back, the next heartbeat renews it), or another worker's
        reclaim of a lease already lapsed. Waiting there deadlocked with group commits, which lock the same lines
        in answer order. The batch claims go in a transaction of their own, in id order, as a group commit and the
        outlooks lock batch rows: held together with the lines they also crossed.
        """
        mine = select(requests.c.id).where(requests.c.lease_owner == owner, IS_LEASED)
        async with self.engine.begin() as conn:
            await conn.execute(
                update(requests)
                .where(requests.c.id.in_(mine.with_for_update(skip_locked=True)))
                .values(lease_expires_at=now + ttl_s)
            )
        claimed = select(batches.c.id).where(batches.c.claimed_by == owner).order_by(batches.c.id)
        async with self.engine.begin() as conn:
            await conn.execute(
                update(batches).where(batches.c.id.in_(claimed.with_for_update())).values(claim_expires_at=now + ttl_s)
            )

    async def reclaim_lapsed_leases(self, now: float) -> int:
        """Lines whose holder stopped renewing go back to the queue (uncharged)."""
        # A lapsed line locked by another transaction is its holder's group commit writing it at the last moment:
        # skipped (the next sweep takes it if that rolls back), never waited on, as that deadlocked.
        lapsed = select(requests.c.id).where(IS_LEASED, requests.c.lease_expires_at < now)
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(requests)
                .where(requests.c.id.in_(lapsed.with_for_update(skip_locked=True)))
                .values(state=RequestState.QUEUED.value, lease_owner=None, lease_expires_at=None)
            )
            return int(result.rowcount)

    async def release_all_leases(self) -> int:
        """Every leased line back to the queue (uncharged) and every batch claim dropped, whoever holds them.

        Only for a database no other process uses: `backfill run` calls it under its state-directory lock, where
        any lease it finds belongs to an earlier run that was killed. Returns the number of lines handed back.
        """
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(requests)
                .where(IS_LEASED)
                .values(state=RequestState.QUEUED.value, lease_owner=None, lease_expires_at=None)
            )
            await conn.execute(
                update(batches).where(batches.c.claimed_by.is_not(None)).values(claimed_by=None, claim_expires_at=None)
            )
            return int(result.rowcount)

    async def record(self, owner: str, updates: Sequence[LineUpdate]) -> int:
        """Group commit: write many line results and the batch counters in one transaction.

        Every write is fenced on the lease; a result whose lease was lost is dropped. Returns the number of lines
        written. Counters move by what was written: when a fence drops something, they are recounted.
        """
        by_batch: dict[str, list[LineUpdate]] = defaultdict(list)
        for u in updates:
            by_batch[u.batch_id].append(u)
        # Made before the transaction: on SQLite it holds the one writer (another process's lease or group commit
        # waits for it), so it should last as long as its statements, not as long as building their parameters.
        groups = [_Group.of(owner, batch_id, group) for batch_id, group in sorted(by_batch.items())]
        written = 0
        used: list[tuple[UsageKey, UsageCounts]] = []
        kept: list[tuple[str, LineUpdate]] = []
        async with self.engine.begin() as conn:
            for group in groups:  # one lock order for all workers: no deadlocks
                count, counted, cached = await self._record_batch(conn, owner, group)
                written += count
                used += counted
                kept += cached
            # In the same transaction as the lines, after every batch's rows (each in one order for all writers):
            # the result cache keeps only answers that were written, and the usage report never counts a line twice,
            # nor misses one.
            await keep_results(conn, kept)
            await add_usage(conn, fold(used))
        return written

    async def _record_batch(
        self, conn: AsyncConnection, owner: str, group: _Group
    ) -> tuple[int, list[tuple[UsageKey, UsageCounts]], list[tuple[str, LineUpdate]]]:
        """Write one batch's updates; the lines written, the usage of the successes among them, and those of them
        with a result-cache key, with the batch's tenant."""
        written = 0
        if group.requeue:
            result = await conn.execute(_REQUEUE_LINE, group.requeue)
            written += int(result.rowcount)
        if not group.final:
            return written, [], []
        keys = await self._batch_keys(conn, group.batch_id)
        if keys is None:  # deleted (a message batch, once ended) with its lines: nothing left to write
            return written, [], []
        tenant_id, model, api = keys
        # Every lease still held (the usual case): the update lands them all, and their usage counts as it is. Where
        # a fence dropped some, a savepoint undoes the update, and it is made again knowing which lines it lands.
        savepoint = await conn.begin_nested()
        finished = int((await conn.exec_driver_sql(self._finish_line, group.params)).rowcount)
        if finished == len(group.final):
            await savepoint.commit()
            held = group.succeeded
            await _count(conn, group.batch_id, group.succeeded, len(group.final))
        else:
            await savepoint.rollback()
            # Which successes the update lands, read before it, locked: their usage is counted. After it, a line
            # written here and one written by the same update in an earlier commit (a retried flush) look alike.
            held = await _held(conn, owner, group.batch_id, group.succeeded)
            finished = int((await conn.exec_driver_sql(self._finish_line, group.params)).rowcount)
            await _recount(conn, group.batch_id)
        counted = _usage_of(tenant_id, model, kind_of_api(api), held)
        return written + finished, counted, [(tenant_id, u) for u in held if u.cache_key is not None]

    async def _batch_keys(self, conn: AsyncConnection, batch_id: str) -> tuple[str, str, str] | None:
        """A batch's tenant, model and api, read once: none of them changes once its lines run. None: no such
        batch."""
        keys = self._keys.get(batch_id)
        if keys is None:
            query = select(batches.c.tenant_id, batches.c.model, batches.c.api).where(batches.c.id == batch_id)
            row = (await conn.execute(query)).first()
            if row is None:
                return None
            if len(self._keys) >= _KEYS_KEPT:
                self._keys.clear()
            keys = self._keys[batch_id] = (row.tenant_id, row.model or "", row.api)
        return keys

    async def close_queued_lines(self, batch_id: str, state: RequestState, note: str | None = None) -> int:
        """Queued lines of a batch that is expiring or cancelling end as `state` and count as failed; `note` (why
        they did not run) is kept as the error message of those that met no backend error of their own."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(requests)
                .where(requests.c.batch_id == batch_id, IS_QUEUED)
                .values(state=state.value, error_message=func.coalesce(requests.c.error_message, note))
            )
            closed = int(result.rowcount)
            if closed:
                await conn.execute(
                    update(batches).where(batches.c.id == batch_id).values(failed=batches.c.failed + closed)
                )
            return closed

    async def iter_results(self, batch_id: str, page_size: int = 2000) -> AsyncIterator[StoredResult]:
        """Every line of a batch in input order, one short read transaction per page."""
        last = 0
        columns = (
            requests.c.line_no,
            requests.c.custom_id,
            requests.c.state,
            requests.c.result_id,
            requests.c.status_code,
            requests.c.request_id,
            requests.c.body,
            requests.c.error_code,
            requests.c.error_message,
            requests.c.cached_from,
        )
        while True:
            query = (
                select(*columns)
                .where(requests.c.batch_id == batch_id, requests.c.line_no > last)
                .order_by(requests.c.line_no)
                .limit(page_size)
            )
            async with self.engine.connect() as conn:
                rows = (await conn.execute(query)).all()
            # Unpacked by position, the state by a dict: per row, attribute access and Enum() cost more than the
            # output line that is made of it (a finalize of 20,000 embeddings lines).
            for _, custom_id, state, result_id, status_code, request_id, body, code, message, cached_from in rows:
                yield StoredResult(
                    custom_id,
                    _STATES[state],
                    result_id,
                    status_code,
                    request_id,
                    bytes(body) if body is not None else None,
                    code,
                    message,
                    cached_from,
                )
            if len(rows) < page_size:
                return
            last = rows[-1][0]

    async def settled_successes(self, batch_id: str) -> int:
        """Succeeded lines before the batch's first line still open (queued or leased): the part of its output
        file that can no longer change."""
        first_open = (
            select(func.min(requests.c.line_no)).where(requests.c.batch_id == batch_id, IS_OPEN).scalar_subquery()
        )
        query = select(func.count()).where(
            requests.c.batch_id == batch_id,
            requests.c.state == RequestState.SUCCEEDED.value,
            (first_open.is_(None)) | (requests.c.line_no < first_open),
        )
        async with self.engine.connect() as conn:
            return int(await conn.scalar(query) or 0)

    async def line_state_counts(self, batch_id: str) -> dict[str, int]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(requests.c.state, func.count()).where(requests.c.batch_id == batch_id).group_by(requests.c.state)
            )
            return {row[0]: int(row[1]) for row in rows}


@dataclasses.dataclass(slots=True)
class _Group:
    """One batch's updates of a group commit, with the parameters of their statements."""

    batch_id: str
    requeue: list[dict[str, Any]]
    final: list[LineUpdate]
    succeeded: list[LineUpdate]
    params: list[tuple[Any, ...]]

    @classmethod
    def of(cls, owner: str, batch_id: str, updates: Sequence[LineUpdate]) -> _Group:
        final = [u for u in updates if u.is_final]
        requeue = [
            {
                "_id": u.id,
                "_owner": owner,
                "_seq": u.lease_seq,
                "_attempts": u.attempts,
                "_next_attempt_at": u.next_attempt_at,
                "_error_message": u.error_message,
            }
            for u in updates
            if not u.is_final
        ]
        succeeded = [u for u in final if u.state is RequestState.SUCCEEDED]
        return cls(batch_id, requeue, final, succeeded, [_finish_params(owner, u) for u in final])


async def _count(conn: AsyncConnection, batch_id: str, succeeded: Sequence[LineUpdate], final: int) -> None:
    """Move a batch's counters by `final` lines written, `succeeded` of them successes."""
    usage = Usage.total(u.usage for u in succeeded)
    await conn.execute(
        update(batches)
        .where(batches.c.id == batch_id)
        .values(
            completed=batches.c.completed + len(succeeded),
            failed=batches.c.failed + (final - len(succeeded)),
            input_tokens=batches.c.input_tokens + usage.input_tokens,
            cached_tokens=batches.c.cached_tokens + usage.cached_tokens,
            output_tokens=batches.c.output_tokens + usage.output_tokens,
            reasoning_tokens=batches.c.reasoning_tokens + usage.reasoning_tokens,
        )
    )


async def _held(conn: AsyncConnection, owner: str, batch_id: str, updates: Sequence[LineUpdate]) -> list[LineUpdate]:
    """Those of `updates` whose lease `owner` still holds (the fence); rows stay locked until the transaction ends
    (SQLite's BEGIN IMMEDIATE holds the whole database)."""
    if not updates:
        return []
    query = select(requests.c.id, requests.c.lease_seq).where(
        requests.c.batch_id == batch_id,
        requests.c.id.in_([u.id for u in updates]),
        requests.c.lease_owner == owner,
        requests.c.state == RequestState.LEASED.value,
    )
    if conn.dialect.name == "postgresql":
        query = query.with_for_update()
    held = {row.id: row.lease_seq for row in await conn.execute(query)}
    return [u for u in updates if held.get(u.id) == u.lease_seq]


def _usage_of(
    tenant_id: str, model: str, kind: UsageKind, updates: Sequence[LineUpdate]
) -> list[tuple[UsageKey, UsageCounts]]:
    """One row of counts per usage minute and kind of line (capacity, or answered from the result cache)."""
    groups: dict[tuple[int, Capacity, bool], list[Usage]] = defaultdict(list)
    for u in updates:
        groups[(row_start(u.finished_at), u.capacity, u.cached_from is not None)].append(u.usage)
    return [
        (UsageKey(tenant_id, model, start, kind), UsageCounts.of_requests(usages, capacity, cached=cached))
        for (start, capacity, cached), usages in groups.items()
    ]


async def _recount(conn: AsyncConnection, batch_id: str) -> None:
    """Derive a batch's counters and usage from its lines (the slow, always-right path)."""
    # Lock the batch row first, in its own statement: a transaction that already moved the counters holds it, and
    # the UPDATE below must count with a snapshot taken after that one commits. Otherwise (PostgreSQL, read
    # committed) the UPDATE waits for the row but counts from its older snapshot, and overwrites that increment.
    await conn.execute(select(batches.c.id).where(batches.c.id == batch_id).with_for_update())
    mine = requests.c.batch_id == batch_id
    succeeded = mine & (requests.c.state == RequestState.SUCCEEDED.value)
    values: dict[str, Any] = {
        "completed": select(func.count()).where(succeeded).scalar_subquery(),
        "failed": select(func.count()).where(mine & requests.c.state.in_(_FAILED_STATES)).scalar_subquery(),
    }
    for column in _USAGE_COLUMNS:
        values[column] = select(func.coalesce(func.sum(requests.c[column]), 0)).where(succeeded).scalar_subquery()
    await conn.execute(update(batches).where(batches.c.id == batch_id).values(**values))
