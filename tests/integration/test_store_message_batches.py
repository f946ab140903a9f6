"""Message batches (SPEC §4) on every store: refused requests kept as failed lines, each API showing only its own
batches, paging both ways, lines that never ran, archiving, deleting."""

from __future__ import annotations

import pytest

from backfill import ids
from backfill.domain.batches import Batch, BatchApi, BatchStatus, RequestState
from backfill.domain.message_batches import REFUSED, RefusedRequest, UnrunCounts
from backfill.domain.tenants import TenantChange
from backfill.errors import Conflict, NotFound, QuotaExceeded
from backfill.ports import Store
from tests.support.store_data import DAY_S, MODEL, NOW, add_batch, add_file, add_tenant, current, failed, valid_lines

API_OWNER = "api-1"


async def add_message_batch(
    store: Store, tenant_id: str, refused: list[RefusedRequest] | None = None, *, start: list[int] | None = None
) -> Batch:
    """A message batch as the API creates one: added claimed, with its refused requests, then started (unless
    `start` is None) with the lines that run, then released."""
    record = await add_file(store, tenant_id, purpose="message_batch")
    batch = Batch(
        id=ids.message_batch_id(),
        tenant_id=tenant_id,
        endpoint="/v1/chat/completions",
        input_file_id=record.id,
        completion_window=f"{DAY_S}s",
        status=BatchStatus.VALIDATING,
        created_at=NOW,
        expires_at=NOW + DAY_S,
        model=MODEL,
        api=BatchApi.ANTHROPIC,
    )
    await store.add_message_batch(batch, refused or [], API_OWNER, NOW + 60)
    if start is not None:
        assert await store.start_batch(batch.id, API_OWNER, MODEL, valid_lines(start), NOW)
        await store.release_batch(batch.id, API_OWNER)
    return await current(store, batch.id)


async def end(store: Store, batch: Batch) -> None:
    """Cancel the batch and finish it, as the lifecycle does."""
    await store.request_cancel(batch.tenant_id, batch.id, NOW)
    await store.close_queued_lines(batch.id, RequestState.CANCELLED)
    assert await store.claim_batch(batch.id, "w1", NOW, 60.0)
    assert await store.finish_batch(batch.id, "w1", BatchStatus.CANCELLED, [None, None], NOW + 1)


async def test_refused_requests_are_failed_lines_counted_from_the_start(store: Store) -> None:
    tenant_id = await add_tenant(store)
    refused = [RefusedRequest(2, "b", 40, "unknown model")]

    added = await add_message_batch(store, tenant_id, refused)

    assert (BatchStatus.VALIDATING, 1, 0, 1) == (added.status, added.total, added.completed, added.failed)
    assert not await store.claim_batch(added.id, "dispatcher", NOW, 60.0), "the API holds the claim"
    assert [] == await store.batches_to_tend(NOW)
    assert await store.start_batch(added.id, API_OWNER, MODEL, valid_lines([1, 3]), NOW)
    started = await current(store, added.id)
    assert (BatchStatus.IN_PROGRESS, 3, 0, 1) == (started.status, started.total, started.completed, started.failed)
    assert {"queued": 2, "failed": 1} == await store.line_state_counts(added.id)
    results = [result async for result in store.iter_results(added.id)]
    assert ["request-1", "b", "request-3"] == [result.custom_id for result in results]
    assert (RequestState.FAILED, REFUSED, "unknown model", None) == (
        results[1].state,
        results[1].error_code,
        results[1].error_message,
        results[1].result_id,
    )


async def test_a_claim_held_by_the_api_lapses_like_any_other(store: Store) -> None:
    tenant_id = await add_tenant(store)
    added = await add_message_batch(store, tenant_id)

    assert [added.id] == [batch.id for batch in await store.batches_to_tend(NOW + 61)]
    assert await store.claim_batch(added.id, "dispatcher", NOW + 61, 60.0)


async def test_each_api_shows_only_its_own_batches(store: Store) -> None:
    tenant_id = await add_tenant(store)
    openai = await add_batch(store, tenant_id)
    message = await add_message_batch(store, tenant_id, start=[1])

    assert await store.get_batch(tenant_id, message.id, BatchApi.OPENAI) is None
    assert await store.get_batch(tenant_id, openai.id, BatchApi.ANTHROPIC) is None
    assert message == await store.get_batch(tenant_id, message.id, BatchApi.ANTHROPIC)
    assert message == await store.get_batch(tenant_id, message.id)
    assert ([openai.id], False) == ids_of(await store.list_batches(tenant_id, limit=10, after=None))
    page = await store.list_message_batches(tenant_id, limit=10, before_id=None, after_id=None)
    assert ([message.id], False) == ids_of(page)
    assert await store.list_batches(tenant_id, limit=10, after=message.id) is None
    with pytest.raises(NotFound):
        await store.request_cancel(tenant_id, message.id, NOW, BatchApi.OPENAI)
    cancelled = await store.request_cancel(tenant_id, message.id, NOW, BatchApi.ANTHROPIC)
    assert BatchStatus.CANCELLING == cancelled.status


def ids_of(page: tuple[list[Batch], bool] | None) -> tuple[list[str], bool]:
    assert page is not None
    return [batch.id for batch in page[0]], page[1]


async def test_message_batches_page_newest_first_from_either_cursor(store: Store) -> None:
    acme = await add_tenant(store, "acme")
    globex = await add_tenant(store, "globex")
    made = [(await add_message_batch(store, acme)).id for _ in range(5)]
    theirs = await add_message_batch(store, globex)
    newest_first = made[::-1]

    first = await store.list_message_batches(acme, limit=2, before_id=None, after_id=None)
    older = await store.list_message_batches(acme, limit=2, before_id=None, after_id=newest_first[1])
    oldest = await store.list_message_batches(acme, limit=2, before_id=None, after_id=newest_first[3])
    newer = await store.list_message_batches(acme, limit=2, before_id=made[0], after_id=None)
    newest = await store.list_message_batches(acme, limit=2, before_id=made[2], after_id=None)

    assert (newest_first[0:2], True) == ids_of(first)
    assert (newest_first[2:4], True) == ids_of(older)
    assert (newest_first[4:], False) == ids_of(oldest)
    assert ([made[2], made[1]], True) == ids_of(newer)  # just newer than the cursor, shown newest first
    assert ([made[4], made[3]], False) == ids_of(newest)
    assert await store.list_message_batches(acme, limit=2, before_id=None, after_id=theirs.id) is None
    assert await store.list_message_batches(acme, limit=2, before_id="msgbatch_nope", after_id=None) is None


async def test_unrun_counts_are_the_lines_that_ended_without_running(store: Store) -> None:
    tenant_id = await add_tenant(store)
    cancelled = await add_message_batch(store, tenant_id, [RefusedRequest(1, "r", 0, "bad")], start=[2, 3, 4])
    expired = await add_message_batch(store, tenant_id, start=[1, 2])
    untouched = await add_message_batch(store, tenant_id, start=[1])
    [ran] = await store.lease_lines(cancelled.id, "w1", 1, NOW, 30.0)
    assert 1 == await store.record("w1", [failed(ran)])

    assert 2 == await store.close_queued_lines(cancelled.id, RequestState.CANCELLED)
    assert 2 == await store.close_queued_lines(expired.id, RequestState.EXPIRED)

    counts = await store.unrun_counts([cancelled.id, expired.id, untouched.id, "msgbatch_nope"])
    assert {cancelled.id: UnrunCounts(canceled=2), expired.id: UnrunCounts(expired=2)} == counts
    assert {} == await store.unrun_counts([])


async def test_a_batch_is_archived_once(store: Store) -> None:
    tenant_id = await add_tenant(store)
    batch = await add_message_batch(store, tenant_id, start=[1])

    await store.archive_batch(batch.id, NOW + 10)
    await store.archive_batch(batch.id, NOW + 20)

    assert NOW + 10 == (await current(store, batch.id)).archived_at


async def test_an_ended_message_batch_is_deleted_with_its_lines(store: Store) -> None:
    tenant_id = await add_tenant(store, "acme")
    other = await add_tenant(store, "globex")
    batch = await add_message_batch(store, tenant_id, start=[1, 2])
    openai = await add_batch(store, tenant_id)

    with pytest.raises(Conflict):
        await store.delete_message_batch(tenant_id, batch.id)  # still running
    await end(store, batch)
    with pytest.raises(NotFound):
        await store.delete_message_batch(other, batch.id)
    with pytest.raises(NotFound):
        await store.delete_message_batch(tenant_id, openai.id)
    ended = await current(store, batch.id)

    assert ended == await store.delete_message_batch(tenant_id, batch.id)

    assert await store.get_batch(None, batch.id) is None
    assert {} == await store.line_state_counts(batch.id)
    assert [] == [result async for result in store.iter_results(batch.id)]
    assert await store.get_file(tenant_id, batch.input_file_id) is not None, "the input file is the caller's"
    with pytest.raises(NotFound):
        await store.delete_message_batch(tenant_id, batch.id)


async def test_a_batch_whose_creation_failed_is_discarded_with_its_lines(store: Store) -> None:
    tenant_id = await add_tenant(store)
    batch = await add_message_batch(store, tenant_id, [RefusedRequest(1, "r", 0, "bad")])

    await store.discard_batch(batch.id)

    assert await store.get_batch(None, batch.id) is None
    assert {} == await store.line_state_counts(batch.id)
    assert ([], False) == ids_of(await store.list_message_batches(tenant_id, limit=5, before_id=None, after_id=None))


async def test_message_batches_count_towards_the_batches_in_progress_quota(store: Store) -> None:
    tenant_id = await add_tenant(store)
    await store.update_tenant(tenant_id, TenantChange(quotas={"max_batches_in_progress": 2}))
    await add_batch(store, tenant_id)
    await add_message_batch(store, tenant_id)

    with pytest.raises(QuotaExceeded):
        await add_message_batch(store, tenant_id)
    with pytest.raises(QuotaExceeded):
        await add_batch(store, tenant_id)
