"""The usage rows' contract, on every store: batch lines add to them in the group commit that writes them (never
a fenced-off one), interactive counts add up, ended batches are read for the SLA report."""

from __future__ import annotations

import msgspec

from backfill.domain.batches import BatchStatus, RequestState
from backfill.domain.usage import Usage
from backfill.domain.usage_report import Capacity, UsageCounts, UsageKey, UsageKind, row_start
from backfill.ports import Store
from tests.support.store_data import DAY_S, MODEL, NOW, current, failed, running_batch, succeeded

TTL_S = 30.0


async def test_record_adds_usage_of_written_successes_only(store: Store) -> None:
    batch = await running_batch(store, 3)
    lines = await store.lease_lines(batch.id, "w1", 3, NOW, TTL_S)
    updates = [
        msgspec.structs.replace(succeeded(lines[0], Usage(10, 2, 5, 0)), capacity=Capacity.HARVESTED, finished_at=NOW),
        msgspec.structs.replace(
            succeeded(lines[1], Usage(20, 0, 7, 0)), capacity=Capacity.PROMOTED, finished_at=NOW + 1
        ),
        failed(lines[2]),
    ]

    await store.record("w1", updates)

    key = UsageKey(batch.tenant_id, MODEL, row_start(NOW), UsageKind.BATCH)
    expected = UsageCounts(2, 30, 2, 12, harvested_tokens=15, promoted_tokens=27)
    assert [(key, expected)] == await store.usage_rows(NOW - 60, NOW + 60)


async def test_a_fenced_off_result_adds_no_usage(store: Store) -> None:
    batch = await running_batch(store, 2)
    [stale] = await store.lease_lines(batch.id, "owner-a", 1, NOW, 1.0)
    [kept] = await store.lease_lines(batch.id, "owner-a", 1, NOW, 1000.0)
    await store.reclaim_lapsed_leases(NOW + 10)
    await store.lease_lines(batch.id, "owner-b", 1, NOW + 10, TTL_S)

    await store.record(
        "owner-a",
        [
            msgspec.structs.replace(succeeded(stale, Usage(100, 0, 100, 0)), finished_at=NOW),
            msgspec.structs.replace(succeeded(kept, Usage(5, 0, 1, 0)), finished_at=NOW),
        ],
    )

    [(_, counts)] = await store.usage_rows(NOW - 60, NOW + 60)
    assert UsageCounts(1, 5, 0, 1, dedicated_tokens=6) == counts
    assert (await current(store, batch.id)).usage == Usage(5, 0, 1, 0)


async def test_the_same_line_reported_twice_is_counted_once(store: Store) -> None:
    batch = await running_batch(store, 1)
    [line] = await store.lease_lines(batch.id, "w1", 1, NOW, TTL_S)
    update = msgspec.structs.replace(succeeded(line, Usage(3, 0, 4, 0)), finished_at=NOW)

    await store.record("w1", [update])
    await store.record("w1", [update])

    [(_, counts)] = await store.usage_rows(NOW - 60, NOW + 60)
    assert 1 == counts.requests


async def test_interactive_usage_adds_up_and_is_read_per_tenant(store: Store) -> None:
    one = UsageKey("tenant-a", "m", row_start(NOW), UsageKind.INTERACTIVE)
    two = UsageKey("tenant-b", "m", row_start(NOW), UsageKind.INTERACTIVE)

    await store.add_usage({one: UsageCounts(1, 10, 0, 5), two: UsageCounts(1, 1, 0, 1)})
    await store.add_usage({one: UsageCounts(2, 20, 4, 6)})

    assert [(one, UsageCounts(3, 30, 4, 11))] == await store.usage_rows(NOW - 60, NOW + 60, "tenant-a")
    assert 2 == len(await store.usage_rows(NOW - 60, NOW + 60))
    assert [] == await store.usage_rows(NOW + 60, NOW + 120)


async def test_ended_batches_carry_turnaround_and_expired_lines(store: Store) -> None:
    batch = await running_batch(store, 3)
    lines = await store.lease_lines(batch.id, "w1", 1, NOW, TTL_S)
    await store.record("w1", [succeeded(lines[0])])
    await store.close_queued_lines(batch.id, RequestState.EXPIRED)
    assert await store.claim_batch(batch.id, "w1", NOW, 60.0)
    assert await store.finish_batch(batch.id, "w1", BatchStatus.EXPIRED, [None, None], NOW + 100)

    [ended] = await store.ended_batches(NOW, NOW + DAY_S)

    assert ("expired", NOW + 100, 2) == (ended.status, ended.ended_at, ended.lines_expired)
    assert [] == await store.ended_batches(NOW + 101, NOW + DAY_S)
    assert [] == await store.ended_batches(NOW, NOW + DAY_S, "another-tenant")


async def test_one_commit_over_two_batches_of_one_tenant_adds_to_one_row(store: Store) -> None:
    one = await running_batch(store, 2)
    two = await running_batch(store, 1)
    lines = await store.lease_lines(one.id, "w1", 2, NOW, TTL_S) + await store.lease_lines(two.id, "w1", 1, NOW, TTL_S)

    await store.record(
        "w1", [msgspec.structs.replace(succeeded(line, Usage(2, 0, 1, 0)), finished_at=NOW) for line in lines]
    )

    [(key, counts)] = await store.usage_rows(NOW - 60, NOW + 60)
    assert (one.tenant_id, UsageCounts(3, 6, 0, 3, dedicated_tokens=9)) == (key.tenant_id, counts)
