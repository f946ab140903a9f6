"""share_rates / forget_rates: dispatcher processes sum their rates per model through the database."""

from __future__ import annotations

from backfill.store.sql import SqlStore

STALE_S = 20.0


async def test_each_worker_sees_the_sum_of_every_live_workers_rate(store: SqlStore) -> None:
    assert {"m1": 10.0} == await store.share_rates("w1", {"m1": 10.0}, 100.0, STALE_S)
    assert {"m1": 30.0, "m2": 5.0} == await store.share_rates("w2", {"m1": 20.0, "m2": 5.0}, 101.0, STALE_S)
    assert {"m1": 32.0, "m2": 5.0} == await store.share_rates("w1", {"m1": 12.0}, 102.0, STALE_S)  # replaced


async def test_a_worker_that_stopped_refreshing_drops_out(store: SqlStore) -> None:
    await store.share_rates("dead", {"m1": 50.0}, 100.0, STALE_S)

    assert {"m1": 60.0} == await store.share_rates("alive", {"m1": 10.0}, 110.0, STALE_S)
    assert {"m1": 10.0} == await store.share_rates("alive", {"m1": 10.0}, 121.0, STALE_S)


async def test_a_worker_that_stops_takes_its_rates_along(store: SqlStore) -> None:
    await store.share_rates("leaving", {"m1": 50.0}, 100.0, STALE_S)
    await store.forget_rates("leaving")

    assert {"m1": 10.0} == await store.share_rates("staying", {"m1": 10.0}, 101.0, STALE_S)
