"""Keys to tenants: open mode while no key exists, noticed without making requests wait for the database."""

from __future__ import annotations

import asyncio

import pytest

from backfill.config import Settings
from backfill.domain.keys import make_key
from backfill.domain.tenants import DEFAULT_TENANT, KeyMatch
from backfill.errors import AuthenticationFailed
from backfill.http.auth import Authenticator
from backfill.metrics import Metrics
from backfill.services import Services
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


class KeyCheckingStore(InMemoryStore):
    """Counts the reads a request could wait on: key look-ups."""

    def __init__(self) -> None:
        super().__init__()
        self.look_ups = 0

    async def key_candidates(self, prefix: str) -> list[KeyMatch]:
        self.look_ups += 1
        return await super().key_candidates(prefix)


async def test_a_revoked_key_is_refused_after_the_next_revalidation_and_not_before() -> None:
    store, clock = KeyCheckingStore(), Clock()
    auth = await authenticator(store, clock)
    key, tenant_id = await add_key(store, "a")
    await auth.tenant_for(key)
    (info,) = await store.list_keys()

    await store.revoke_key(info.id, 5)
    still_remembered = await auth.tenant_for(key)
    await auth.revalidate()

    with pytest.raises(AuthenticationFailed) as refused:
        await auth.tenant_for(key)
    assert tenant_id == still_remembered
    assert "invalid_api_key" == refused.value.code


async def test_remembered_keys_cost_no_database_read_and_their_use_is_written_in_the_background() -> None:
    store, clock = KeyCheckingStore(), Clock()
    auth = await authenticator(store, clock)
    key, _ = await add_key(store, "a")

    for _ in range(3):
        await auth.tenant_for(key)
    await auth.revalidate()

    (info,) = await store.list_keys()
    assert 1 == store.look_ups
    assert info.last_used_at is not None


async def test_an_admin_key_is_an_admin_caller_and_open_mode_is_too() -> None:
    store, clock = InMemoryStore(), Clock()
    auth = await authenticator(store, clock)
    open_caller = await auth.caller_for(None)
    tenant_id = await store.ensure_tenant("ops", 0)
    admin_key, tenant_key = make_key(), make_key()
    await store.add_api_key(tenant_id, admin_key, 0, admin=True)
    await store.add_api_key(tenant_id, tenant_key, 0)

    assert (True, True, False) == (
        open_caller.admin,
        (await auth.caller_for(admin_key.plaintext)).admin,
        (await auth.caller_for(tenant_key.plaintext)).admin,
    )
