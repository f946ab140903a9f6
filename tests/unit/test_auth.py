"""Keys to tenants: open mode while no key exists, noticed without making requests wait for the database."""

from __future__ import annotations

import asyncio

import pytest

from backfill.config import Settings
from backfill.domain.keys import make_key
from backfill.errors import AuthenticationFailed
from backfill.http.auth import Authenticator
from backfill.metrics import Metrics
from backfill.services import DEFAULT_TENANT, Services
from backfill.testing import InMemoryBlobStore, InMemoryStore


class CountingStore(InMemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.counts = 0

    async def count_api_keys(self) -> int:
        self.counts += 1
        return await super().count_api_keys()


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def authenticator(store: InMemoryStore, clock: Clock) -> Authenticator:
    services = Services(Settings(), store, InMemoryBlobStore(), [], None, Metrics())
    return Authenticator(services, clock=clock, recheck_s=1.0)


async def add_key(store: InMemoryStore, tenant: str) -> tuple[str, str]:
    tenant_id = await store.ensure_tenant(tenant, 0)
    key = make_key()
    await store.add_api_key(tenant_id, key, 0)
    return key.plaintext, tenant_id


async def test_open_mode_reads_the_database_once_a_recheck_period_and_never_on_a_requests_path() -> None:
    store, clock = CountingStore(), Clock()
    auth = await authenticator(store, clock)

    tenants = [await auth.tenant_for("any-key-in-open-mode") for _ in range(5)]
    counted_at_first = store.counts
    clock.now = 1.5
    await auth.tenant_for(None)  # starts a recount, and does not wait for it
    started = store.counts
    await asyncio.sleep(0)

    assert {await store.ensure_tenant(DEFAULT_TENANT, 0)} == set(tenants)
    assert (1, 1, 2) == (counted_at_first, started, store.counts)


async def test_a_key_created_while_open_closes_open_mode_at_the_next_recheck() -> None:
    store, clock = InMemoryStore(), Clock()
    auth = await authenticator(store, clock)
    await auth.tenant_for(None)
    await add_key(store, "a")

    within_the_period = await auth.tenant_for(None)
    clock.now = 1.0
    await auth.tenant_for(None)
    await asyncio.sleep(0)  # the recount runs
    with pytest.raises(AuthenticationFailed) as refused:
        await auth.tenant_for(None)

    assert await store.ensure_tenant(DEFAULT_TENANT, 0) == within_the_period
    assert "missing_api_key" == refused.value.code


async def test_a_key_created_while_open_works_at_once_and_closes_open_mode() -> None:
    store, clock = InMemoryStore(), Clock()
    auth = await authenticator(store, clock)
    await auth.tenant_for(None)
    key, tenant_id = await add_key(store, "a")

    assert tenant_id == await auth.tenant_for(key)
    with pytest.raises(AuthenticationFailed):
        await auth.tenant_for(None)
