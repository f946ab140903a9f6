"""Webhook endpoints and the outbox, on every store (see the `store` fixture)."""

from __future__ import annotations

import dataclasses

from backfill import ids
from backfill.domain.batches import BatchApi, BatchStatus, LineError
from backfill.domain.webhooks import DeliveryState, WebhookEndpoint, config_endpoint_id, new_secret
from backfill.ports import Store
from tests.support.store_data import NOW, add_batch, add_tenant, running_batch


async def add_endpoint(store: Store, tenant_id: str, url: str = "http://127.0.0.1:9/hook") -> WebhookEndpoint:
    endpoint = WebhookEndpoint(ids.new_id("whep_"), tenant_id, url, new_secret(), NOW)
    await store.add_webhook_endpoint(endpoint)
    return endpoint


async def complete(store: Store, batch_id: str, now: int = NOW + 10) -> None:
    assert await store.claim_batch(batch_id, "w1", now, 60.0)
    assert await store.mark_finalizing(batch_id, "w1", now)
    assert await store.finish_batch(batch_id, "w1", BatchStatus.COMPLETED, [None, None], now)


async def test_a_finished_batch_queues_one_event_for_each_endpoint_of_its_tenant(store: Store) -> None:
    batch = await running_batch(store, 1)
    first = await add_endpoint(store, batch.tenant_id)
    second = await add_endpoint(store, batch.tenant_id, "http://127.0.0.1:9/other")
    await add_endpoint(store, await add_tenant(store, "someone-else"))

    await complete(store, batch.id)

    leased = await store.lease_deliveries("sender", NOW + 10, 10, 30.0)
    assert [first.id, second.id] == sorted([d.endpoint_id for d in leased], key=[first.id, second.id].index)
    assert {("batch.completed", batch.id, NOW + 10)} == {
        (d.event.type, d.event.batch_id, d.event.created_at) for d in leased
    }
    assert 1 == len({d.event.id for d in leased})  # one event, one webhook-id, to every endpoint


async def test_a_batch_failing_validation_queues_batch_failed(store: Store) -> None:
    tenant_id = await add_tenant(store)
    await add_endpoint(store, tenant_id)
    batch = await add_batch(store, tenant_id)
    assert await store.claim_batch(batch.id, "w1", NOW, 60.0)

    assert await store.fail_batch(batch.id, "w1", "m", [LineError("invalid_json_line", "bad", 1)], NOW + 1)

    assert ["batch.failed"] == [d.event.type for d in await store.lease_deliveries("s", NOW + 1, 10, 30.0)]


async def test_a_message_batch_that_ends_queues_message_batch_ended(store: Store) -> None:
    tenant_id = await add_tenant(store)
    await add_endpoint(store, tenant_id)
    batch = dataclasses.replace(await add_batch(store, tenant_id), id=ids.message_batch_id(), api=BatchApi.ANTHROPIC)
    await store.create_batch(batch)
    assert await store.claim_batch(batch.id, "w1", NOW, 60.0)

    assert await store.finish_batch(batch.id, "w1", BatchStatus.EXPIRED, [None, None], NOW + 2)

    leased = await store.lease_deliveries("s", NOW + 2, 10, 30.0)
    assert [("message_batch.ended", batch.id)] == [(d.event.type, d.event.batch_id) for d in leased]


async def test_a_background_response_or_flex_call_that_ends_queues_no_event(store: Store) -> None:
    tenant_id = await add_tenant(store)
    await add_endpoint(store, tenant_id)
    for api in (BatchApi.RESPONSES, BatchApi.FLEX):
        batch = dataclasses.replace(await add_batch(store, tenant_id), id=ids.response_id(), api=api)
        await store.create_batch(batch)
        assert await store.claim_batch(batch.id, "w1", NOW, 60.0)
        assert await store.fail_batch(batch.id, "w1", "m", [LineError("invalid_request", "bad", 1)], NOW + 2)

    assert [] == await store.lease_deliveries("s", NOW + 2, 10, 30.0)


async def test_no_endpoint_no_delivery_and_distinct_events_have_distinct_ids(store: Store) -> None:
    quiet = await running_batch(store, 1, tenant="quiet")
    await complete(store, quiet.id)
    tenant_id = await add_tenant(store)
    await add_endpoint(store, tenant_id)
    batches = [await running_batch(store, 1) for _ in range(3)]
    for batch in batches:
        await complete(store, batch.id)

    leased = await store.lease_deliveries("s", NOW + 10, 10, 30.0)

    assert sorted(b.id for b in batches) == sorted(d.event.batch_id for d in leased)
    assert 3 == len({d.event.id for d in leased})


async def test_a_leased_delivery_is_not_leased_again_until_its_lease_lapses(store: Store) -> None:
    batch = await running_batch(store, 1)
    await add_endpoint(store, batch.tenant_id)
    await complete(store, batch.id)
    [leased] = await store.lease_deliveries("a", NOW + 10, 10, 30.0)

    assert [] == await store.lease_deliveries("b", NOW + 20, 10, 30.0)
    [again] = await store.lease_deliveries("b", NOW + 41, 10, 30.0)  # "a" died mid-send
    assert not await store.settle_delivery(leased.seq, "a", NOW + 42, delivered=True, retry_at=None, error=None)
    assert await store.settle_delivery(again.seq, "b", NOW + 42, delivered=True, retry_at=None, error=None)

    assert leased.event == again.event
    assert [] == await store.lease_deliveries("c", NOW + 10_000, 10, 30.0)


async def test_a_failed_try_waits_for_its_retry_time_then_dead_letters(store: Store) -> None:
    batch = await running_batch(store, 1)
    await add_endpoint(store, batch.tenant_id)
    await complete(store, batch.id)
    [first] = await store.lease_deliveries("a", NOW + 10, 10, 30.0)
    assert await store.settle_delivery(first.seq, "a", NOW + 11, delivered=False, retry_at=NOW + 20, error="HTTP 500")

    assert [] == await store.lease_deliveries("a", NOW + 19, 10, 30.0)
    [second] = await store.lease_deliveries("a", NOW + 20, 10, 30.0)
    assert 1 == second.attempts
    assert await store.settle_delivery(second.seq, "a", NOW + 21, delivered=False, retry_at=None, error="HTTP 503")

    [dead] = await store.list_deliveries(DeliveryState.DEAD)
    assert (first.event, 2, "HTTP 503", NOW + 21) == (dead.event, dead.attempts, dead.last_error, dead.finished_at)
    assert [] == await store.list_deliveries(DeliveryState.DEAD, await add_tenant(store, "other"))
    assert [] == await store.lease_deliveries("a", NOW + 10_000, 10, 30.0)

    assert await store.redeliver(dead.seq, NOW + 30)
    [retried] = await store.lease_deliveries("a", NOW + 30, 10, 30.0)
    assert first.event.id == retried.event.id


async def test_at_risk_is_announced_once_per_batch(store: Store) -> None:
    batch = await running_batch(store, 1)
    await add_endpoint(store, batch.tenant_id)

    assert 1 == await store.announce_at_risk([batch.id], NOW + 5)
    assert 0 == await store.announce_at_risk([batch.id], NOW + 6)

    [leased] = await store.lease_deliveries("s", NOW + 6, 10, 30.0)
    assert ("batch.at_risk", batch.id, NOW + 5) == (leased.event.type, leased.event.batch_id, leased.event.created_at)


async def test_deleting_an_endpoint_drops_its_deliveries(store: Store) -> None:
    batch = await running_batch(store, 1)
    endpoint = await add_endpoint(store, batch.tenant_id)
    await complete(store, batch.id)

    assert not await store.delete_webhook_endpoint(await add_tenant(store, "other"), endpoint.id)
    assert await store.delete_webhook_endpoint(batch.tenant_id, endpoint.id)

    assert [] == await store.list_webhook_endpoints(batch.tenant_id)
    assert [] == await store.lease_deliveries("s", NOW + 10, 10, 30.0)


async def test_config_endpoints_are_added_updated_and_removed_leaving_admin_ones(store: Store) -> None:
    tenant_id = await add_tenant(store)
    made = await add_endpoint(store, tenant_id)
    url = "http://127.0.0.1:9/config"
    from_config = WebhookEndpoint(config_endpoint_id("acme", url), tenant_id, url, new_secret(), NOW)

    await store.sync_config_endpoints([from_config])
    rotated = dataclasses.replace(from_config, secret=new_secret(), created_at=NOW + 50)
    await store.sync_config_endpoints([rotated])
    kept = await store.list_webhook_endpoints(tenant_id)
    await store.sync_config_endpoints([])

    assert {made, dataclasses.replace(rotated, created_at=NOW)} == set(kept)  # created_at kept from the first sync
    assert [made] == await store.list_webhook_endpoints(tenant_id)
