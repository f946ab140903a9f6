"""The dispatcher end to end on real SQLite and PostgreSQL, against the fake upstream over an ASGI transport."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from backfill import ids
from backfill.backends.openai_http import OpenAIHttpBackend
from backfill.config import BackendSettings, Settings
from backfill.domain.batches import Batch, BatchStatus, output_file_id_of
from backfill.domain.files import FileRecord
from backfill.domain.outcomes import Outcome, OutcomeKind
from backfill.domain.results import CANCELLED_MESSAGE, EXPIRED_MESSAGE
from backfill.errors import BlobStoreUnavailable
from backfill.ports import Backend
from backfill.services import Services
from backfill.testing.upstream import FakeUpstream, create_upstream_app
from backfill.usecases.batches import CreateBatch, cancel_batch, create_batch
from tests.support.backends import BrokenBackend
from tests.support.databases import fetch_rows

MODEL = "fake-model"
CHAT = "/v1/chat/completions"
TERMINAL = {BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.EXPIRED, BatchStatus.CANCELLED}


class ShiftableClock:
    """Real time plus an offset a test can jump forward."""

    def __init__(self) -> None:
        self.offset_s = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset_s


@dataclass
class Harness:
    services: Services
    upstream: FakeUpstream
    tenant_id: str
    clock: ShiftableClock

    async def upload(self, *lines: dict[str, Any] | bytes) -> FileRecord:
        data = b"".join((line if isinstance(line, bytes) else orjson.dumps(line)) + b"\n" for line in lines)
        file_id = ids.file_id()
        writer = self.services.blobs.open_writer(f"files/{file_id}")
        writer.write(data)
        await writer.commit()
        now = self.services.now()
        record = FileRecord(file_id, self.tenant_id, "input.jsonl", "batch", len(data), f"files/{file_id}", now, None)
        await self.services.store.add_file(record)
        return record

    async def submit(self, *lines: dict[str, Any] | bytes) -> Batch:
        record = await self.upload(*lines)
        request = CreateBatch(input_file_id=record.id, endpoint=CHAT, completion_window="24h")
        batch = await create_batch(self.services, self.tenant_id, request)
        self.services.dispatcher.wake()
        return batch

    async def wait_for(self, batch_id: str, done: Callable[[Batch], bool], timeout_s: float = 20.0) -> Batch:
        async with asyncio.timeout(timeout_s):
            while True:
                batch = await self.services.store.get_batch(self.tenant_id, batch_id)
                assert batch is not None
                if done(batch):
                    return batch
                await asyncio.sleep(0.02)

    async def wait_until_received(self, key: str, timeout_s: float = 10.0) -> None:
        """Until the upstream has received a request with this prompt."""
        async with asyncio.timeout(timeout_s):
            while True:
                if key in self.upstream.stats(with_log=False)["by_key"]:
                    return
                await asyncio.sleep(0.01)

    async def wait_terminal(self, batch_id: str) -> Batch:
        return await self.wait_for(batch_id, lambda batch: batch.status in TERMINAL)

    async def read_lines(self, file_id: str | None) -> list[dict[str, Any]]:
        assert file_id is not None
        record = await self.services.store.get_file(self.tenant_id, file_id)
        assert record is not None
        data = b"".join(self.services.blobs.iter_chunks(record.blob_key))
        assert record.bytes == len(data)
        assert data.endswith(b"\n")
        return [orjson.loads(line) for line in data.splitlines()]


MakeHarness = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def make_harness(database_url: str, tmp_path: Path) -> AsyncIterator[MakeHarness]:
    """Services on the test database with a running dispatcher; keyword arguments override Settings."""
    opened: list[tuple[Services, asyncio.Event, asyncio.Task[None]]] = []

    async def make(max_concurrency: int = 4, backend: Backend | None = None, **overrides: Any) -> Harness:
        values: dict[str, Any] = {
            "data_dir": tmp_path / "data",
            "database_url": database_url,
            "poll_interval_s": 0.02,
            "commit_interval_s": 0.01,
            "retry_base_s": 0.01,
            "retry_max_s": 0.05,
            "max_attempts": 3,
            "lease_ttl_s": 5.0,
            "cancel_grace_s": 0.05,
            "request_timeout_s": 10.0,
            **overrides,
        }
        settings = Settings(**values)
        upstream = create_upstream_app()
        if backend is None:
            backend = OpenAIHttpBackend(
                BackendSettings(
                    name="upstream", url="http://upstream/v1", models=[MODEL], max_concurrency=max_concurrency
                ),
                client=httpx.AsyncClient(transport=httpx.ASGITransport(app=upstream)),
            )
        clock = ShiftableClock()
        services = await Services.open(settings, backends=[backend], clock=clock)
        stop = asyncio.Event()
        task = asyncio.create_task(services.dispatcher.run(stop))
        opened.append((services, stop, task))
        tenant_id = await services.store.ensure_tenant("default", services.now())
        return Harness(services, upstream, tenant_id, clock)

    yield make
    for services, stop, task in opened:
        stop.set()
        await task
        await services.close()


def chat(custom_id: str, text: str = "hello there", model: str = MODEL) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": CHAT,
        "body": {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 8},
    }


async def test_batch_completes_with_every_response_in_input_order(make_harness: MakeHarness) -> None:
    harness = await make_harness()
    custom_ids = [f"request-{i}" for i in range(12)]
    lines: list[dict[str, Any] | bytes] = [
        chat(custom_id, f"prompt number {i}") for i, custom_id in enumerate(custom_ids)
    ]
    lines.insert(5, b"")  # a blank line in the middle is ignored

    batch = await harness.submit(*lines)
    done = await harness.wait_terminal(batch.id)

    assert BatchStatus.COMPLETED == done.status
    assert (12, 12, 0) == (done.total, done.completed, done.failed)
    assert done.error_file_id is None
    assert MODEL == done.model
    assert done.in_progress_at is not None
    assert done.finalizing_at is not None
    assert done.completed_at is not None
    output = await harness.read_lines(done.output_file_id)
    assert custom_ids == [line["custom_id"] for line in output]
    for line in output:
        assert line["error"] is None
        assert 200 == line["response"]["status_code"]
        assert line["response"]["request_id"].startswith("req_")
        assert "chat.completion" == line["response"]["body"]["object"]
        assert line["id"].startswith("batch_req_")
    assert sum(line["response"]["body"]["usage"]["prompt_tokens"] for line in output) == done.usage.input_tokens
    assert sum(line["response"]["body"]["usage"]["completion_tokens"] for line in output) == done.usage.output_tokens
    assert 12 == harness.upstream.stats()["total"]
    record = await harness.services.store.get_file(harness.tenant_id, done.output_file_id or "")
    assert record is not None
    assert ("batch_output", f"{batch.id}_output.jsonl") == (record.purpose, record.filename)


async def test_transient_failures_are_retried_and_permanent_ones_go_to_the_error_file(
    make_harness: MakeHarness,
) -> None:
    harness = await make_harness()
    lines = [
        chat("flaky-500", "a #fail500:2"),
        chat("rate-limited", "b #fail429:1:0.05"),
        chat("always-500", "c #fail500:always"),
        chat("bad-request", "d #bad400"),
        chat("garbage", "e #garbage"),
        chat("plain", "f"),
    ]

    batch = await harness.submit(*lines)
    done = await harness.wait_terminal(batch.id)

    assert BatchStatus.COMPLETED == done.status
    assert (6, 3, 3) == (done.total, done.completed, done.failed)
    expected_attempts = {
        "a #fail500:2": 3,
        "b #fail429:1:0.05": 2,
        "c #fail500:always": 3,
        "d #bad400": 1,
        "e #garbage": 3,
        "f": 1,
    }
    assert expected_attempts == harness.upstream.stats()["by_key"]
    output = await harness.read_lines(done.output_file_id)
    assert ["flaky-500", "rate-limited", "plain"] == [line["custom_id"] for line in output]
    errors = await harness.read_lines(done.error_file_id)
    assert ["always-500", "bad-request", "garbage"] == [line["custom_id"] for line in errors]
    always_500, bad_request, garbage = errors
    assert (500, None) == (always_500["response"]["status_code"], always_500["error"])
    assert "server_error" == always_500["response"]["body"]["error"]["type"]
    assert (400, None) == (bad_request["response"]["status_code"], bad_request["error"])
    assert "invalid_request_error" == bad_request["response"]["body"]["error"]["type"]
    assert garbage["response"] is None
    assert "backend_unavailable" == garbage["error"]["code"]


async def test_cancel_ends_unfinished_lines_as_cancelled_and_keeps_finished_ones(make_harness: MakeHarness) -> None:
    harness = await make_harness(max_concurrency=1)
    lines = [chat("one", "1"), chat("two", "2"), chat("stuck", "3 #hang:30"), chat("four", "4"), chat("five", "5")]
    batch = await harness.submit(*lines)
    await harness.wait_for(batch.id, lambda batch: batch.completed == 2)
    await harness.wait_until_received("3 #hang:30")

    cancelling = await cancel_batch(harness.services, harness.tenant_id, batch.id)
    harness.services.dispatcher.wake()
    done = await harness.wait_terminal(batch.id)

    assert BatchStatus.CANCELLING == cancelling.status
    assert BatchStatus.CANCELLED == done.status
    assert done.cancelling_at is not None
    assert done.cancelled_at is not None
    assert (5, 2, 3) == (done.total, done.completed, done.failed)
    output = await harness.read_lines(done.output_file_id)
    assert ["one", "two"] == [line["custom_id"] for line in output]
    errors = await harness.read_lines(done.error_file_id)
    assert ["stuck", "four", "five"] == [line["custom_id"] for line in errors]
    for line in errors:
        assert line["response"] is None
        assert {"code": "batch_cancelled", "message": CANCELLED_MESSAGE} == line["error"]
    assert {"1", "2", "3 #hang:30"} == set(harness.upstream.stats()["by_key"])  # four and five never ran


async def test_cancel_before_validation_ends_with_no_files(make_harness: MakeHarness) -> None:
    harness = await make_harness()
    record = await harness.upload(chat("one"))
    request = CreateBatch(input_file_id=record.id, endpoint=CHAT, completion_window="24h")
    batch = await create_batch(harness.services, harness.tenant_id, request)
    await cancel_batch(harness.services, harness.tenant_id, batch.id)
    harness.services.dispatcher.wake()

    done = await harness.wait_terminal(batch.id)

    assert BatchStatus.CANCELLED == done.status
    assert (None, None) == (done.output_file_id, done.error_file_id)
    assert 0 == harness.upstream.stats()["total"]


async def test_window_running_out_expires_unfinished_lines(make_harness: MakeHarness) -> None:
    harness = await make_harness(max_concurrency=1)
    batch = await harness.submit(chat("done", "1"), chat("stuck", "2 #hang:30"), chat("never", "3"))
    await harness.wait_for(batch.id, lambda batch: batch.completed == 1)
    await harness.wait_until_received("2 #hang:30")

    harness.clock.offset_s = 25 * 3600
    done = await harness.wait_terminal(batch.id)

    assert BatchStatus.EXPIRED == done.status
    assert done.expired_at is not None
    assert (3, 1, 2) == (done.total, done.completed, done.failed)
    assert ["done"] == [line["custom_id"] for line in await harness.read_lines(done.output_file_id)]
    errors = await harness.read_lines(done.error_file_id)
    assert ["stuck", "never"] == [line["custom_id"] for line in errors]
    assert [{"code": "batch_expired", "message": EXPIRED_MESSAGE}] * 2 == [line["error"] for line in errors]


async def test_invalid_content_fails_the_batch_with_line_numbers(make_harness: MakeHarness) -> None:
    harness = await make_harness()

    batch = await harness.submit(chat("a"), b"{broken", chat("a"), chat("c", model="unknown-model"))
    done = await harness.wait_terminal(batch.id)

    assert BatchStatus.FAILED == done.status
    assert done.failed_at is not None
    assert done.errors is not None
    assert [("invalid_json_line", 2), ("duplicate_custom_id", 3), ("model_mismatch", 4)] == [
        (error.code, error.line) for error in done.errors
    ]
    assert (0, None, None) == (done.total, done.output_file_id, done.error_file_id)
    assert 0 == harness.upstream.stats()["total"]


async def test_batch_over_the_enqueued_token_limit_fails(make_harness: MakeHarness) -> None:
    harness = await make_harness(default_enqueued_token_limit=10)

    batch = await harness.submit(chat("a", "a long enough prompt to need more than ten estimated tokens"))
    done = await harness.wait_terminal(batch.id)

    assert BatchStatus.FAILED == done.status
    assert done.errors is not None
    assert ["token_limit_exceeded"] == [error.code for error in done.errors]


async def test_a_line_whose_send_raises_fails_instead_of_staying_leased(make_harness: MakeHarness) -> None:
    broken = BrokenBackend(MODEL)
    harness = await make_harness(backend=broken)

    batch = await harness.submit(chat("a"), chat("b"))
    done = await harness.wait_for(batch.id, lambda batch: batch.status in TERMINAL, timeout_s=10.0)

    assert BatchStatus.COMPLETED == done.status
    assert (2, 0, 2) == (done.total, done.completed, done.failed)
    errors = await harness.read_lines(done.error_file_id)
    assert [("a", "backend_unavailable"), ("b", "backend_unavailable")] == [
        (line["custom_id"], line["error"]["code"]) for line in errors
    ]
    assert 2 * 3 == broken.calls  # every attempt of the budget was made


async def test_a_small_tenant_finishes_long_before_a_large_backlog(make_harness: MakeHarness) -> None:
    harness = await make_harness(max_concurrency=4)
    other = dataclasses.replace(harness, tenant_id=await harness.services.store.ensure_tenant("small", 0))
    big = await harness.submit(*(chat(f"a{i}", f"big {i} #slow:20") for i in range(300)))
    await harness.wait_for(big.id, lambda batch: batch.completed >= 8)

    small = await other.submit(*(chat(f"b{i}", f"small {i} #slow:20") for i in range(8)))
    done = await other.wait_terminal(small.id)
    big_then = await harness.services.store.get_batch(harness.tenant_id, big.id)

    assert BatchStatus.COMPLETED == done.status
    assert big_then is not None
    # With 4 slots shared fairly, 8 small lines take about 4 rounds; FIFO would have made them wait for all 300.
    assert big_then.completed < 300 - 200


async def test_in_progress_batches_show_an_estimated_completion(make_harness: MakeHarness) -> None:
    harness = await make_harness(max_concurrency=2, outlook_interval_s=0.05)
    batch = await harness.submit(*(chat(f"l{i}", f"line {i} #slow:30") for i in range(200)))

    seen = await harness.wait_for(batch.id, lambda b: b.eta_at is not None)

    assert "on_track" == seen.schedule_state
    assert seen.eta_at is not None
    assert harness.clock() < seen.eta_at < seen.expires_at
    shown = seen.extension()
    assert {"estimated_completion_at": seen.eta_at, "schedule": "on_track", "waiting": None} == shown
    assert output_file_id_of(seen.id) == seen.to_openai()["backfill"]["output_file_id"]


class UnavailableAtFirst:
    """A blob store that is unreachable (as S3 in an outage) for its first reads of each kind, then recovers."""

    def __init__(self, inner: Any, validation_failures: int, line_failures: int) -> None:
        self.inner = inner
        self.validation_failures = validation_failures
        self.line_failures = line_failures

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def iter_chunks(self, key: str, chunk_bytes: int = 1 << 20) -> Any:
        if self.validation_failures > 0:
            self.validation_failures -= 1
            raise BlobStoreUnavailable("s3://bucket/files: connection refused")
        return self.inner.iter_chunks(key, chunk_bytes)

    async def read_range(self, key: str, offset: int, length: int) -> bytes:
        if self.line_failures > 0:
            self.line_failures -= 1
            raise BlobStoreUnavailable("s3://bucket/files: read timeout")
        result: bytes = await self.inner.read_range(key, offset, length)
        return result


async def test_a_blob_store_outage_delays_a_batch_but_fails_and_charges_nothing(make_harness: MakeHarness) -> None:
    harness = await make_harness()  # max_attempts 3: charged failures would fail lines
    flaky = UnavailableAtFirst(harness.services.blobs, validation_failures=3, line_failures=12)
    harness.services.dispatcher.blobs = flaky
    harness.services.dispatcher.lifecycle.blobs = flaky

    batch = await harness.submit(*(chat(f"r{i}", f"outage line {i}") for i in range(4)))
    done = await harness.wait_terminal(batch.id)

    assert (0, 0) == (flaky.validation_failures, flaky.line_failures)  # the outage did happen
    assert (BatchStatus.COMPLETED, 4, 4, 0) == (done.status, done.total, done.completed, done.failed)
    assert 4 == harness.upstream.stats()["total"]  # each line sent once, when its body could be read


class SlowToLoad:
    """An in-process engine (ports.LoadsModel) whose model is loaded when the test says so."""

    name = "engine"
    max_concurrency = 2

    def __init__(self, model: str) -> None:
        self.models = frozenset({model})
        self.loaded = asyncio.Event()

    async def load(self) -> None:
        await self.loaded.wait()

    async def send(self, endpoint: str, body: bytes, timeout_s: float) -> Outcome:
        await self.loaded.wait()  # as the embedded engine: a line sent meanwhile waits for the model
        return Outcome(OutcomeKind.SUCCESS, 200, orjson.dumps({"choices": []}))

    async def close(self) -> None:
        return None


async def test_a_batch_waiting_for_the_model_to_load_says_so_until_it_has_loaded(make_harness: MakeHarness) -> None:
    engine = SlowToLoad(MODEL)
    harness = await make_harness(backend=engine, outlook_interval_s=0.05)
    batch = await harness.submit(chat("a"), chat("b"))

    loading = await harness.wait_for(batch.id, lambda b: b.schedule_state == "loading_model")
    engine.loaded.set()
    done = await harness.wait_terminal(batch.id)

    shown = loading.extension()
    assert "loading_model" == shown["schedule"]
    assert shown["waiting"].startswith(f"loading model {MODEL} since ")
    assert (BatchStatus.COMPLETED, 2) == (done.status, done.completed)


class GatedBackend:
    """One slot; the first line it is sent waits until `gate` opens. Keeps the prompt of every line sent;
    `all_sent` once `lines` have been."""

    name = "gated"
    max_concurrency = 1

    def __init__(self, model: str, lines: int) -> None:
        self.models = frozenset({model})
        self.lines = lines
        self.gate = asyncio.Event()
        self.first_sent = asyncio.Event()
        self.all_sent = asyncio.Event()
        self.sent: list[str] = []

    async def send(self, endpoint: str, body: bytes, timeout_s: float) -> Outcome:
        self.sent.append(orjson.loads(body)["messages"][0]["content"])
        self.first_sent.set()
        if len(self.sent) >= self.lines:
            self.all_sent.set()
        await self.gate.wait()
        return Outcome(OutcomeKind.SUCCESS, 200, b'{"object": "chat.completion", "choices": []}')

    async def close(self) -> None:
        return None


async def test_a_buffered_line_whose_lease_may_have_lapsed_goes_back_unsent(
    make_harness: MakeHarness, database_url: str
) -> None:
    """Renewals fail (the database is away): lines leased long enough ago may be another worker's by now, and it
    may have run them and committed their success. They go back to the queue unsent and are leased afresh."""
    backend = GatedBackend(MODEL, lines=3)
    harness = await make_harness(backend=backend, lease_ttl_s=3.0)

    async def away(*_: object) -> None:
        raise ConnectionError("the database is away")

    harness.services.store.renew_leases = away  # type: ignore[method-assign]
    batch = await harness.submit(*(chat(name, text=name) for name in ("a", "b", "c")))
    async with asyncio.timeout(10):
        await backend.first_sent.wait()
    query = "SELECT custom_id, state, lease_seq FROM requests WHERE batch_id = %s"
    buffered = {row[0] for row in fetch_rows(database_url, query, (batch.id,)) if row[1] == "leased"} - {"a"}
    assert buffered  # leased with "a", waiting for its slot
    harness.clock.offset_s += 2.5  # leased for 3 s, never renewed: under a third of it is left
    backend.gate.set()
    async with asyncio.timeout(10):
        await backend.all_sent.wait()
    del harness.services.store.renew_leases  # the database is back: housekeeping (the finalize) goes on
    done = await harness.wait_terminal(batch.id)

    assert (BatchStatus.COMPLETED, 3) == (done.status, done.completed)
    assert ["a", "b", "c"] == sorted(backend.sent)  # each once
    seqs = {row[0]: row[2] for row in fetch_rows(database_url, query, (batch.id,))}
    assert {name: 2 for name in buffered} == {name: seqs[name] for name in buffered}  # run on a fresh lease


class SlowFirstRead:
    """A blob store whose first line read waits until `release` is set (`reading` says it has begun)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.reading = asyncio.Event()
        self.release = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def read_range(self, key: str, offset: int, length: int) -> bytes:
        if not self.reading.is_set():
            self.reading.set()
            await self.release.wait()
        result: bytes = await self.inner.read_range(key, offset, length)
        return result


async def test_a_line_whose_lease_lapsed_while_its_input_was_read_is_not_sent(
    make_harness: MakeHarness, database_url: str
) -> None:
    """The same once a line has started: its input took long to read while renewals failed. It is not sent on
    that lease; it goes back unsent and runs on a fresh one."""
    backend = GatedBackend(MODEL, lines=1)
    backend.gate.set()
    harness = await make_harness(backend=backend, lease_ttl_s=3.0)
    slow = SlowFirstRead(harness.services.blobs)
    harness.services.dispatcher.blobs = slow

    async def away(*_: object) -> None:
        raise ConnectionError("the database is away")

    harness.services.store.renew_leases = away  # type: ignore[method-assign]
    batch = await harness.submit(chat("a", text="a"))
    async with asyncio.timeout(10):
        await slow.reading.wait()
    harness.clock.offset_s += 2.5  # leased for 3 s, never renewed: under a third of it is left
    slow.release.set()
    async with asyncio.timeout(10):
        await backend.all_sent.wait()
    del harness.services.store.renew_leases
    done = await harness.wait_terminal(batch.id)

    assert (BatchStatus.COMPLETED, 1) == (done.status, done.completed)
    assert ["a"] == backend.sent
    query = "SELECT custom_id, lease_seq FROM requests WHERE batch_id = %s"
    assert [("a", 2)] == fetch_rows(database_url, query, (batch.id,))  # sent on its second lease
