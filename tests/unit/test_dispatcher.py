"""The production dispatcher (the asyncio shell over the dispatch core, with its recorder, housekeeper and
lifecycle) on fakes: `InMemoryStore`, `InMemoryBlobStore`, the fake upstream over an ASGI transport, and a
virtual clock (`VirtualTimeLoop`). A scripted `#hang:30` takes thirty virtual seconds and no wall time, so these
run in milliseconds and the same on a busy machine. tests/integration/test_dispatcher.py runs the same kind of
scenarios on real SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import orjson

from backfill import ids
from backfill.backends.openai_http import OpenAIHttpBackend
from backfill.config import BackendSettings, Settings
from backfill.dispatch.dispatcher import Dispatcher
from backfill.domain.batches import Batch, BatchStatus, RequestState
from backfill.domain.files import FileRecord
from backfill.domain.results import CANCELLED_MESSAGE, EXPIRED_MESSAGE
from backfill.metrics import Metrics
from backfill.ports import Backend
from backfill.services import Services
from backfill.testing import InMemoryBlobStore, InMemoryStore, VirtualTimeLoop
from backfill.testing.upstream import FakeUpstream, create_upstream_app
from backfill.usecases.batches import CreateBatch, cancel_batch, create_batch
from tests.support.backends import BrokenBackend

MODEL = "fake-model"
CHAT = "/v1/chat/completions"
T0 = 1_800_000_000.0
T = TypeVar("T")


def run(test: Callable[[], Coroutine[Any, Any, T]]) -> T:
    loop = VirtualTimeLoop(start=T0)
    try:
        return loop.run_until_complete(test())
    finally:  # a failed test leaves the dispatcher's tasks behind: end them before the loop goes
        left = asyncio.all_tasks(loop)
        for task in left:
            task.cancel()

        async def settle() -> None:
            await asyncio.gather(*left, return_exceptions=True)

        loop.run_until_complete(settle())
        loop.close()


async def inline(work: Callable[[str, str], T], *args: str) -> T:
    return work(*args)


@dataclass
class Harness:
    services: Services
    dispatcher: Dispatcher
    upstream: FakeUpstream
    tenant_id: str
    stop: asyncio.Event
    running: asyncio.Task[None]

    async def submit(self, *lines: dict[str, Any] | bytes, window: str = "24h", endpoint: str = CHAT) -> Batch:
        data = b"".join((line if isinstance(line, bytes) else orjson.dumps(line)) + b"\n" for line in lines)
        file_id = ids.file_id()
        writer = self.services.blobs.open_writer(f"files/{file_id}")
        writer.write(data)
        await writer.commit()
        now = self.services.now()
        record = FileRecord(file_id, self.tenant_id, "input.jsonl", "batch", len(data), f"files/{file_id}", now, None)
        await self.services.store.add_file(record)
        batch = await create_batch(
            self.services,
            self.tenant_id,
            CreateBatch(input_file_id=file_id, endpoint=endpoint, completion_window=window),
        )
        self.services.work_changed()
        return batch

    async def wait_for(self, batch_id: str, done: Callable[[Batch], bool], within_s: float = 600.0) -> Batch:
        """Look every virtual 50 ms; `within_s` of virtual time at most."""
        async with asyncio.timeout(within_s):
            while True:
                batch = await self.services.store.get_batch(self.tenant_id, batch_id)
                assert batch is not None
                if done(batch):
                    return batch
                await asyncio.sleep(0.05)

    async def wait_terminal(self, batch_id: str) -> Batch:
        return await self.wait_for(batch_id, lambda batch: batch.status.is_terminal)

    async def read_lines(self, file_id: str | None) -> list[dict[str, Any]]:
        assert file_id is not None
        record = await self.services.store.get_file(self.tenant_id, file_id)
        assert record is not None
        return [orjson.loads(line) for line in b"".join(self.services.blobs.iter_chunks(record.blob_key)).splitlines()]

    async def close(self) -> None:
        self.stop.set()
        await self.running


async def start(max_concurrency: int = 4, backend: Backend | None = None, **overrides: Any) -> Harness:
    settings = Settings(
        **{
            "poll_interval_s": 0.5,
            "retry_base_s": 0.5,
            "retry_max_s": 2.0,
            "max_attempts": 3,
            "cancel_grace_s": 1.0,
            "shutdown_grace_s": 5.0,
            "completion_windows": ["1h", "24h"],
            **overrides,
        }
    )
    upstream = create_upstream_app()
    if backend is None:
        config = BackendSettings(
            name="upstream", url="http://upstream/v1", models=[MODEL], max_concurrency=max_concurrency
        )
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=upstream))
        backend = OpenAIHttpBackend(config, client=client)
    store, blobs = InMemoryStore(), InMemoryBlobStore()
    clock = asyncio.get_running_loop().time
    dispatcher = Dispatcher(store, blobs, [backend], settings, clock=clock, owner="worker-1")
    dispatcher.lifecycle.run_blocking = inline  # validation in this thread: the clock waits for it
    services = Services(settings, store, blobs, [backend], dispatcher, Metrics(), clock)
    tenant_id = await store.ensure_tenant("default", services.now())
    stop = asyncio.Event()
    return Harness(services, dispatcher, upstream, tenant_id, stop, asyncio.create_task(dispatcher.run(stop)))


def chat(custom_id: str, text: str = "hello there") -> dict[str, Any]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 8}
    return {"custom_id": custom_id, "method": "POST", "url": CHAT, "body": body}


def test_a_batch_completes_with_every_response_in_input_order() -> None:
    async def scenario() -> None:
        harness = await start()
        batch = await harness.submit(*(chat(f"r{i}", f"line {i} #slow:{(12 - i) * 100}") for i in range(12)))
        done = await harness.wait_terminal(batch.id)
        await harness.close()

        assert (BatchStatus.COMPLETED, 12, 12, 0) == (done.status, done.total, done.completed, done.failed)
        output = await harness.read_lines(done.output_file_id)
        assert [f"r{i}" for i in range(12)] == [line["custom_id"] for line in output]
        assert done.error_file_id is None
        assert 12 == harness.upstream.stats()["total"]

    run(scenario)


def test_a_validated_batch_is_dispatched_at_once_not_at_the_next_poll() -> None:
    async def scenario() -> None:
        harness = await start(poll_interval_s=60.0)
        submitted_at = harness.services.clock()
        batch = await harness.submit(chat("only"))
        done = await harness.wait_terminal(batch.id)
        took_s = harness.services.clock() - submitted_at
        await harness.close()

        assert BatchStatus.COMPLETED == done.status
        assert took_s < 5  # the poll would have come after 60 s

    run(scenario)


def test_transient_failures_are_retried_and_permanent_ones_go_to_the_error_file() -> None:
    async def scenario() -> None:
        harness = await start()
        lines = [chat("flaky", "a #fail500:2"), chat("limited", "b #fail429:1:3"), chat("broken", "c #bad400")]
        done = await harness.wait_terminal((await harness.submit(*lines)).id)
        await harness.close()

        assert (3, 2, 1) == (done.total, done.completed, done.failed)
        assert {"a #fail500:2": 3, "b #fail429:1:3": 2, "c #bad400": 1} == harness.upstream.stats()["by_key"]
        errors = await harness.read_lines(done.error_file_id)
        assert [("broken", 400)] == [(line["custom_id"], line["response"]["status_code"]) for line in errors]

    run(scenario)


def test_cancel_ends_unfinished_lines_as_cancelled_after_the_grace_and_keeps_finished_ones() -> None:
    async def scenario() -> None:
        harness = await start(max_concurrency=1)
        lines = [chat("one", "1"), chat("two", "2"), chat("stuck", "3 #hang:30"), chat("four", "4")]
        batch = await harness.submit(*lines)
        await harness.wait_for(batch.id, lambda b: b.completed == 2)
        cancelled_at = harness.services.clock()
        await cancel_batch(harness.services, harness.tenant_id, batch.id)
        harness.services.work_changed()
        done = await harness.wait_terminal(batch.id)
        await harness.close()

        assert (BatchStatus.CANCELLED, 4, 2, 2) == (done.status, done.total, done.completed, done.failed)
        assert done.cancelled_at is not None
        assert done.cancelled_at - cancelled_at < 30  # the stuck line was aborted after the grace, not awaited
        errors = await harness.read_lines(done.error_file_id)
        assert ["stuck", "four"] == [line["custom_id"] for line in errors]
        assert [{"code": "batch_cancelled", "message": CANCELLED_MESSAGE}] * 2 == [line["error"] for line in errors]
        assert {"1", "2", "3 #hang:30"} == set(harness.upstream.stats()["by_key"])  # four never ran

    run(scenario)


def test_a_window_running_out_expires_unfinished_lines() -> None:
    async def scenario() -> None:
        harness = await start(max_concurrency=1)
        batch = await harness.submit(chat("done", "1"), chat("stuck", "2 #hang:7200"), chat("never", "3"), window="1h")
        done = await harness.wait_for(batch.id, lambda b: b.status.is_terminal, within_s=2 * 3600)
        await harness.close()

        assert (BatchStatus.EXPIRED, 3, 1, 2) == (done.status, done.total, done.completed, done.failed)
        assert done.expired_at is not None
        assert done.expired_at - batch.created_at < 3600 + 60  # at the window's end plus its grace
        errors = await harness.read_lines(done.error_file_id)
        assert ["stuck", "never"] == [line["custom_id"] for line in errors]
        assert [{"code": "batch_expired", "message": EXPIRED_MESSAGE}] * 2 == [line["error"] for line in errors]

    run(scenario)


def test_a_line_whose_send_raises_fails_instead_of_staying_leased() -> None:
    async def scenario() -> None:
        broken = BrokenBackend(MODEL)
        harness = await start(backend=broken)
        done = await harness.wait_terminal((await harness.submit(chat("a"), chat("b"))).id)
        await harness.close()

        assert (BatchStatus.COMPLETED, 0, 2) == (done.status, done.completed, done.failed)
        assert 2 * 3 == broken.calls  # every attempt of the budget was made

    run(scenario)


def test_stopping_gives_lines_in_flight_their_grace_then_hands_them_back_uncharged() -> None:
    async def scenario() -> None:
        harness = await start(max_concurrency=1)
        batch = await harness.submit(chat("quick", "1"), chat("slow", "2 #hang:60"), chat("queued", "3"))
        await harness.wait_for(batch.id, lambda b: b.completed == 1)  # "slow" is in flight, "queued" leased
        stopped_at = harness.services.clock()
        await harness.close()
        stopped_after_s = harness.services.clock() - stopped_at

        assert isinstance(harness.services.store, InMemoryStore)
        states = {line.custom_id: (line.state, line.attempts) for line in harness.services.store.lines(batch.id)}
        assert {
            "quick": (RequestState.SUCCEEDED, 1),
            "slow": (RequestState.QUEUED, 0),  # aborted after the grace: back in the queue, uncharged
            "queued": (RequestState.QUEUED, 0),
        } == {key: (RequestState(state), attempts) for key, (state, attempts) in states.items()}
        assert 5.0 <= stopped_after_s < 6.0  # shutdown_grace_s

    run(scenario)


def test_a_line_aborted_in_the_tick_that_started_it_goes_back_to_the_queue() -> None:
    """A harvest cut right after a fill can abort a line whose task has not run yet."""

    async def scenario() -> None:
        harness = await start(max_concurrency=1)
        original: Callable[..., Awaitable[None]] = harness.dispatcher._run_line  # type: ignore[assignment]
        aborted: list[int] = []

        def start_and_abort_at_once(start: Any) -> Coroutine[Any, Any, None]:
            if not aborted:  # the first line: cancelled before its task runs a single step
                aborted.append(start.line.id)
                asyncio.get_running_loop().call_soon(lambda: harness.dispatcher._lines[start.line.id].cancel())
            return original(start)  # type: ignore[return-value]

        harness.dispatcher._run_line = start_and_abort_at_once  # type: ignore[method-assign]
        done = await harness.wait_terminal((await harness.submit(chat("a"), chat("b"))).id)
        await harness.close()

        assert (BatchStatus.COMPLETED, 2, 0) == (done.status, done.completed, done.failed)
        assert 1 == len(aborted)

    run(scenario)
