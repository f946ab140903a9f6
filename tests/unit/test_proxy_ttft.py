"""TTFT samples from API replicas to workers: each worker takes each sample once, a new or restarted replica counts
from its next publication."""

from __future__ import annotations

import asyncio

from backfill.domain.proxy_ttft import Published, SampleLog, SampleReader
from tests.unit.test_core_harvest import watcher_for


def test_a_replica_publishes_its_last_samples_and_how_many_it_measured() -> None:
    log = SampleLog(kept=3)
    log.add("a", [0.1, 0.2])
    log.add("a", [0.3, 0.4])
    log.add("b", [])

    assert {"a": Published(4, (0.2, 0.3, 0.4)), "b": Published(0, ())} == log.published()


def test_a_worker_takes_each_new_sample_once() -> None:
    reader = SampleReader()
    assert {} == reader.take({"a": {"api-1": Published(2, (0.1, 0.2))}})  # first seen: counts from the next

    assert {"a": [0.3]} == reader.take({"a": {"api-1": Published(3, (0.1, 0.2, 0.3))}})
    assert {} == reader.take({"a": {"api-1": Published(3, (0.1, 0.2, 0.3))}})  # nothing new
    two = {"a": {"api-1": Published(5, (0.3, 0.4, 0.5)), "api-2": Published(1, (0.9,))}}
    assert {"a": [0.4, 0.5]} == reader.take(two)  # api-2 seen for the first time


def test_a_worker_takes_what_is_kept_when_more_came_and_skips_a_restart() -> None:
    reader = SampleReader()
    reader.take({"a": {"api-1": Published(10, (0.1,))}})

    assert {"a": [0.2, 0.3]} == reader.take({"a": {"api-1": Published(50, (0.2, 0.3))}})  # 40 new, 2 kept
    assert {} == reader.take({"a": {"api-1": Published(1, (0.7,))}})  # restarted: from the next
    assert {"a": [0.8]} == reader.take({"a": {"api-1": Published(2, (0.7, 0.8))}})


def test_a_worker_of_a_split_deployment_harvests_on_the_api_replicas_ttft() -> None:
    watcher, store, _ = watcher_for(role="worker")
    asyncio.run(store.share_ttft("api-1", {"a": Published(1, (0.5,))}, 1_000.0, 5.0))
    asyncio.run(watcher.read())
    asyncio.run(store.share_ttft("api-1", {"a": Published(3, (0.5, 0.25, 0.75))}, 1_000.0, 5.0))

    reading = asyncio.run(watcher.read())

    assert {"a": [0.25, 0.75]} == dict(reading.ttft)


def test_a_worker_with_the_proxy_in_its_own_process_reads_no_published_samples() -> None:
    watcher, store, meter = watcher_for(role="all")
    meter.record_first_token("a", 0.1)
    for seq in (1, 2):
        asyncio.run(store.share_ttft("api-1", {"a": Published(seq, (0.5,) * seq)}, 1_000.0, 5.0))
        reading = asyncio.run(watcher.read())
    assert {"a": []} == dict(reading.ttft)  # the local sample went with the first reading, no published one came
