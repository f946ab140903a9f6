"""Tenants, API keys and quotas, on every store (see the `store` fixture)."""

from __future__ import annotations

import dataclasses

import pytest

from backfill import ids
from backfill.domain.batches import BatchStatus
from backfill.domain.keys import make_key
from backfill.domain.tenants import Tenant, TenantChange
from backfill.errors import Conflict, QuotaExceeded, TokenRateExceeded
from backfill.ports import Store
from tests.support.store_data import MODEL, NOW, VALIDATOR, add_batch, add_file, add_tenant, valid_lines


def a_tenant(name: str = "research", **quotas: int) -> Tenant:
    return Tenant(ids.new_id("tenant_", 8), name, 1.0, NOW, **quotas)


async def test_a_tenant_is_created_listed_and_updated(store: Store) -> None:
    tenant = a_tenant(enqueued_token_limit=1000, max_batches_in_progress=3)
    await store.create_tenant(tenant)

    updated = await store.update_tenant(
        tenant.id,
        TenantChange(weight=3.0, quotas={"batch_creates_per_minute": 5}, cleared=frozenset({"enqueued_token_limit"})),
    )

    expected = dataclasses.replace(
        tenant, weight=3.0, enqueued_token_limit=None, batch_creates_per_minute=5, max_batches_in_progress=3
    )
    assert expected == updated
    assert expected == await store.get_tenant("research")
    assert expected == await store.get_tenant(tenant.id)
    assert [expected] == await store.list_tenants()
    assert await store.get_tenant("nobody") is None


async def test_a_second_tenant_with_the_same_name_is_refused(store: Store) -> None:
    await store.create_tenant(a_tenant())

    with pytest.raises(Conflict):
        await store.create_tenant(a_tenant())


async def test_keys_are_listed_found_and_revoked(store: Store) -> None:
    tenant_id = await add_tenant(store)
    key = make_key()
    key_id = await store.add_api_key(tenant_id, key, NOW, admin=True)
    other_id = await store.add_api_key(tenant_id, make_key(), NOW + 1)

    assert await store.revoke_key(key_id, NOW + 5)
    assert not await store.revoke_key(key_id, NOW + 6)

    listed = await store.list_keys(tenant_id)
    assert [key_id, other_id] == [info.id for info in listed]
    assert (f"bf-{key.prefix}", "acme", True, NOW + 5) == (
        listed[0].prefix,
        listed[0].tenant,
        listed[0].admin,
        listed[0].revoked_at,
    )
    assert listed[0] == await store.find_key(f"bf-{key.prefix}")
    assert listed[0] == await store.find_key(key_id)
    assert [] == await store.key_candidates(key.prefix)
    assert {key_id, "key_gone"} == await store.revoked_among([key_id, other_id, "key_gone"])
    assert [] == await store.list_keys(await add_tenant(store, "globex"))


async def test_last_use_is_recorded_and_never_goes_back(store: Store) -> None:
    key_id = await store.add_api_key(await add_tenant(store), make_key(), NOW)

    await store.record_key_use({key_id: NOW + 10})
    await store.record_key_use({key_id: NOW + 5})

    found = await store.find_key(key_id)
    assert found is not None
    assert NOW + 10 == found.last_used_at


async def test_a_tenants_data_moves_to_another(store: Store) -> None:
    source, target = await add_tenant(store, "default"), await add_tenant(store, "research")
    batch = await add_batch(store, source)

    assert (1, 1) == await store.move_tenant_data(source, target)

    assert await store.get_batch(source, batch.id) is None
    assert await store.get_batch(target, batch.id) is not None
    assert await store.get_file(target, batch.input_file_id) is not None


async def test_batches_in_progress_are_limited(store: Store) -> None:
    tenant = a_tenant(max_batches_in_progress=1)
    await store.create_tenant(tenant)
    await add_batch(store, tenant.id)

    with pytest.raises(QuotaExceeded) as refused:
        await add_batch(store, tenant.id)

    assert "batch_limit_exceeded" == refused.value.code


async def test_batch_creates_per_minute_are_limited_with_a_retry_after(store: Store) -> None:
    tenant = a_tenant(batch_creates_per_minute=2)
    await store.create_tenant(tenant)
    for _ in range(2):
        await add_batch(store, tenant.id)

    with pytest.raises(QuotaExceeded) as refused:
        await add_batch(store, tenant.id)

    assert ("rate_limit_exceeded", 60) == (refused.value.code, refused.value.retry_after_s)


async def test_batch_tokens_per_minute_refuse_a_start(store: Store) -> None:
    tenant = a_tenant(batch_tokens_per_minute=50)  # each line is 22 tokens
    await store.create_tenant(tenant)
    first, second = await add_batch(store, tenant.id), await add_batch(store, tenant.id)
    for batch in (first, second):
        assert await store.claim_batch(batch.id, VALIDATOR, NOW, 60.0)
    assert await store.start_batch(first.id, VALIDATOR, MODEL, valid_lines([1, 2]), NOW)

    with pytest.raises(TokenRateExceeded):
        await store.start_batch(second.id, VALIDATOR, MODEL, valid_lines([1]), NOW + 30)
    assert await store.start_batch(second.id, VALIDATOR, MODEL, valid_lines([1]), NOW + 61)
    started = await store.get_batch(None, second.id)
    assert started is not None
    assert BatchStatus.IN_PROGRESS == started.status


async def test_a_tenant_without_quotas_is_not_limited(store: Store) -> None:
    tenant_id = await add_tenant(store)
    file = await add_file(store, tenant_id)
    for _ in range(5):
        await add_batch(store, tenant_id, file.id)

    assert 5 == len((await store.list_batches(tenant_id, limit=10, after=None) or ([], False))[0])
