"""The lifecycle's log: one line per state change, not one per poll."""

from __future__ import annotations

from structlog.testing import capture_logs

from backfill.dispatch.lifecycle import Lifecycle
from backfill.domain.batches import BatchStatus
from backfill.domain.lines import ValidationLimits
from backfill.testing import InMemoryStore
from backfill.testing.memory_blobs import InMemoryBlobStore
from tests.support.store_data import NOW, current, running_batch


async def test_a_cancel_waiting_for_a_line_in_flight_is_logged_once_however_often_it_is_tended() -> None:
    store = InMemoryStore()
    batch = await running_batch(store, 3)
    in_flight = await store.lease_lines(batch.id, "worker-1", 1, NOW, 60.0)
    await store.request_cancel(batch.tenant_id, batch.id, NOW)
    lifecycle = Lifecycle(store, InMemoryBlobStore(), ValidationLimits(), lambda model: True, "worker-1")

    with capture_logs() as logs:
        for tick in range(5):
            await lifecycle.tend(await current(store, batch.id), NOW + tick)

    assert 1 == len(in_flight)
    assert BatchStatus.CANCELLING is (await current(store, batch.id)).status
    assert 1 == [entry["event"] for entry in logs].count("batch.closing")
