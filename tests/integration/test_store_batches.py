"""Tenants, files and batches, on every store (see the `store` fixture): paging, isolation, cancel, claims,
finishing."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from sqlalchemy.exc import IntegrityError

from backfill import ids
from backfill.domain.batches import BatchStatus, LineError
from backfill.domain.files import FileRecord
from backfill.domain.keys import make_key
from backfill.domain.tenants import KeyMatch
from backfill.errors import Conflict, NotFound
from backfill.ports import Store
from backfill.testing import ConstraintViolation
from tests.support.store_data import (
    NOW,
    add_batch,
    add_file,
    add_tenant,
    current,
    running_batch,
    start,
    succeeded,
    valid_lines,
)


def output_file(tenant_id: str, batch_id: str, kind: str) -> FileRecord:
    return FileRecord(
        id=ids.file_id(),
        tenant_id=tenant_id,
        filename=f"{batch_id}_{kind}.jsonl",
        purpose="batch_output",
        bytes=10,
        blob_key=f"outputs/{batch_id}/{kind}.jsonl",
        created_at=NOW + 5,
        expires_at=None,
    )


# --- tenants and keys ----------------------------------------------------------------------------------------


async def test_ensure_tenant_is_idempotent_by_name(store: Store) -> None:
    first = await store.ensure_tenant("acme", NOW)
    again = await store.ensure_tenant("acme", NOW + 1)
    other = await store.ensure_tenant("globex", NOW)

    assert first == again
    assert first != other


async def test_api_keys_are_found_by_prefix(store: Store) -> None:
    tenant_id = await add_tenant(store)
    key = make_key()

    key_id = await store.add_api_key(tenant_id, key, NOW)

    assert [KeyMatch(key_id, key.salt, key.key_hash, tenant_id, False)] == await store.key_candidates(key.prefix)
    assert [] == await store.key_candidates("000000000000")
    assert 1 == await store.count_api_keys()


# --- files ---------------------------------------------------------------------------------------------------


async def test_file_is_visible_to_its_tenant_only(store: Store) -> None:
    acme = await add_tenant(store, "acme")
    globex = await add_tenant(store, "globex")
    record = await add_file(store, acme, expires_at=NOW + 60)

    assert record == await store.get_file(acme, record.id)
    assert record == await store.get_file(None, record.id)
    assert await store.get_file(globex, record.id) is None
    assert await store.get_file(acme, "file-missing") is None


async def test_files_page_newest_first_with_cursor(store: Store) -> None:
    acme = await add_tenant(store, "acme")
    globex = await add_tenant(store, "globex")
    made = [(await add_file(store, acme, created_at=NOW + i)).id for i in range(5)]
    await add_file(store, globex)

    pages = []
    after = None
    while True:
        page = await store.list_files(acme, purpose=None, limit=2, descending=True, after=after)
        assert page is not None
        records, has_more = page
        pages.append(([record.id for record in records], has_more))
        if not has_more:
            break
        after = records[-1].id

    newest_first = made[::-1]
    assert [(newest_first[0:2], True), (newest_first[2:4], True), (newest_first[4:], False)] == pages


async def test_files_page_oldest_first(store: Store) -> None:
    acme = await add_tenant(store)
    made = [(await add_file(store, acme)).id for _ in range(3)]

    first = await store.list_files(acme, purpose=None, limit=2, descending=False, after=None)
    assert first is not None
    second = await store.list_files(acme, purpose=None, limit=2, descending=False, after=first[0][-1].id)
    assert second is not None

    assert (made[:2], True) == ([record.id for record in first[0]], first[1])
    assert (made[2:], False) == ([record.id for record in second[0]], second[1])


async def test_files_filter_by_purpose(store: Store) -> None:
    acme = await add_tenant(store)
    batch_file = await add_file(store, acme, purpose="batch")
    await add_file(store, acme, purpose="user_data")

    page = await store.list_files(acme, purpose="batch", limit=10, descending=True, after=None)

    assert ([batch_file], False) == page


async def test_files_exactly_one_page_has_no_more(store: Store) -> None:
    acme = await add_tenant(store)
    for _ in range(2):
        await add_file(store, acme)

    page = await store.list_files(acme, purpose=None, limit=2, descending=True, after=None)

    assert page is not None
    assert (2, False) == (len(page[0]), page[1])


async def test_files_cursor_that_is_unknown_or_another_tenants_gives_none(store: Store) -> None:
    acme = await add_tenant(store, "acme")
    globex = await add_tenant(store, "globex")
    theirs = await add_file(store, globex)
    await add_file(store, acme)

    assert await store.list_files(acme, purpose=None, limit=10, descending=True, after="file-nope") is None
    assert await store.list_files(acme, purpose=None, limit=10, descending=True, after=theirs.id) is None
    assert ([], False) == await store.list_files(globex, purpose=None, limit=10, descending=True, after=theirs.id)


async def test_delete_file_is_refused_while_a_batch_reading_it_runs(store: Store) -> None:
    acme = await add_tenant(store)
    record = await add_file(store, acme)
    batch = await add_batch(store, acme, record.id)

    with pytest.raises(Conflict):
        await store.delete_file(acme, record.id)  # validating
    await start(store, batch.id, [1])
    with pytest.raises(Conflict):
        await store.delete_file(acme, record.id)  # in_progress
    await store.request_cancel(acme, batch.id, NOW)
    with pytest.raises(Conflict):
        await store.delete_file(acme, record.id)  # cancelling

    assert record == await store.get_file(acme, record.id)


async def test_delete_file_is_allowed_once_its_batches_ended(store: Store) -> None:
    acme = await add_tenant(store)
    record = await add_file(store, acme)
    batch = await add_batch(store, acme, record.id)
    assert await store.claim_batch(batch.id, "w1", NOW, 60.0)
    assert await store.fail_batch(batch.id, "w1", None, [LineError("empty_file", "empty")], NOW)

    deleted = await store.delete_file(acme, record.id)

    assert record == deleted
    assert await store.get_file(acme, record.id) is None
    with pytest.raises(NotFound):
        await store.delete_file(acme, record.id)


async def test_delete_of_another_tenants_file_is_not_found(store: Store) -> None:
    acme = await add_tenant(store, "acme")
    globex = await add_tenant(store, "globex")
    record = await add_file(store, acme)

    with pytest.raises(NotFound):
        await store.delete_file(globex, record.id)
    assert record == await store.get_file(acme, record.id)


async def test_expired_files_skip_inputs_of_running_batches(store: Store) -> None:
    acme = await add_tenant(store)
    idle = await add_file(store, acme, expires_at=NOW - 1)
    busy = await add_file(store, acme, expires_at=NOW - 1)
    await add_file(store, acme, expires_at=NOW + 100)
    await add_file(store, acme, expires_at=None)
    await add_batch(store, acme, busy.id)

    assert [idle] == await store.expired_files(NOW)


# --- batches ---------------------------------------------------------------------------------------------


async def test_batch_round_trips(store: Store) -> None:
    acme = await add_tenant(store)
    batch = await add_batch(store, acme)

    assert batch == await store.get_batch(acme, batch.id)
    assert await store.get_batch(await add_tenant(store, "globex"), batch.id) is None


async def test_batches_page_newest_first_per_tenant(store: Store) -> None:
    acme = await add_tenant(store, "acme")
    globex = await add_tenant(store, "globex")
    made = [(await add_batch(store, acme)).id for _ in range(5)]
    theirs = await add_batch(store, globex)

    first = await store.list_batches(acme, limit=3, after=None)
    assert first is not None
    second = await store.list_batches(acme, limit=3, after=first[0][-1].id)
    assert second is not None

    assert (made[:1:-1], True) == ([batch.id for batch in first[0]], first[1])
    assert (made[1::-1], False) == ([batch.id for batch in second[0]], second[1])
    assert ([theirs], False) == await store.list_batches(globex, limit=3, after=None)


async def test_batches_cursor_that_is_unknown_or_another_tenants_gives_none(store: Store) -> None:
    acme = await add_tenant(store, "acme")
    globex = await add_tenant(store, "globex")
    theirs = await add_batch(store, globex)

    assert await store.list_batches(acme, limit=10, after="batch_nope") is None
    assert await store.list_batches(acme, limit=10, after=theirs.id) is None


async def test_fail_batch_keeps_the_line_errors(store: Store) -> None:
    acme = await add_tenant(store)
    batch = await add_batch(store, acme)
    errors = [LineError("invalid_json_line", "bad", 3), LineError("duplicate_custom_id", "dup", 7, "custom_id")]
    assert await store.claim_batch(batch.id, "w1", NOW, 60.0)

    assert not await store.fail_batch(batch.id, "w2", "m", errors, NOW + 1)  # not the claim owner
    assert await store.fail_batch(batch.id, "w1", "m", errors, NOW + 1)

    failed = await current(store, batch.id)
    assert (BatchStatus.FAILED, NOW + 1, errors, "m") == (failed.status, failed.failed_at, failed.errors, failed.model)


# --- cancel ------------------------------------------------------------------------------------------------


async def test_cancel_moves_validating_and_in_progress_to_cancelling(store: Store) -> None:
    acme = await add_tenant(store)
    validating = await add_batch(store, acme)
    running = await running_batch(store, 2)

    for batch in (validating, running):
        cancelled = await store.request_cancel(batch.tenant_id, batch.id, NOW + 7)
        assert (BatchStatus.CANCELLING, NOW + 7) == (cancelled.status, cancelled.cancelling_at)


async def test_cancel_racing_validation_is_never_lost(store: Store) -> None:
    tenant_id = await add_tenant(store)
    for _ in range(20):
        batch = await add_batch(store, tenant_id)
        assert await store.claim_batch(batch.id, "validator", NOW, 60.0)

        cancelled, _ = await asyncio.gather(
            store.request_cancel(tenant_id, batch.id, NOW),
            store.start_batch(batch.id, "validator", "m", valid_lines([1]), NOW),
        )

        assert BatchStatus.CANCELLING == cancelled.status
        assert BatchStatus.CANCELLING == (await current(store, batch.id)).status


async def test_cancel_of_a_cancelling_batch_changes_nothing(store: Store) -> None:
    batch = await running_batch(store, 1)
    await store.request_cancel(batch.tenant_id, batch.id, NOW + 7)

    again = await store.request_cancel(batch.tenant_id, batch.id, NOW + 9)

    assert (BatchStatus.CANCELLING, NOW + 7) == (again.status, again.cancelling_at)


async def test_cancel_of_an_ended_batch_is_a_conflict(store: Store) -> None:
    batch = await running_batch(store, 1)
    assert await store.claim_batch(batch.id, "w1", NOW, 60.0)
    assert await store.mark_finalizing(batch.id, "w1", NOW)
    assert await store.finish_batch(batch.id, "w1", BatchStatus.COMPLETED, [None, None], NOW)

    with pytest.raises(Conflict) as raised:
        await store.request_cancel(batch.tenant_id, batch.id, NOW + 1)
    assert "Cannot cancel a batch with status 'completed'." == raised.value.message
    assert BatchStatus.COMPLETED == (await current(store, batch.id)).status


async def test_cancel_of_another_tenants_batch_is_not_found(store: Store) -> None:
    batch = await running_batch(store, 1, tenant="acme")
    globex = await add_tenant(store, "globex")

    with pytest.raises(NotFound):
        await store.request_cancel(globex, batch.id, NOW)
    assert BatchStatus.IN_PROGRESS == (await current(store, batch.id)).status


# --- claims and finishing --------------------------------------------------------------------------------


async def test_a_claim_is_exclusive_until_it_lapses_or_is_released(store: Store) -> None:
    acme = await add_tenant(store)
    batch = await add_batch(store, acme)

    assert await store.claim_batch(batch.id, "owner-a", NOW, 10.0)
    assert not await store.claim_batch(batch.id, "owner-b", NOW + 5, 10.0)
    assert await store.claim_batch(batch.id, "owner-a", NOW + 5, 10.0)  # renewing one's own claim
    assert not await store.claim_batch(batch.id, "owner-b", NOW + 14, 10.0)
    assert await store.claim_batch(batch.id, "owner-b", NOW + 16, 10.0)  # lapsed
    assert not await store.claim_batch(batch.id, "owner-a", NOW + 17, 10.0)

    await store.release_batch(batch.id, "owner-a")  # not the holder: no effect
    assert not await store.claim_batch(batch.id, "owner-a", NOW + 17, 10.0)
    await store.release_batch(batch.id, "owner-b")
    assert await store.claim_batch(batch.id, "owner-a", NOW + 17, 10.0)


async def test_concurrent_claims_have_one_winner(store: Store) -> None:
    acme = await add_tenant(store)
    batch = await add_batch(store, acme)

    won = await asyncio.gather(*(store.claim_batch(batch.id, f"owner-{i}", NOW, 10.0) for i in range(8)))

    assert 1 == sum(won)


async def test_claimed_batches_are_not_offered_for_tending(store: Store) -> None:
    acme = await add_tenant(store)
    batch = await add_batch(store, acme)
    assert [batch.id] == [b.id for b in await store.batches_to_tend(NOW)]

    assert await store.claim_batch(batch.id, "owner-a", NOW, 10.0)

    assert [] == await store.batches_to_tend(NOW + 5)
    assert [batch.id] == [b.id for b in await store.batches_to_tend(NOW + 11)]


async def test_finish_registers_files_and_sets_the_terminal_status(store: Store) -> None:
    batch = await running_batch(store, 2)
    [line, _] = await store.lease_lines(batch.id, "w1", 2, NOW, 30.0)
    await store.record("w1", [succeeded(line)])
    assert await store.claim_batch(batch.id, "w1", NOW, 60.0)
    output = output_file(batch.tenant_id, batch.id, "output")
    error = output_file(batch.tenant_id, batch.id, "error")

    assert await store.finish_batch(batch.id, "w1", BatchStatus.EXPIRED, [output, error], NOW + 9)

    done = await current(store, batch.id)
    assert (BatchStatus.EXPIRED, NOW + 9, output.id, error.id) == (
        done.status,
        done.expired_at,
        done.output_file_id,
        done.error_file_id,
    )
    assert output == await store.get_file(batch.tenant_id, output.id)
    assert error == await store.get_file(batch.tenant_id, error.id)
    assert await store.claim_batch(batch.id, "w2", NOW + 10, 60.0)  # the claim was released


async def test_only_the_claim_owner_can_finish(store: Store) -> None:
    batch = await running_batch(store, 1)
    assert await store.claim_batch(batch.id, "owner-a", NOW, 60.0)
    output = output_file(batch.tenant_id, batch.id, "output")

    assert not await store.finish_batch(batch.id, "owner-b", BatchStatus.COMPLETED, [output, None], NOW)

    unchanged = await current(store, batch.id)
    assert (BatchStatus.IN_PROGRESS, None, None) == (unchanged.status, unchanged.completed_at, unchanged.output_file_id)
    assert await store.get_file(None, output.id) is None


async def test_a_finished_batch_cannot_be_finished_again(store: Store) -> None:
    batch = await running_batch(store, 1)
    assert await store.claim_batch(batch.id, "w1", NOW, 60.0)
    first = output_file(batch.tenant_id, batch.id, "output")
    assert await store.mark_finalizing(batch.id, "w1", NOW)
    assert await store.finish_batch(batch.id, "w1", BatchStatus.COMPLETED, [first, None], NOW)
    assert await store.claim_batch(batch.id, "w1", NOW, 60.0)
    second = output_file(batch.tenant_id, batch.id, "output")

    assert not await store.finish_batch(batch.id, "w1", BatchStatus.CANCELLED, [second, None], NOW + 1)

    done = await current(store, batch.id)
    assert (BatchStatus.COMPLETED, first.id, None) == (done.status, done.output_file_id, done.cancelled_at)
    assert await store.get_file(None, second.id) is None


async def test_a_batch_cancelled_before_finalizing_cannot_end_completed(store: Store) -> None:
    batch = await running_batch(store, 1)
    assert await store.claim_batch(batch.id, "w1", NOW, 60.0)
    await store.request_cancel(batch.tenant_id, batch.id, NOW)

    assert not await store.mark_finalizing(batch.id, "w1", NOW)
    assert not await store.finish_batch(batch.id, "w1", BatchStatus.COMPLETED, [None, None], NOW)
    assert await store.finish_batch(batch.id, "w1", BatchStatus.CANCELLED, [None, None], NOW)
    assert BatchStatus.CANCELLED == (await current(store, batch.id)).status


async def test_finish_is_all_or_nothing(store: Store) -> None:
    batch = await running_batch(store, 1)
    assert await store.claim_batch(batch.id, "w1", NOW, 60.0)
    existing = await add_file(store, batch.tenant_id)
    output = output_file(batch.tenant_id, batch.id, "output")
    clashing = dataclasses.replace(existing, purpose="batch_output")  # an id that exists: the insert fails
    assert await store.mark_finalizing(batch.id, "w1", NOW)

    with pytest.raises((IntegrityError, ConstraintViolation)):  # a reused id: a bug, refused by either store
        await store.finish_batch(batch.id, "w1", BatchStatus.COMPLETED, [output, clashing], NOW)

    unchanged = await current(store, batch.id)
    assert (BatchStatus.FINALIZING, None, None) == (unchanged.status, unchanged.output_file_id, unchanged.completed_at)
    assert await store.get_file(None, output.id) is None


async def test_finalizing_needs_the_claim(store: Store) -> None:
    batch = await running_batch(store, 1)
    assert await store.claim_batch(batch.id, "owner-a", NOW, 60.0)

    await store.mark_finalizing(batch.id, "owner-b", NOW + 1)
    assert BatchStatus.IN_PROGRESS == (await current(store, batch.id)).status
    await store.mark_finalizing(batch.id, "owner-a", NOW + 2)

    finalizing = await current(store, batch.id)
    assert (BatchStatus.FINALIZING, NOW + 2) == (finalizing.status, finalizing.finalizing_at)
