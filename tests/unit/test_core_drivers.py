"""One scripted scenario through both drivers of the dispatch core — the simulator's `VirtualDriver` in virtual time,
and the production asyncio `Dispatcher` on an in-memory store, scripted backends and a virtual-time event loop —
must give the same decisions: the same starts, aborts and hand-backs, in the same order, at about the same time.

The scenario: tenant A's 20 lines on a harvested endpoint of 4 slots whose ceiling grows a line a second; tenant B's
4 lines arrive while A holds every slot (preemption); one of B's lines gets a 429 with Retry-After; the engine
reports a queue (the harvest controller cuts and sheds); A is cancelled while lines of it run (the grace, then
aborts). Both drivers run on `VirtualTimeLoop`-style clocks, so nothing here waits on the wall clock.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from backfill.config import BackendSettings, Settings
from backfill.core.dispatch import DispatchCore
from backfill.core.events import Abort, Action, Event, Leased, Record
from backfill.core.pool import Start
from backfill.dispatch.dispatcher import Dispatcher
from backfill.domain.batches import Batch, BatchStatus
from backfill.domain.engine_load import EngineLoad
from backfill.domain.files import FileRecord
from backfill.domain.outcomes import Outcome, OutcomeKind
from backfill.domain.usage import Usage
from backfill.domain.valid_lines import ValidLine
from backfill.sim.virtual import BatchSpec, LineSpec, VirtualDriver
from backfill.sim.virtual_engines import EventLoop
from backfill.testing import InMemoryBlobStore, InMemoryStore, VirtualTimeLoop

T0 = 1_000_000.0
LATENCY_S = 2.75
REFUSED_S = 0.1
FAIL_ONCE_PROMPT = 777  # the prompt size that marks the line whose first attempt gets a 429
B_ARRIVES_S = 3.4
CANCEL_A_S = 15.3
QUEUE_FROM_S, QUEUE_UNTIL_S = 11.5, 13.5  # the engine reports 5 waiting requests: readings at +12 and +13
MODEL = VirtualDriver.MODEL
ENDPOINT = "e"

SETTINGS = Settings(
    backends=[
        BackendSettings(
            name=ENDPOINT,
            url="http://e.test",
            models=[MODEL],
            max_concurrency=4,
            adaptive_concurrency=False,
            harvest=True,
            flavour="vllm",
            priority="off",
        )
    ],
    poll_interval_s=0.5,
    engine_metrics_interval_s=1.0,
    cancel_grace_s=0.5,
    max_attempts=3,
    retry_base_s=1.0,
)

LINES_A = [LineSpec(100, 50) for _ in range(20)]
LINES_B = [LineSpec(100, 50), LineSpec(FAIL_ONCE_PROMPT, 50), LineSpec(100, 50), LineSpec(100, 50)]


def waiting_at(t: float) -> int:
    return 5 if QUEUE_FROM_S <= t - T0 < QUEUE_UNTIL_S else 0


TOO_MANY = Outcome(OutcomeKind.HTTP_ERROR, 429, b'{"error": {"message": "slow down"}}', retry_after_s=2.0)


def answer(prompt_tokens: int) -> Outcome:
    return Outcome(OutcomeKind.SUCCESS, 200, b"{}", usage=Usage(input_tokens=prompt_tokens, output_tokens=50))


class RecordingCore(DispatchCore):
    """The production core, noting each start, abort and line update it decides: (time, what, batch, line, how)."""

    def __init__(self) -> None:
        super().__init__(SETTINGS, [(_Endpoint(ENDPOINT, 4), [MODEL])], rng=random.Random(7))
        self.log: list[tuple[float, str, str, int, str]] = []
        self._lines: dict[int, tuple[str, int]] = {}

    def handle(self, event: Event, now: float) -> list[Action]:
        if isinstance(event, Leased):
            self._lines |= {line.id: (line.batch_id, line.line_no) for grant in event.grants for line in grant.lines}
        actions = super().handle(event, now)
        for action in actions:
            match action:
                case Start(line, batch, endpoint, _):
                    self.log.append((now - T0, "start", batch.id, line.line_no, endpoint))
                case Abort(line_id, _, reason):
                    self.log.append((now - T0, "abort", *self._lines[line_id], reason.value))
                case Record(update):
                    self.log.append((now - T0, "record", *self._lines[update.id], update.state.value))
        return actions


@dataclass(frozen=True)
class _Endpoint:
    name: str
    max_concurrency: int


# --- the simulator's driver ------------------------------------------------------------------------------------


class ScriptedEngine:
    """Every request takes LATENCY_S; the first one with FAIL_ONCE_PROMPT tokens is refused with a 429."""

    def __init__(self, loop: EventLoop) -> None:
        self.loop = loop
        self.refused = False
        self.running: set[str] = set()

    def submit(self, line_id: str, prompt_tokens: int, output_tokens: int, prefix: Any, done: Any, **_: Any) -> None:
        self.running.add(line_id)
        refuse = prompt_tokens == FAIL_ONCE_PROMPT and not self.refused
        self.refused |= refuse

        def finish() -> None:
            if line_id in self.running:
                self.running.discard(line_id)
                done(self.loop.now, TOO_MANY if refuse else answer(prompt_tokens))

        self.loop.at(self.loop.now + (REFUSED_S if refuse else LATENCY_S), finish)

    def abort(self, line_id: str) -> None:
        self.running.discard(line_id)

    def load(self) -> EngineLoad:
        return EngineLoad(len(self.running), waiting_at(self.loop.now), None, None)


def run_virtual() -> list[tuple[float, str, str, int, str]]:
    loop = EventLoop()
    loop.now = T0
    core = RecordingCore()
    driver = VirtualDriver(loop, {ENDPOINT: ScriptedEngine(loop)}, SETTINGS, core=core)
    driver.submit_at(BatchSpec("batch_a", "tenant-a", T0, 86_400, LINES_A))
    driver.submit_at(BatchSpec("batch_b", "tenant-b", T0 + B_ARRIVES_S, 86_400, LINES_B))
    driver.cancel_at("batch_a", T0 + CANCEL_A_S)
    loop.run(until=T0 + 120)
    assert [BatchStatus.CANCELLED, BatchStatus.COMPLETED] == [run.status for run in driver.runs.values()]
    assert 0 == driver.runs["batch_b"].open_lines
    return core.log


# --- the production driver -------------------------------------------------------------------------------------


class ScriptedBackend:
    """The same script behind the Backend port: the line's body says whether its first attempt is refused."""

    name = ENDPOINT
    models = frozenset({MODEL})
    max_concurrency = 4

    def __init__(self) -> None:
        self.refused = False

    async def send(self, endpoint: str, body: bytes, timeout_s: float) -> Outcome:
        prompt_tokens = orjson.loads(body)["prompt_tokens"]
        refuse = prompt_tokens == FAIL_ONCE_PROMPT and not self.refused
        self.refused |= refuse
        await asyncio.sleep(REFUSED_S if refuse else LATENCY_S)
        return TOO_MANY if refuse else answer(prompt_tokens)

    async def close(self) -> None:
        return None


def metrics_text(request: httpx.Request) -> httpx.Response:
    waiting = waiting_at(asyncio.get_running_loop().time())
    return httpx.Response(200, text=f"vllm:num_requests_running 0\nvllm:num_requests_waiting {waiting}\n")


async def add_batch(
    store: InMemoryStore, blobs: InMemoryBlobStore, batch_id: str, tenant: str, lines: list[LineSpec]
) -> str:
    now = int(asyncio.get_running_loop().time())
    tenant_id = await store.ensure_tenant(tenant, now)
    data, valid = bytearray(), []
    for number, line in enumerate(lines, start=1):
        body = {"model": MODEL, "messages": [], "max_tokens": line.output_tokens, "prompt_tokens": line.prompt_tokens}
        raw = orjson.dumps(
            {"custom_id": f"{batch_id}-{number}", "method": "POST", "url": "/v1/chat/completions", "body": body}
        )
        valid.append(
            ValidLine(number, f"{batch_id}-{number}", len(data), len(raw), line.prompt_tokens, line.output_tokens)
        )
        data += raw + b"\n"
    writer = blobs.open_writer(f"inputs/{batch_id}")
    writer.write(bytes(data))
    await writer.commit()
    file_id = f"file-{batch_id}"
    await store.add_file(
        FileRecord(file_id, tenant_id, "in.jsonl", "batch", len(data), f"inputs/{batch_id}", now, None)
    )
    batch = Batch(
        batch_id, tenant_id, "/v1/chat/completions", file_id, "24h", BatchStatus.VALIDATING, now, now + 86_400
    )
    await store.create_batch(batch)
    assert await store.claim_batch(batch_id, "setup", now, 60.0)
    assert await store.start_batch(batch_id, "setup", MODEL, valid, now)
    await store.release_batch(batch_id, "setup")
    return tenant_id


async def production() -> list[tuple[float, str, str, int, str]]:
    loop = asyncio.get_running_loop()
    store, blobs, core = InMemoryStore(), InMemoryBlobStore(), RecordingCore()
    tenant_a = await add_batch(store, blobs, "batch_a", "tenant-a", LINES_A)
    dispatcher = Dispatcher(
        store, blobs, [ScriptedBackend()], SETTINGS, clock=loop.time, owner="worker-1", core=core,
        metrics_transport=httpx.MockTransport(metrics_text),
    )  # fmt: skip
    stop = asyncio.Event()
    running = asyncio.create_task(dispatcher.run(stop))
    await asyncio.sleep(B_ARRIVES_S)
    await add_batch(store, blobs, "batch_b", "tenant-b", LINES_B)
    dispatcher.wake()
    await asyncio.sleep(CANCEL_A_S - B_ARRIVES_S)
    await store.request_cancel(tenant_a, "batch_a", int(loop.time()))
    dispatcher.wake()
    while (batch := await store.get_batch(None, "batch_b")) is None or not batch.status.is_terminal:
        await asyncio.sleep(1.0)  # virtual time
        assert loop.time() < T0 + 120, "batch B never finished"
    stop.set()
    await running
    batch_a = await store.get_batch(None, "batch_a")
    assert batch_a is not None
    assert BatchStatus.CANCELLED == batch_a.status
    return core.log


def run_production() -> list[tuple[float, str, str, int, str]]:
    loop = VirtualTimeLoop(start=T0)
    try:
        return loop.run_until_complete(production())
    finally:
        loop.close()


def test_the_simulator_and_the_asyncio_dispatcher_make_the_same_decisions() -> None:
    virtual, real = run_virtual(), run_production()

    def decisions(log: list[tuple[float, str, str, int, str]]) -> list[tuple[str, str, int, str]]:
        return [entry[1:] for entry in log if entry[1] in ("start", "abort") or entry[4] == "queued"]

    assert decisions(virtual) == decisions(real)
    starts_virtual = [t for t, what, *_ in virtual if what == "start"]
    starts_real = [t for t, what, *_ in real if what == "start"]
    # The drivers' timers have different phases (polls, commits, housekeeping): within one poll interval.
    assert all(abs(a - b) <= SETTINGS.poll_interval_s + 0.05 for a, b in zip(starts_virtual, starts_real, strict=True))


def test_the_scenario_exercises_what_it_claims() -> None:
    log = run_virtual()
    kinds = {(what, how) for _, what, _, _, how in log}
    assert {("abort", "preempted"), ("abort", "shed"), ("abort", "cancelled")} <= kinds
    assert ("record", "queued") in kinds
    assert ("record", "cancelled") in kinds
    refused = [t for t, what, batch, line, how in log if (batch, line, what, how) == ("batch_b", 2, "record", "queued")]
    assert refused, "B's line 2 was never handed back after its 429"
