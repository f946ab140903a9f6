"""Webhook endpoints and the outbox in SQL (docs/webhooks.md). `add_ended_event` runs inside the transaction that
sets a batch's terminal status, so an event is stored exactly when the status is."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import ColumnElement, and_, case, delete, insert, literal, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from backfill import ids
from backfill.domain.batches import BatchApi, BatchStatus
from backfill.domain.webhooks import (
    CONFIG_ENDPOINT_PREFIX,
    SILENT_APIS,
    Delivery,
    DeliveryRecord,
    DeliveryState,
    Event,
    EventType,
    WebhookEndpoint,
    at_risk_event,
    ended_event,
)
from backfill.store.tables import batches, webhook_deliveries, webhook_endpoints

_D = webhook_deliveries
_E = webhook_endpoints
_COLUMNS = ("event_id", "type", "created_at", "batch_id", "tenant_id", "endpoint_id", "state", "attempts")


def new_event_id() -> str:
    return ids.new_id("evt_")


def _event_type(openai: EventType, anthropic: EventType) -> ColumnElement[str]:
    return case((batches.c.api == BatchApi.ANTHROPIC.value, literal(anthropic.value)), else_=literal(openai.value))


def _fan_out(batch_id: str, event_type: ColumnElement[str], now: int, *only_if: ColumnElement[bool]) -> Any:
    """INSERT one pending delivery per endpoint of the batch's tenant, all with one new event id."""
    rows = (
        select(
            literal(new_event_id()),
            event_type,
            literal(now),
            batches.c.id,
            batches.c.tenant_id,
            _E.c.id,
            literal(DeliveryState.PENDING.value),
            literal(0),
            literal(float(now)),
        )
        .select_from(batches.join(_E, _E.c.tenant_id == batches.c.tenant_id))
        .where(batches.c.id == batch_id, batches.c.api.not_in([api.value for api in SILENT_APIS]), *only_if)
    )
    return insert(_D).from_select([*_COLUMNS, "next_attempt_at"], rows)


async def add_ended_event(conn: AsyncConnection, batch_id: str, status: BatchStatus, now: int) -> None:
    """The batch reached `status`: queue its event for every endpoint of its tenant (in the caller's transaction)."""
    kind = _event_type(ended_event(BatchApi.OPENAI, status), ended_event(BatchApi.ANTHROPIC, status))
    await conn.execute(_fan_out(batch_id, kind, now))


def _event_of(row: Any) -> Event:
    return Event(id=row.event_id, type=row.type, created_at=int(row.created_at), batch_id=row.batch_id)


def _endpoint_of(row: Any) -> WebhookEndpoint:
    return WebhookEndpoint(
        id=row.id, tenant_id=row.tenant_id, url=row.url, secret=row.secret, created_at=int(row.created_at)
    )


class WebhookQueries:
    engine: AsyncEngine

    async def add_webhook_endpoint(self, endpoint: WebhookEndpoint) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                insert(_E).values(
                    id=endpoint.id,
                    tenant_id=endpoint.tenant_id,
                    url=endpoint.url,
                    secret=endpoint.secret,
                    created_at=endpoint.created_at,
                )
            )

    async def list_webhook_endpoints(self, tenant_id: str | None = None) -> list[WebhookEndpoint]:
        query = select(_E).order_by(_E.c.created_at, _E.c.id)
        if tenant_id is not None:
            query = query.where(_E.c.tenant_id == tenant_id)
        async with self.engine.connect() as conn:
            return [_endpoint_of(row) for row in await conn.execute(query)]

    async def delete_webhook_endpoint(self, tenant_id: str, endpoint_id: str) -> bool:
        """Remove the endpoint and every delivery to it, pending or dead; False if the tenant has no such one."""
        async with self.engine.begin() as conn:
            await conn.execute(
                delete(_D).where(
                    _D.c.endpoint_id == endpoint_id,
                    _D.c.endpoint_id.in_(select(_E.c.id).where(_E.c.tenant_id == tenant_id)),
                )
            )
            result = await conn.execute(delete(_E).where(_E.c.id == endpoint_id, _E.c.tenant_id == tenant_id))
            return result.rowcount == 1

    async def sync_config_endpoints(self, endpoints: Sequence[WebhookEndpoint]) -> None:
        """Make the config file's endpoints exactly `endpoints`: add new ones, update the url and secret of known
        ones, remove (with their deliveries) those no longer in it. Endpoints made through the admin API stay."""
        try:
            await self._sync_config_endpoints(endpoints)
        except IntegrityError:  # another process starting with the same config added one first
            await self._sync_config_endpoints(endpoints)

    async def _sync_config_endpoints(self, endpoints: Sequence[WebhookEndpoint]) -> None:
        wanted = {endpoint.id: endpoint for endpoint in endpoints}
        async with self.engine.begin() as conn:
            known = set(await conn.scalars(select(_E.c.id).where(_E.c.id.startswith(CONFIG_ENDPOINT_PREFIX))))
            gone = list(known - set(wanted))
            if gone:
                await conn.execute(delete(_D).where(_D.c.endpoint_id.in_(gone)))
                await conn.execute(delete(_E).where(_E.c.id.in_(gone)))
            for endpoint in wanted.values():
                values = {"tenant_id": endpoint.tenant_id, "url": endpoint.url, "secret": endpoint.secret}
                if endpoint.id in known:
                    await conn.execute(update(_E).where(_E.c.id == endpoint.id).values(**values))
                else:
                    await conn.execute(insert(_E).values(id=endpoint.id, created_at=endpoint.created_at, **values))

    async def announce_at_risk(self, batch_ids: Sequence[str], now: int) -> int:
        """Queue the at-risk event of each in-progress batch that has not had one: once per batch, ever."""
        kind = _event_type(at_risk_event(BatchApi.OPENAI), at_risk_event(BatchApi.ANTHROPIC))
        queued = 0
        for batch_id in batch_ids:
            announced = select(_D.c.seq).where(
                _D.c.batch_id == batch_id, _D.c.type.in_([EventType.BATCH_AT_RISK, EventType.MESSAGE_BATCH_AT_RISK])
            )
            fan_out = _fan_out(
                batch_id, kind, now, batches.c.status == BatchStatus.IN_PROGRESS.value, ~announced.exists()
            )
            try:
                async with self.engine.begin() as conn:
                    queued += len((await conn.execute(fan_out.returning(_D.c.seq))).all())
            except IntegrityError:
                pass  # another worker announced it at the same moment
        return queued

    async def lease_deliveries(self, owner: str, now: float, limit: int, ttl_s: float) -> list[Delivery]:
        """Claim up to `limit` pending deliveries that are due and not held by a live sender, oldest first."""
        pick = (
            select(_D.c.seq)
            .where(
                _D.c.state == DeliveryState.PENDING.value,
                _D.c.next_attempt_at <= now,
                or_(_D.c.lease_expires_at.is_(None), _D.c.lease_expires_at < now),
            )
            .order_by(_D.c.next_attempt_at, _D.c.seq)
            .limit(limit)
        )
        if self.engine.dialect.name == "postgresql":
            pick = pick.with_for_update(skip_locked=True)
        async with self.engine.begin() as conn:
            leased = list(
                await conn.scalars(
                    update(_D)
                    .where(_D.c.seq.in_(pick.scalar_subquery()))
                    .values(lease_owner=owner, lease_expires_at=now + ttl_s)
                    .returning(_D.c.seq)
                )
            )
            if not leased:
                return []
            rows = await conn.execute(
                select(_D, _E.c.url, _E.c.secret)
                .select_from(_D.join(_E, _E.c.id == _D.c.endpoint_id))
                .where(_D.c.seq.in_(leased))
                .order_by(_D.c.seq)
            )
            return [
                Delivery(
                    seq=int(row.seq),
                    event=_event_of(row),
                    endpoint_id=row.endpoint_id,
                    url=row.url,
                    secret=row.secret,
                    attempts=int(row.attempts),
                )
                for row in rows
            ]

    async def settle_delivery(
        self, seq: int, owner: str, now: float, *, delivered: bool, retry_at: float | None, error: str | None
    ) -> bool:
        """Record one try: delivered; or failed, to be tried again at `retry_at`, or dead-lettered (None). Only
        while `owner` still holds the lease; False otherwise."""
        values: dict[str, Any] = {"attempts": _D.c.attempts + 1, "lease_owner": None, "lease_expires_at": None}
        if delivered:
            values.update(state=DeliveryState.DELIVERED.value, finished_at=int(now), last_error=None)
        elif retry_at is None:
            values.update(state=DeliveryState.DEAD.value, finished_at=int(now), last_error=error)
        else:
            values.update(next_attempt_at=retry_at, last_error=error)
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(_D)
                .where(_D.c.seq == seq, _D.c.lease_owner == owner, _D.c.state == DeliveryState.PENDING.value)
                .values(**values)
            )
            return result.rowcount == 1

    async def list_deliveries(
        self, state: DeliveryState, tenant_id: str | None = None, limit: int = 100
    ) -> list[DeliveryRecord]:
        """Deliveries in `state`, newest first (the dead letters, for the admin API)."""
        query = select(_D).where(_D.c.state == state.value)
        if tenant_id is not None:
            query = query.where(_D.c.tenant_id == tenant_id)
        async with self.engine.connect() as conn:
            rows = await conn.execute(query.order_by(_D.c.seq.desc()).limit(limit))
            return [
                DeliveryRecord(
                    seq=int(row.seq),
                    event=_event_of(row),
                    tenant_id=row.tenant_id,
                    endpoint_id=row.endpoint_id,
                    state=DeliveryState(row.state),
                    attempts=int(row.attempts),
                    last_error=row.last_error,
                    finished_at=row.finished_at,
                )
                for row in rows
            ]

    async def redeliver(self, seq: int, now: float) -> bool:
        """A dead letter goes back to pending, due now, for one more try (its event keeps its id)."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(_D)
                .where(and_(_D.c.seq == seq, _D.c.state == DeliveryState.DEAD.value))
                .values(state=DeliveryState.PENDING.value, next_attempt_at=now, finished_at=None, attempts=0)
            )
            return result.rowcount == 1
