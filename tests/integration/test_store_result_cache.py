"""The result cache's contract, on every store: a success recorded with a cache key is kept for its tenant (never a
fenced-off one), a lookup finds it, a line answered from it says so, counts as a hit in usage and marks the entry
used, and each tenant keeps at most so many entries, the least recently used going first."""

from __future__ import annotations

import msgspec

from backfill.domain.leases import LineUpdate
from backfill.domain.result_cache import CachedResult
from backfill.domain.usage import Usage
from backfill.domain.usage_report import UsageCounts
from backfill.ports import Store
from tests.support.store_data import NOW, running_batch, succeeded

TTL_S = 30.0


def kept(update: LineUpdate, key: str, at: float = NOW) -> LineUpdate:
    return msgspec.structs.replace(update, cache_key=key, finished_at=at)


async def test_a_success_recorded_with_a_key_is_kept_for_its_tenant(store: Store) -> None:
    batch = await running_batch(store, 1)
    [line] = await store.lease_lines(batch.id, "w1", 1, NOW, TTL_S)
    update = kept(succeeded(line, Usage(7, 0, 3, 0), b'{"answer":1}'), "k1")

    await store.record("w1", [update])

    assert update.result_id is not None
    expected = CachedResult(update.result_id, 200, update.request_id, b'{"answer":1}', Usage(7, 0, 3, 0))
    assert expected == await store.cached_result(batch.tenant_id, "k1")


async def test_another_tenant_does_not_see_it(store: Store) -> None:
    batch = await running_batch(store, 1, tenant="acme")
    other = await running_batch(store, 1, tenant="globex")
    [line] = await store.lease_lines(batch.id, "w1", 1, NOW, TTL_S)
    await store.record("w1", [kept(succeeded(line), "k1")])

    assert await store.cached_result(other.tenant_id, "k1") is None


async def test_a_fenced_off_success_is_not_kept(store: Store) -> None:
    batch = await running_batch(store, 1)
    [stale] = await store.lease_lines(batch.id, "owner-a", 1, NOW, 1.0)
    await store.reclaim_lapsed_leases(NOW + 10)
    await store.lease_lines(batch.id, "owner-b", 1, NOW + 10, TTL_S)

    await store.record("owner-a", [kept(succeeded(stale), "k1")])

    assert await store.cached_result(batch.tenant_id, "k1") is None


async def test_a_line_answered_from_the_cache_says_so_and_counts_as_a_hit(store: Store) -> None:
    batch = await running_batch(store, 1)
    [line] = await store.lease_lines(batch.id, "w1", 1, NOW, TTL_S)
    update = msgspec.structs.replace(succeeded(line, Usage(7, 0, 3, 0)), cached_from="batch_req_first", finished_at=NOW)

    await store.record("w1", [update])

    [result] = [result async for result in store.iter_results(batch.id)]
    assert result.cached_from == "batch_req_first"
    [(_, counts)] = await store.usage_rows(NOW - 60, NOW + 60)
    assert UsageCounts(result_cache_hits=1, result_cache_tokens=10) == counts


async def test_trimming_drops_the_least_recently_used_beyond_the_bound(store: Store) -> None:
    batch = await running_batch(store, 4)
    lines = await store.lease_lines(batch.id, "w1", 4, NOW, TTL_S)
    await store.record("w1", [kept(succeeded(line), f"k{i}", NOW + i) for i, line in enumerate(lines[:3])])
    reuse = msgspec.structs.replace(succeeded(lines[3]), cached_from="batch_req_0")
    await store.record("w1", [kept(reuse, "k0", NOW + 100)])  # k0 used last: k1 is now the oldest

    dropped = await store.trim_result_cache(2)

    assert dropped == 1
    assert await store.cached_result(batch.tenant_id, "k1") is None
    assert await store.cached_result(batch.tenant_id, "k0") is not None
