"""share_rates / share_batch_tokens / forget_rates: what dispatcher processes tell each other and API replicas through
the store."""

from __future__ import annotations

from backfill.domain.endpoint_report import EndpointReport
from backfill.domain.proxy_ttft import Published
from backfill.ports import Store

STALE_S = 20.0


async def test_each_worker_sees_the_sum_of_every_live_workers_rate(store: Store) -> None:
    assert {"m1": 10.0} == await store.share_rates("w1", {"m1": 10.0}, 100.0, STALE_S)
    assert {"m1": 30.0, "m2": 5.0} == await store.share_rates("w2", {"m1": 20.0, "m2": 5.0}, 101.0, STALE_S)
    assert {"m1": 32.0, "m2": 5.0} == await store.share_rates("w1", {"m1": 12.0}, 102.0, STALE_S)  # replaced


async def test_a_worker_that_stopped_refreshing_drops_out(store: Store) -> None:
    await store.share_rates("dead", {"m1": 50.0}, 100.0, STALE_S)

    assert {"m1": 60.0} == await store.share_rates("alive", {"m1": 10.0}, 110.0, STALE_S)
    assert {"m1": 10.0} == await store.share_rates("alive", {"m1": 10.0}, 121.0, STALE_S)


async def test_a_worker_that_stops_takes_its_rates_along(store: Store) -> None:
    await store.share_rates("leaving", {"m1": 50.0}, 100.0, STALE_S)
    await store.forget_rates("leaving")

    assert {"m1": 10.0} == await store.share_rates("staying", {"m1": 10.0}, 101.0, STALE_S)


async def test_workers_see_each_other_s_batch_token_counters_per_backend(store: Store) -> None:
    assert {"a": {"w1": 100}} == await store.share_batch_tokens("w1", {"a": 100}, 100.0, STALE_S)
    shared = await store.share_batch_tokens("w2", {"a": 40, "b": 7}, 101.0, STALE_S)
    assert {"a": {"w1": 100, "w2": 40}, "b": {"w2": 7}} == shared
    assert {"a": {"w1": 250, "w2": 40}, "b": {"w2": 7}} == await store.share_batch_tokens(
        "w1", {"a": 250}, 102.0, STALE_S
    )


async def test_a_dead_worker_s_counters_go_stale_and_a_stopped_one_s_go_with_it(store: Store) -> None:
    await store.share_batch_tokens("dead", {"a": 1}, 100.0, STALE_S)
    await store.share_batch_tokens("leaving", {"a": 2}, 115.0, STALE_S)
    await store.forget_rates("leaving")

    assert {"a": {"alive": 3}} == await store.share_batch_tokens("alive", {"a": 3}, 121.0, STALE_S)


async def test_api_replicas_see_every_live_worker_s_batch_lines_in_flight_per_backend(store: Store) -> None:
    await store.share_batch_tokens("w1", {}, 100.0, STALE_S, flying(a=3, b=1))
    await store.share_batch_tokens("w2", {"a": 10}, 101.0, STALE_S, flying(a=2))
    await store.share_batch_tokens("dead", {}, 80.0, STALE_S, flying(a=50))  # not refreshed since
    assert {"a": 5, "b": 1} == in_flight(await store.endpoint_reports(101.0, STALE_S))
    await store.forget_rates("w1")
    assert {"a": 2} == in_flight(await store.endpoint_reports(101.0, STALE_S))


async def test_api_replicas_see_what_every_live_worker_knows_of_each_backend_combined(store: Store) -> None:
    one = EndpointReport(in_flight=3, ceiling=4.0, engine_waiting=2, up=True, ttft_baseline_s=0.3)
    two = EndpointReport(in_flight=1, ceiling=5.0, engine_waiting=6, up=False, ttft_baseline_s=0.2)
    await store.share_batch_tokens("w1", {"a": 1}, 100.0, STALE_S, {"a": one, "b": EndpointReport(in_flight=2)})
    await store.share_batch_tokens("w2", {"a": 1}, 101.0, STALE_S, {"a": two})
    await store.share_batch_tokens("dead", {}, 80.0, STALE_S, {"a": EndpointReport(in_flight=50, up=True)})

    reports = await store.endpoint_reports(101.0, STALE_S)

    assert {"a": EndpointReport(4, 9.0, 6, False, 0.2), "b": EndpointReport(in_flight=2)} == reports


async def test_workers_read_every_live_api_replica_s_ttft_samples(store: Store) -> None:
    await store.share_ttft("api-1", {"a": Published(3, (0.1, 0.2, 0.3)), "b": Published(0, ())}, 100.0, STALE_S)
    await store.share_ttft("api-2", {"a": Published(1, (0.4,))}, 101.0, STALE_S)
    await store.share_ttft("gone", {"a": Published(9, (0.9,))}, 70.0, STALE_S)
    await store.share_ttft("api-1", {"a": Published(4, (0.2, 0.3, 0.5))}, 102.0, STALE_S)  # replaces its rows

    assert {"a": {"api-1": Published(4, (0.2, 0.3, 0.5)), "api-2": Published(1, (0.4,))}} == await store.proxy_ttft(
        102.0, STALE_S
    )
    await store.forget_rates("api-2")
    assert {"a": {"api-1": Published(4, (0.2, 0.3, 0.5))}} == await store.proxy_ttft(102.0, STALE_S)


def in_flight(reports: dict[str, EndpointReport]) -> dict[str, int]:
    return {backend: report.in_flight for backend, report in reports.items()}


def flying(**counts: int) -> dict[str, EndpointReport]:
    return {backend: EndpointReport(in_flight=count) for backend, count in counts.items()}
