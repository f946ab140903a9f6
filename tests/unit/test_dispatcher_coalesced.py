"""The dispatcher running coalesced embeddings lines (dispatch/coalesced.py) on fakes in virtual time: few upstream
requests, one result per line, a refused line failing alone, and lines of a request in flight handed back uncharged
or closed when the process stops or the batch is cancelled."""

from __future__ import annotations

import asyncio
from typing import Any

from backfill.domain.batches import BatchStatus, RequestState
from backfill.testing import InMemoryStore
from backfill.usecases.batches import cancel_batch
from tests.unit.test_dispatcher import MODEL, run, start

EMBEDDINGS = "/v1/embeddings"


def embedding(custom_id: str, text: str | list[str]) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": EMBEDDINGS, "body": {"model": MODEL, "input": text}}


def test_lines_share_requests_and_each_gets_its_own_result() -> None:
    async def scenario() -> None:
        harness = await start(max_concurrency=2)
        lines = [embedding(f"e{i}", f"text {i}") for i in range(40)] + [embedding("pair", ["x y", "z"])]
        done = await harness.wait_terminal((await harness.submit(*lines, endpoint=EMBEDDINGS)).id)
        await harness.close()

        assert (BatchStatus.COMPLETED, 41, 0) == (done.status, done.completed, done.failed)
        output = await harness.read_lines(done.output_file_id)
        assert [f"e{i}" for i in range(40)] + ["pair"] == [line["custom_id"] for line in output]
        assert [[0]] * 40 + [[0, 1]] == [[d["index"] for d in line["response"]["body"]["data"]] for line in output]
        answered = harness.upstream.stats()["answered"][EMBEDDINGS]
        assert answered["requests"] < 5  # 32 lines a request by default
        usages = [line["response"]["body"]["usage"]["prompt_tokens"] for line in output]
        assert answered["prompt_tokens"] == sum(usages)
        assert done.usage.input_tokens == sum(usages)

    run(scenario)


def test_a_line_the_upstream_refuses_fails_alone() -> None:
    async def scenario() -> None:
        harness = await start(max_concurrency=1)
        lines = [embedding(f"e{i}", f"text {i}") for i in range(9)] + [embedding("bad", "no #bad400")]
        done = await harness.wait_terminal((await harness.submit(*lines, endpoint=EMBEDDINGS)).id)
        await harness.close()

        assert (9, 1) == (done.completed, done.failed)
        errors = await harness.read_lines(done.error_file_id)
        assert [("bad", 400)] == [(line["custom_id"], line["response"]["status_code"]) for line in errors]

    run(scenario)


def test_stopping_hands_a_request_s_lines_back_uncharged_after_the_grace() -> None:
    async def scenario() -> None:
        harness = await start(max_concurrency=1)
        lines = [embedding("slow", "held #hang:60")] + [embedding(f"e{i}", f"text {i}") for i in range(3)]
        batch = await harness.submit(*lines, endpoint=EMBEDDINGS)
        await harness.wait_for(batch.id, lambda b: harness.upstream.stats()["total"] == 1, within_s=5)
        await harness.close()

        assert isinstance(harness.services.store, InMemoryStore)
        states = {(RequestState(line.state), line.attempts) for line in harness.services.store.lines(batch.id)}
        assert {(RequestState.QUEUED, 0)} == states

    run(scenario)


def test_cancelling_closes_a_request_s_lines_after_the_grace() -> None:
    async def scenario() -> None:
        harness = await start(max_concurrency=1)
        lines = [embedding("slow", "held #hang:60")] + [embedding(f"e{i}", f"text {i}") for i in range(3)]
        batch = await harness.submit(*lines, endpoint=EMBEDDINGS)
        await harness.wait_for(batch.id, lambda b: harness.upstream.stats()["total"] == 1, within_s=5)
        await cancel_batch(harness.services, harness.tenant_id, batch.id)
        harness.services.work_changed()
        done = await harness.wait_for(batch.id, lambda b: b.status.is_terminal, within_s=30)
        await harness.close()

        assert (BatchStatus.CANCELLED, 0, 4) == (done.status, done.completed, done.failed)

    run(scenario)


class SlowFirstRead:
    """A blob store whose first line read takes `delay_s` (of the loop's virtual time); `reading` while it does."""

    def __init__(self, inner: Any, delay_s: float) -> None:
        self.inner = inner
        self.delay_s = delay_s
        self.reads = 0
        self.reading = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def read_range(self, key: str, offset: int, length: int) -> bytes:
        self.reads += 1
        if self.reads == 1:
            self.reading = True
            await asyncio.sleep(self.delay_s)
            self.reading = False
        result: bytes = await self.inner.read_range(key, offset, length)
        return result


def test_a_request_s_lines_whose_leases_lapsed_while_their_input_was_read_are_not_sent() -> None:
    """Renewals fail and the input takes 25 s of a 30 s lease to read: the lines may be another worker's by now, so
    the request is not sent on those leases; the lines go back uncharged and run on fresh ones."""

    async def scenario() -> None:
        harness = await start(max_concurrency=1, lease_ttl_s=30.0)
        slow = harness.dispatcher.blobs = SlowFirstRead(harness.services.blobs, delay_s=25.0)
        renew = harness.services.store.renew_leases

        async def away_while_reading(owner: str, now: float, ttl_s: float) -> None:
            if slow.reading:
                raise ConnectionError("the database is away")
            await renew(owner, now, ttl_s)

        harness.services.store.renew_leases = away_while_reading  # type: ignore[method-assign]
        lines = [embedding(f"e{i}", f"text {i}") for i in range(4)]
        done = await harness.wait_terminal((await harness.submit(*lines, endpoint=EMBEDDINGS)).id)
        await harness.close()

        assert (BatchStatus.COMPLETED, 4) == (done.status, done.completed)
        assert 1 == harness.upstream.stats()["total"]  # sent once, on the second leases
        assert isinstance(harness.services.store, InMemoryStore)
        assert {(2, 1)} == {(line.lease_seq, line.attempts) for line in harness.services.store.lines(done.id)}

    run(scenario)
