"""The dashboard's pure parts: session tokens, a batch's progress and ETA, TTFT quantiles, bounded history."""

from __future__ import annotations

import asyncio
from typing import cast

from backfill.batch_load import BatchLoad, SharedBatchLoad
from backfill.domain.batches import Batch, BatchStatus
from backfill.domain.endpoint_report import EndpointReport
from backfill.http.ui_history import EndpointHistory, Ring, Sample, quantile
from backfill.http.ui_session import SESSION_S, SessionSigner
from backfill.metrics import Metrics
from backfill.services import Services
from backfill.testing.memory_store import InMemoryStore
from backfill.usecases.dashboard import metadata_fragment, progress_of


def running(total: int, completed: int, failed: int, started: int, expires_at: int) -> Batch:
    return Batch(
        id="batch_x",
        tenant_id="t",
        endpoint="/v1/chat/completions",
        input_file_id="file-x",
        completion_window="24h",
        status=BatchStatus.IN_PROGRESS,
        created_at=started,
        expires_at=expires_at,
        in_progress_at=started,
        total=total,
        completed=completed,
        failed=failed,
    )


def test_a_session_token_reads_back_until_it_expires() -> None:
    signer = SessionSigner(b"s" * 32)
    token, issued = signer.issue("key_1", now=1000)

    assert issued == signer.read(token, now=1000 + SESSION_S - 1)
    assert signer.read(token, now=1000 + SESSION_S) is None


def test_a_tampered_or_foreign_token_is_refused() -> None:
    token, _ = SessionSigner(b"s" * 32).issue("key_1", now=1000)
    mac = token.split(".")[1]
    forged, _ = SessionSigner(b"other" * 8).issue("key_admin", now=1000)

    assert SessionSigner(b"s" * 32).read(forged, now=1000) is None
    assert SessionSigner(b"s" * 32).read(f"{forged.split('.')[0]}.{mac}", now=1000) is None
    assert SessionSigner(b"s" * 32).read("garbage", now=1000) is None


def test_each_session_gets_its_own_csrf_token() -> None:
    signer = SessionSigner(b"s" * 32)

    assert signer.issue("key_1", now=1)[1].csrf != signer.issue("key_1", now=1)[1].csrf


def test_progress_extrapolates_the_eta_from_the_throughput_and_flags_a_late_batch() -> None:
    on_time = progress_of(running(total=100, completed=40, failed=10, started=1000, expires_at=2000), now=1100)
    late = progress_of(running(total=100, completed=5, failed=0, started=1000, expires_at=1500), now=1100)

    assert (50, 0.5, 1200, False) == (on_time.done, on_time.throughput_per_s, on_time.eta_at, on_time.late)
    assert (3000, True) == (late.eta_at, late.late)


def test_the_schedulers_estimate_wins_over_the_extrapolation() -> None:
    batch = running(total=100, completed=40, failed=10, started=1000, expires_at=2000)
    batch.eta_at = 1900

    assert 1900 == progress_of(batch, now=1100).eta_at


def test_a_quantile_is_the_upper_bound_of_its_bucket() -> None:
    bounds = [0.1, 0.2, 0.5, 1.0]

    assert 0.1 == quantile(bounds, [60, 30, 9, 1], 0.5)
    assert 0.5 == quantile(bounds, [60, 30, 9, 1], 0.99)
    assert quantile(bounds, [0, 0, 0, 0], 0.5) is None


def test_a_ring_keeps_only_its_last_samples() -> None:
    ring = Ring(3)
    for at in range(10):
        ring.add(Sample(float(at), "b", at, None, None, None, None, None))

    assert [7.0, 8.0, 9.0] == [sample["at"] for sample in ring.since(0)["b"]]


def test_a_metadata_filter_of_key_value_looks_for_the_stored_pair() -> None:
    assert '"team":"eval"' == metadata_fragment("team = eval")
    assert "eval" == metadata_fragment("eval")


def test_a_sample_of_an_api_replica_draws_what_every_worker_reports_of_the_backend() -> None:
    store = InMemoryStore()
    worker_1 = EndpointReport(in_flight=3, ceiling=4, engine_waiting=2, up=True, ttft_baseline_s=0.30)
    worker_2 = EndpointReport(in_flight=1, ceiling=5, engine_waiting=3, up=True, ttft_baseline_s=0.25)
    asyncio.run(store.share_batch_tokens("w1", {"b": 10}, 999.0, 5.0, {"b": worker_1}))
    asyncio.run(store.share_batch_tokens("w2", {"b": 20}, 999.5, 5.0, {"b": worker_2}))
    asyncio.run(store.share_batch_tokens("dead", {"b": 30}, 990.0, 50.0, {"b": EndpointReport(in_flight=9, up=False)}))
    metrics = Metrics()
    metrics.interactive_in_flight.labels("b").set(6)
    history = EndpointHistory(cast(Services, _Services(metrics, SharedBatchLoad(store, lambda: 1_000.0))))

    asyncio.run(history.sample())

    [sample] = history.hour.since(0)["b"]
    drawn = ("batch_in_flight", "harvest_ceiling", "engine_waiting", "up", "ttft_baseline_s", "interactive_in_flight")
    assert (4, 9, 3, True, 0.25, 6) == tuple(sample[key] for key in drawn)


def test_a_backend_no_worker_reports_on_is_drawn_from_the_proxy_s_view() -> None:
    metrics = Metrics()
    metrics.backend_up.labels("b").set(0)
    history = EndpointHistory(cast(Services, _Services(metrics, SharedBatchLoad(InMemoryStore(), lambda: 1_000.0))))

    asyncio.run(history.sample())

    [sample] = history.hour.since(0)["b"]
    assert (0, None, False) == (sample["batch_in_flight"], sample["harvest_ceiling"], sample["up"])


class _Backend:
    name = "b"


class _Services:
    """What the sampler reads of `Services`: its clock, metrics, backends and batch load."""

    def __init__(self, metrics: Metrics, batch_load: BatchLoad) -> None:
        self.metrics = metrics
        self.backends = [_Backend()]
        self.batch_load = batch_load

    def clock(self) -> float:
        return 1_000.0
