"""The line queue's contract, on every store (see the `store` fixture): leases with fencing, group commit,
reclaim, results in order. Tests marked SQL-only look behind the port with SQL and take `sql_store`."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import bindparam, update

from backfill.domain.batches import BatchStatus, RequestState
from backfill.domain.leases import LineUpdate
from backfill.domain.usage import Usage
from backfill.domain.valid_lines import ValidLine, group_by_prefix
from backfill.errors import TokenLimitExceeded
from backfill.ports import Store
from backfill.store.sql import SqlStore
from backfill.store.tables import batches, requests
from tests.support.store_data import (
    NOW,
    add_batch,
    add_tenant,
    current,
    failed,
    line_rows,
    requeued,
    running_batch,
    succeeded,
    valid_lines,
)

TTL_S = 30.0


# --- start_batch ----------------------------------------------------------------------------------------


async def test_start_batch_inserts_every_line_queued(store: Store) -> None:
    batch = await running_batch(store, [1, 2, 4, 7])

    assert BatchStatus.IN_PROGRESS == batch.status
    assert NOW == batch.in_progress_at
    assert "m" == batch.model
    assert (4, 0, 0) == (batch.total, batch.completed, batch.failed)
    assert {"queued": 4} == await store.line_state_counts(batch.id)
    assert 4 * 22 == await store.enqueued_tokens(batch.tenant_id, "m")


async def test_start_batch_needs_the_claim_and_a_validating_batch(store: Store) -> None:
    tenant_id = await add_tenant(store)
    batch = await add_batch(store, tenant_id)
    assert await store.claim_batch(batch.id, "owner-a", NOW, 60.0)

    assert not await store.start_batch(batch.id, "owner-b", "m", valid_lines([1]), NOW)
    assert await store.start_batch(batch.id, "owner-a", "m", valid_lines([1]), NOW)
    assert not await store.start_batch(batch.id, "owner-a", "m", valid_lines([1]), NOW)  # no longer validating
    assert {"queued": 1} == await store.line_state_counts(batch.id)


async def test_start_batch_over_the_token_limit_changes_nothing(store: Store) -> None:
    tenant_id = await add_tenant(store)
    batch = await add_batch(store, tenant_id)
    assert await store.claim_batch(batch.id, "v", NOW, 60.0)

    with pytest.raises(TokenLimitExceeded) as raised:
        await store.start_batch(batch.id, "v", "m", valid_lines([1, 2]), NOW, token_limit=43)

    assert (0, 44, 43) == (raised.value.enqueued, raised.value.wanted, raised.value.limit)
    assert BatchStatus.VALIDATING == (await store.get_batch(None, batch.id)).status  # type: ignore[union-attr]
    assert {} == await store.line_state_counts(batch.id)
    assert await store.start_batch(batch.id, "v", "m", valid_lines([1, 2]), NOW, token_limit=44)


async def test_two_batches_started_at_once_cannot_both_slip_under_the_token_limit(store: Store) -> None:
    tenant_id = await add_tenant(store)
    first, second = await add_batch(store, tenant_id), await add_batch(store, tenant_id)
    for batch in (first, second):
        assert await store.claim_batch(batch.id, "v", NOW, 60.0)

    outcomes = await asyncio.gather(
        *(store.start_batch(b.id, "v", "m", valid_lines([1, 2, 3]), NOW, token_limit=100) for b in (first, second)),
        return_exceptions=True,
    )

    assert [True] == [outcome for outcome in outcomes if outcome is True]
    assert 1 == sum(isinstance(outcome, TokenLimitExceeded) for outcome in outcomes)
    assert 66 == await store.enqueued_tokens(tenant_id, "m")


# --- lease_lines ------------------------------------------------------------------------------------------


async def test_lease_takes_the_lowest_line_numbers_up_to_the_limit(store: Store) -> None:
    batch = await running_batch(store, 5)

    first = await store.lease_lines(batch.id, "w1", 3, NOW, TTL_S)
    second = await store.lease_lines(batch.id, "w1", 3, NOW, TTL_S)
    third = await store.lease_lines(batch.id, "w1", 3, NOW, TTL_S)

    assert [1, 2, 3] == [line.line_no for line in first]
    assert [4, 5] == [line.line_no for line in second]
    assert [] == third
    line = first[0]
    assert (batch.id, "request-1", 100, 90, 0, 1, 22) == (
        line.batch_id,
        line.custom_id,
        line.offset,
        line.length,
        line.attempts,
        line.lease_seq,
        line.est_prompt_tokens,
    )
    assert {"leased": 5} == await store.line_state_counts(batch.id)


async def test_lease_only_takes_lines_of_its_batch(store: Store) -> None:
    one = await running_batch(store, 2)
    two = await running_batch(store, 2)

    leased = await store.lease_lines(one.id, "w1", 10, NOW, TTL_S)

    assert {one.id} == {line.batch_id for line in leased}
    assert {"queued": 2} == await store.line_state_counts(two.id)


async def test_lease_waits_for_next_attempt_at(store: Store) -> None:
    batch = await running_batch(store, 3)
    [line] = await store.lease_lines(batch.id, "w1", 1, NOW, TTL_S)
    await store.record("w1", [requeued(line, NOW + 10)])

    early = await store.lease_lines(batch.id, "w1", 10, NOW + 5, TTL_S)
    later = await store.lease_lines(batch.id, "w1", 10, NOW + 10, TTL_S)

    assert [2, 3] == [line.line_no for line in early]
    assert [1] == [line.line_no for line in later]
    assert (1, 2) == (later[0].attempts, later[0].lease_seq)


async def test_two_owners_never_lease_the_same_line(store: Store) -> None:
    batch = await running_batch(store, 5)

    a = await store.lease_lines(batch.id, "owner-a", 2, NOW, TTL_S)
    b = await store.lease_lines(batch.id, "owner-b", 10, NOW, TTL_S)

    assert [1, 2] == [line.line_no for line in a]
    assert [3, 4, 5] == [line.line_no for line in b]
    rows = await line_rows(store, batch.id)
    assert ["owner-a"] * 2 + ["owner-b"] * 3 == [rows[n][1] for n in range(1, 6)]


async def test_concurrent_leases_never_share_a_line(store: Store) -> None:
    batch = await running_batch(store, 60)
    owners = [f"owner-{i}" for i in range(12)]

    results = await asyncio.gather(*(store.lease_lines(batch.id, owner, 7, NOW, TTL_S) for owner in owners))
    rest = await store.lease_lines(batch.id, "late-owner", 100, NOW, TTL_S)

    assert all(len(leased) <= 7 for leased in results)
    taken = [line.line_no for leased in [*results, rest] for line in leased]
    assert list(range(1, 61)) == sorted(taken)  # every line exactly once
    rows = await line_rows(store, batch.id)
    for owner, leased in zip([*owners, "late-owner"], [*results, rest], strict=True):
        assert all(rows[line.line_no][1] == owner for line in leased)


# --- record: group commit ------------------------------------------------------------------------------------


async def test_record_moves_counters_and_usage_by_exactly_what_was_written(store: Store) -> None:
    batch = await running_batch(store, 5)
    lines = await store.lease_lines(batch.id, "w1", 5, NOW, TTL_S)
    updates = [
        succeeded(lines[0], Usage(10, 2, 5, 1)),
        succeeded(lines[1], Usage(20, 0, 7, 0)),
        failed(lines[2]),
        failed(lines[3], status_code=None),
        requeued(lines[4], NOW + 3),
    ]

    written = await store.record("w1", updates)

    assert 5 == written
    after = await current(store, batch.id)
    assert (5, 2, 2) == (after.total, after.completed, after.failed)
    assert Usage(30, 2, 12, 1) == after.usage
    assert {"succeeded": 2, "failed": 2, "queued": 1} == await store.line_state_counts(batch.id)
    assert ("queued", None, 1, 1) == (await line_rows(store, batch.id))[5]
    assert 22 == await store.enqueued_tokens(batch.tenant_id, "m")  # only the requeued line is still open


async def test_record_accumulates_over_many_commits_and_batches(store: Store) -> None:
    one = await running_batch(store, 4)
    two = await running_batch(store, 3)
    lines_one = await store.lease_lines(one.id, "w1", 4, NOW, TTL_S)
    lines_two = await store.lease_lines(two.id, "w1", 3, NOW, TTL_S)

    assert 4 == await store.record("w1", [succeeded(lines_one[0], Usage(1, 0, 1, 0)), *map(failed, lines_two)])
    assert 3 == await store.record("w1", [succeeded(line, Usage(1, 0, 1, 0)) for line in lines_one[1:]])

    first, second = await current(store, one.id), await current(store, two.id)
    assert (4, 0, Usage(4, 0, 4, 0)) == (first.completed, first.failed, first.usage)
    assert (0, 3, Usage()) == (second.completed, second.failed, second.usage)


async def test_executemany_update_rowcount_is_the_sum_of_matched_rows(sql_store: SqlStore) -> None:
    """SQL-only. SqlStore's group commit trusts rowcount of an executemany UPDATE to count the rows all its
    statements hit."""
    store = sql_store
    batch = await running_batch(store, 6)
    statement = (
        update(requests)
        .where(requests.c.batch_id == batch.id, requests.c.line_no == bindparam("_line"))
        .values(attempts=bindparam("_attempts"))
    )

    async with store.engine.begin() as conn:
        result = await conn.execute(statement, [{"_line": n, "_attempts": 1} for n in (1, 2, 99, 3, 4, 98)])

    assert 4 == result.rowcount


async def test_record_returns_lines_written_on_the_fast_path(store: Store) -> None:
    batch = await running_batch(store, 40)
    lines = await store.lease_lines(batch.id, "w1", 40, NOW, TTL_S)

    written = await store.record("w1", [succeeded(line, Usage(3, 1, 2, 0)) for line in lines])

    assert 40 == written
    after = await current(store, batch.id)
    assert (40, 0, Usage(120, 40, 80, 0)) == (after.completed, after.failed, after.usage)


async def test_stale_lease_cannot_write_and_counters_stay_right(store: Store) -> None:
    batch = await running_batch(store, 3)
    [stale] = await store.lease_lines(batch.id, "owner-a", 1, NOW, 1.0)  # line 1, lapses soon
    [kept] = await store.lease_lines(batch.id, "owner-a", 1, NOW, 1000.0)  # line 2, still held
    assert 1 == await store.reclaim_lapsed_leases(NOW + 10)
    [taken_over] = await store.lease_lines(batch.id, "owner-b", 1, NOW + 10, TTL_S)
    assert (1, 2) == (taken_over.line_no, taken_over.lease_seq)

    written = await store.record(
        "owner-a", [succeeded(stale, Usage(100, 0, 100, 0)), succeeded(kept, Usage(5, 0, 1, 0))]
    )

    assert 1 == written
    after = await current(store, batch.id)
    assert (1, 0, Usage(5, 0, 1, 0)) == (after.completed, after.failed, after.usage)
    assert ("leased", "owner-b", 2, 0) == (await line_rows(store, batch.id))[1]

    assert 1 == await store.record("owner-b", [succeeded(taken_over, Usage(7, 0, 3, 0))])

    after = await current(store, batch.id)
    assert (2, 0, Usage(12, 0, 4, 0)) == (after.completed, after.failed, after.usage)


async def test_a_lost_lease_in_one_batch_leaves_the_other_batchs_writes_in_the_same_commit(store: Store) -> None:
    """One group commit over two batches: the first lands whole (its update kept as it is), the second lost a
    lease (its update undone and made again knowing which lines it lands); each batch counts exactly its own."""
    one = await running_batch(store, 2)
    two = await running_batch(store, 2)
    lines_one = await store.lease_lines(one.id, "owner-a", 2, NOW, TTL_S)
    [stale] = await store.lease_lines(two.id, "owner-a", 1, NOW, 1.0)
    [kept] = await store.lease_lines(two.id, "owner-a", 1, NOW, 1000.0)
    assert 1 == await store.reclaim_lapsed_leases(NOW + 10)

    updates = [succeeded(line, Usage(2, 0, 1, 0)) for line in lines_one]
    updates += [succeeded(stale, Usage(100, 0, 100, 0)), succeeded(kept, Usage(5, 0, 1, 0))]
    written = await store.record("owner-a", updates)

    assert 3 == written
    first, second = await current(store, one.id), await current(store, two.id)
    assert (2, 0, Usage(4, 0, 2, 0)) == (first.completed, first.failed, first.usage)
    assert (1, 0, Usage(5, 0, 1, 0)) == (second.completed, second.failed, second.usage)
    assert {"succeeded": 1, "queued": 1} == await store.line_state_counts(two.id)
    [(_, counts)] = await store.usage_rows(0, NOW + 3600)  # the lines' usage minute: finished_at 0
    assert (3, 9) == (counts.requests, counts.input_tokens)


async def test_results_of_a_batch_removed_meanwhile_are_dropped(store: Store) -> None:
    batch = await running_batch(store, 2)
    lines = await store.lease_lines(batch.id, "w1", 2, NOW, TTL_S)
    await store.discard_batch(batch.id)

    assert 0 == await store.record("w1", [succeeded(line) for line in lines])
    assert [] == await store.usage_rows(0, NOW + 3600)


async def test_stale_requeue_and_failure_are_dropped(store: Store) -> None:
    batch = await running_batch(store, 2)
    old = await store.lease_lines(batch.id, "owner-a", 2, NOW, 1.0)
    await store.reclaim_lapsed_leases(NOW + 10)
    new = await store.lease_lines(batch.id, "owner-b", 2, NOW + 10, TTL_S)

    written = await store.record("owner-a", [requeued(old[0], NOW + 60), failed(old[1])])

    assert 0 == written
    after = await current(store, batch.id)
    assert (0, 0) == (after.completed, after.failed)
    rows = await line_rows(store, batch.id)
    assert [("leased", "owner-b", 2, 0), ("leased", "owner-b", 2, 0)] == [rows[1], rows[2]]
    assert 2 == await store.record("owner-b", [failed(new[0]), failed(new[1])])
    assert (0, 2) == ((after := await current(store, batch.id)).completed, after.failed)


async def test_recount_does_not_lose_a_concurrent_commits_increment(sql_store: SqlStore) -> None:
    """SQL-only (PostgreSQL). SqlStore's recount waits for a group commit that already holds the batch row, then
    counts its lines too."""
    store = sql_store
    if not store.is_postgres:
        pytest.skip("SQLite runs one write transaction at a time")
    batch = await running_batch(store, 2)
    [line_1] = await store.lease_lines(batch.id, "owner-a", 1, NOW, TTL_S)
    [stale] = await store.lease_lines(batch.id, "owner-b", 1, NOW, 1.0)
    await store.reclaim_lapsed_leases(NOW + 10)
    [line_2] = await store.lease_lines(batch.id, "owner-c", 1, NOW + 10, TTL_S)
    async with store.engine.connect() as other:
        # owner-a's group commit, caught between its counter update and its COMMIT
        await other.begin()
        await other.execute(
            update(requests).where(requests.c.id == line_1.id).values(state="succeeded", input_tokens=5)
        )
        await other.execute(update(batches).where(batches.c.id == batch.id).values(completed=1, input_tokens=5))
        # owner-b's write is stale: dropped, it makes record() recount, which has to wait for owner-a
        recount = asyncio.create_task(store.record("owner-b", [succeeded(stale)]))
        await asyncio.sleep(0.3)
        assert not recount.done()
        await other.commit()
    assert 0 == await recount

    after = await current(store, batch.id)
    assert (1, 0, 5) == (after.completed, after.failed, after.usage.input_tokens)
    assert 1 == await store.record("owner-c", [succeeded(line_2, Usage(2, 0, 1, 0))])
    after = await current(store, batch.id)
    assert (2, 0, 7) == (after.completed, after.failed, after.usage.input_tokens)


async def test_same_owner_with_an_older_lease_seq_cannot_write(store: Store) -> None:
    batch = await running_batch(store, 1)
    [first] = await store.lease_lines(batch.id, "owner-a", 1, NOW, 1.0)
    await store.reclaim_lapsed_leases(NOW + 10)
    [second] = await store.lease_lines(batch.id, "owner-a", 1, NOW + 10, TTL_S)

    assert 0 == await store.record("owner-a", [succeeded(first, Usage(9, 0, 9, 0))])
    assert 1 == await store.record("owner-a", [succeeded(second, Usage(1, 0, 1, 0))])

    after = await current(store, batch.id)
    assert (1, 0, Usage(1, 0, 1, 0)) == (after.completed, after.failed, after.usage)


async def test_a_line_is_counted_once_even_if_reported_twice(store: Store) -> None:
    batch = await running_batch(store, 2)
    lines = await store.lease_lines(batch.id, "w1", 2, NOW, TTL_S)

    written = await store.record("w1", [succeeded(lines[0]), failed(lines[0]), succeeded(lines[1])])

    assert 2 == written
    after = await current(store, batch.id)
    assert (2, 0) == (after.completed, after.failed)
    assert 0 == await store.record("w1", [succeeded(lines[1])])
    assert (2, 0) == ((after := await current(store, batch.id)).completed, after.failed)


# --- reclaim, renew, close ---------------------------------------------------------------------------------


async def test_reclaim_returns_only_lapsed_leases_to_the_queue_uncharged(store: Store) -> None:
    batch = await running_batch(store, 3)
    await store.lease_lines(batch.id, "owner-a", 1, NOW, 5.0)
    await store.lease_lines(batch.id, "owner-b", 1, NOW, 50.0)

    assert 0 == await store.reclaim_lapsed_leases(NOW + 5)  # not yet past its expiry
    assert 1 == await store.reclaim_lapsed_leases(NOW + 6)

    rows = await line_rows(store, batch.id)
    assert ("queued", None, 1, 0) == rows[1]
    assert ("leased", "owner-b", 1, 0) == rows[2]
    assert ("queued", None, 0, 0) == rows[3]
    assert [1, 3] == [line.line_no for line in await store.lease_lines(batch.id, "owner-c", 5, NOW + 6, TTL_S)]


async def test_renewed_leases_are_not_reclaimed(store: Store) -> None:
    batch = await running_batch(store, 2)
    await store.lease_lines(batch.id, "owner-a", 1, NOW, 5.0)
    await store.lease_lines(batch.id, "owner-b", 1, NOW, 5.0)

    await store.renew_leases("owner-a", NOW + 4, 5.0)

    assert 1 == await store.reclaim_lapsed_leases(NOW + 6)
    rows = await line_rows(store, batch.id)
    assert ("leased", "owner-a") == rows[1][:2]
    assert ("queued", None) == rows[2][:2]


async def test_renewal_and_reclaim_go_round_a_line_a_group_commit_holds(sql_store: SqlStore) -> None:
    """PostgreSQL only. Waiting for a line the owner's own group commit holds deadlocked (the commit locks the
    lines in answer order, the heartbeat in its own): the heartbeat and the reclaim sweep skip it instead."""
    store = sql_store
    if not store.is_postgres:
        pytest.skip("SQLite runs one write transaction at a time")
    batch = await running_batch(store, 2)
    held, other_line = await store.lease_lines(batch.id, "owner-a", 2, NOW, 5.0)
    async with store.engine.connect() as other:
        await other.begin()  # owner-a's group commit, between writing `held` and its COMMIT
        await other.execute(update(requests).where(requests.c.id == held.id).values(attempts=1))
        await asyncio.wait_for(store.renew_leases("owner-a", NOW + 4, 5.0), timeout=30)
        assert 0 == await asyncio.wait_for(store.reclaim_lapsed_leases(NOW + 6), timeout=30)
        await other.rollback()
    # Only the line nobody held was renewed: the held one lapses at NOW + 5 and the next sweep takes it.
    assert 1 == await store.reclaim_lapsed_leases(NOW + 6)
    rows = await line_rows(store, batch.id)
    assert ("queued", None) == rows[held.line_no][:2]
    assert ("leased", "owner-a") == rows[other_line.line_no][:2]


async def test_close_queued_lines_counts_them_as_failed(store: Store) -> None:
    batch = await running_batch(store, 4)
    [in_flight] = await store.lease_lines(batch.id, "w1", 1, NOW, TTL_S)

    closed = await store.close_queued_lines(batch.id, RequestState.EXPIRED)

    assert 3 == closed
    assert {"leased": 1, "expired": 3} == await store.line_state_counts(batch.id)
    after = await current(store, batch.id)
    assert (0, 3) == (after.completed, after.failed)
    await store.record("w1", [succeeded(in_flight, Usage(2, 0, 2, 0))])
    after = await current(store, batch.id)
    assert (4, 1, 3) == (after.total, after.completed, after.failed)
    assert 0 == await store.close_queued_lines(batch.id, RequestState.EXPIRED)
    assert 3 == (await current(store, batch.id)).failed


async def test_closed_lines_survive_a_recount(store: Store) -> None:
    batch = await running_batch(store, 3)
    lines = await store.lease_lines(batch.id, "owner-a", 2, NOW, 1.0)
    await store.close_queued_lines(batch.id, RequestState.CANCELLED)  # line 3
    await store.reclaim_lapsed_leases(NOW + 10)
    [again] = await store.lease_lines(batch.id, "owner-b", 1, NOW + 10, TTL_S)

    # line 1 is stale (forces the recount), line 2 was reclaimed too: both dropped
    assert 0 == await store.record("owner-a", [succeeded(lines[0]), succeeded(lines[1])])
    assert 1 == await store.record("owner-b", [succeeded(again, Usage(4, 0, 4, 0))])

    after = await current(store, batch.id)
    assert (1, 1, Usage(4, 0, 4, 0)) == (after.completed, after.failed, after.usage)


# --- iter_results ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [4, 5])
async def test_results_come_in_input_order_across_pages(store: Store, count: int) -> None:
    numbers = [2, 3, 5, 8, 13][:count]
    batch = await running_batch(store, numbers)
    lines = await store.lease_lines(batch.id, "w1", 10, NOW, TTL_S)
    # finished in reverse order, in separate commits
    for line in reversed(lines):
        update_ = succeeded(line) if line.line_no % 2 else failed(line)
        await store.record("w1", [update_])

    results = [result async for result in store.iter_results(batch.id, page_size=2)]

    assert [f"request-{n}" for n in numbers] == [result.custom_id for result in results]
    expected_states = [RequestState.SUCCEEDED if n % 2 else RequestState.FAILED for n in numbers]
    assert expected_states == [result.state for result in results]
    for number, result in zip(numbers, results, strict=True):
        if number % 2:
            assert (200, b'{"line":%d}' % number) == (result.status_code, result.body)
            assert isinstance(result.body, bytes)
        else:
            assert (400, b'{"error":{"message":"bad"}}') == (result.status_code, result.body)
        assert result.result_id is not None
        assert result.result_id.startswith("batch_req_")


async def test_results_include_lines_that_never_ran(store: Store) -> None:
    batch = await running_batch(store, 3)
    [line] = await store.lease_lines(batch.id, "w1", 1, NOW, TTL_S)
    await store.record("w1", [failed(line, status_code=None)])
    await store.close_queued_lines(batch.id, RequestState.CANCELLED)

    results = [result async for result in store.iter_results(batch.id, page_size=1)]

    assert [RequestState.FAILED, RequestState.CANCELLED, RequestState.CANCELLED] == [r.state for r in results]
    assert ("timeout", "no answer", None) == (results[0].error_code, results[0].error_message, results[0].body)
    assert [None, None] == [r.result_id for r in results[1:]]


# --- scheduling estimates ---------------------------------------------------------------------------------


async def test_lines_sharing_a_prefix_are_leased_together(store: Store) -> None:
    tenant_id = await add_tenant(store)
    batch = await add_batch(store, tenant_id)
    keys = [5, 6, 5, 6, 5, 6]  # two prompts, interleaved in the file
    lines = [
        ValidLine(n, f"r{n}", 10 * n, 9, 22, max_output_tokens=100, prefix_key=key)
        for n, key in enumerate(keys, start=1)
    ]
    assert await store.claim_batch(batch.id, "v", NOW, 60.0)
    assert await store.start_batch(batch.id, "v", "m", group_by_prefix(lines), NOW)

    first = await store.lease_lines(batch.id, "w", 4, NOW, TTL_S)
    rest = await store.lease_lines(batch.id, "w", 4, NOW, TTL_S)

    assert [1, 2, 3, 5] == [line.line_no for line in first]  # prompt 5's lines, with prompt 6's first ahead
    assert [4, 6] == [line.line_no for line in rest]
    assert {100} == {line.max_output_tokens for line in first + rest}
    dispatchable = {b.id: b for b in await store.dispatchable_batches(NOW)}[batch.id]
    assert (6, 6 * 22, 6 * 100, 1.0) == (
        dispatchable.open_lines,
        dispatchable.est_prompt_tokens,
        dispatchable.est_output_tokens,
        dispatchable.weight,
    )


async def test_outlooks_are_written_on_in_progress_batches_only(store: Store) -> None:
    running = await running_batch(store, 2)
    tenant_id = await add_tenant(store, "other")
    validating = await add_batch(store, tenant_id)

    await store.set_outlooks([(running.id, NOW + 60, "promoted"), (validating.id, NOW + 5, "on_track")])

    shown = (await current(store, running.id)).extension()
    assert {"estimated_completion_at": NOW + 60, "schedule": "promoted", "waiting": None} == shown
    assert {"estimated_completion_at": None, "schedule": None, "waiting": None} == (
        await current(store, validating.id)
    ).extension()


async def test_a_batch_waiting_for_a_backend_says_so_until_the_next_outlook(store: Store) -> None:
    running = await running_batch(store, 2)
    note = "backend a unreachable since 2027-01-15T08:00:00Z: connection refused"

    await store.set_outlooks([(running.id, None, "waiting")], {running.id: note})
    waiting = await current(store, running.id)
    await store.set_outlooks([(running.id, NOW + 60, "on_track")])
    back = await current(store, running.id)

    assert {"estimated_completion_at": None, "schedule": "waiting", "waiting": note} == waiting.extension()
    assert (None, None) == (back.waiting, back.extension()["waiting"])


async def test_expired_lines_keep_the_last_backend_error_each_met_else_the_batchs(store: Store) -> None:
    batch = await running_batch(store, 3)
    first, second = await store.lease_lines(batch.id, "w1", 2, NOW, TTL_S)
    await store.record(
        "w1",
        [
            LineUpdate(first.id, batch.id, first.lease_seq, RequestState.QUEUED, 0, error_message="refused"),
            LineUpdate(second.id, batch.id, second.lease_seq, RequestState.QUEUED, 0),  # handed back: no error
        ],
    )

    assert 3 == await store.close_queued_lines(batch.id, RequestState.EXPIRED, "backend a unreachable")

    messages = [result.error_message async for result in store.iter_results(batch.id)]
    assert ["refused", "backend a unreachable", "backend a unreachable"] == messages
