"""Engine load signals and engine priorities against real `backfill sim serve` processes (vLLM-flavoured)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from backfill.backends.engine_metrics import EngineLoad, EngineMetrics, quantile, ttft_between
from backfill.backends.openai_http import OpenAIHttpBackend
from backfill.config import BackendSettings
from backfill.domain.outcomes import OutcomeKind
from tests.support.processes import sim_serve

MODEL = "sim-signals"
CHAT = "/v1/chat/completions"
# One sequence at a time, 10 ms modelled a step: at time scale 0.5 a 20-token answer takes about 0.1 s of wall time,
# so requests sent together queue in the engine for long enough to be seen there.
PROFILE = f"""
model = "{MODEL}"
max_num_seqs = 1
max_num_batched_tokens = 512
num_gpu_blocks = 1024
iteration_base_s = 0.01
scheduling_policy = "{{policy}}"
"""


@contextmanager
def policy_sim(directory: Path, policy: str) -> Iterator[str]:
    """`backfill sim serve` with this scheduling policy on a free port; yields its URL."""
    profile = directory / f"{policy}.toml"
    profile.write_text(PROFILE.format(policy=policy))
    with sim_serve(profile, "--time-scale", "0.5") as url:
        yield url


@pytest.fixture(scope="module")
def fcfs_sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One FCFS simulator for the module (a process takes seconds to start); its counts are reset for each test."""
    with policy_sim(tmp_path_factory.mktemp("fcfs"), "fcfs") as url:
        yield url


@pytest.fixture
def fcfs(fcfs_sim: str) -> str:
    httpx.post(f"{fcfs_sim}/_reset", timeout=5).raise_for_status()
    return fcfs_sim


def line(text: str, max_tokens: int = 20) -> bytes:
    body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens}
    return orjson.dumps(body | {"ignore_eos": True})


def settings(url: str, **fields: Any) -> BackendSettings:
    return BackendSettings(name="sim", url=f"{url}/v1", models=[MODEL], flavour="vllm", **fields)


def statuses(url: str) -> dict[str, int]:
    by_status: dict[str, int] = httpx.get(f"{url}/_stats?log=0", timeout=5).json()["by_status"]
    return by_status


async def test_one_scrape_reads_running_waiting_kv_and_ttft_from_the_simulator(fcfs: str) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        probe = EngineMetrics(settings(fcfs), client)
        idle = await probe.load()
        sends = [asyncio.create_task(client.post(f"{fcfs}{CHAT}", content=line(f"q{i}", 40))) for i in range(4)]
        seen: list[EngineLoad] = []
        while not all(task.done() for task in sends):
            if (load := await probe.load()) is not None:
                seen.append(load)
            await asyncio.sleep(0.01)
        answers = await asyncio.gather(*sends)
        done = await probe.load()

    assert {200} == {answer.status_code for answer in answers}
    assert idle is not None
    assert done is not None
    assert (0, 0, 0.0) == (idle.running, idle.waiting, idle.kv_usage)
    # One running in the only slot, holding KV blocks, the others waiting for it.
    assert any(load.running == 1 and (load.waiting or 0) >= 2 and (load.kv_usage or 0.0) > 0.0 for load in seen)
    assert (0, 0) == (done.running, done.waiting)
    assert idle.ttft is not None
    assert done.ttft is not None
    interval = ttft_between(idle.ttft, done.ttft)
    assert interval is not None
    assert 4 == interval.count
    # The first answer starts at once; the last waits for three 40-step answers (at least 1.2 modelled seconds).
    first, last = quantile(interval, 0.25), quantile(interval, 1.0)
    assert first is not None
    assert last is not None
    assert first < 1.0 < last, interval


async def test_batch_lines_carry_a_low_priority_the_simulator_schedules_by(tmp_path: Path) -> None:
    sent: list[bytes] = []

    async def record(request: httpx.Request) -> None:
        sent.append(request.content)

    with policy_sim(tmp_path, "priority") as url:
        client = httpx.AsyncClient(event_hooks={"request": [record]})
        backend = OpenAIHttpBackend(settings(url), client)
        finished: list[str] = []

        async def batch_line(i: int) -> OutcomeKind:
            outcome = await backend.send(CHAT, line(f"batch {i}"), 30.0)
            finished.append(f"batch {i}")
            return outcome.kind

        async with httpx.AsyncClient(timeout=30) as interactive:
            probe = EngineMetrics(settings(url), interactive)
            batch = [asyncio.create_task(batch_line(i)) for i in range(4)]
            for _ in range(2000):  # until three batch lines wait behind the running one
                load = await probe.load()
                if load is not None and (load.waiting or 0) >= 3:
                    break
                await asyncio.sleep(0.005)
            answer = await interactive.post(f"{url}{CHAT}", content=line("interactive"))  # priority 0
            finished.append("interactive")
            kinds = await asyncio.gather(*batch)
        await backend.close()
        by_status = statuses(url)

    assert [OutcomeKind.SUCCESS] * 4 == kinds
    assert 200 == answer.status_code
    assert {"200": 5} == by_status  # the simulator took every line's non-zero priority
    assert [10] * 4 == [orjson.loads(body)["priority"] for body in sent]
    assert backend.priority_enabled is True
    # It arrived behind three waiting batch lines, yet finished before them.
    assert finished.index("interactive") <= 1


async def test_auto_on_an_fcfs_engine_resends_refused_lines_and_stops_sending_the_priority(fcfs: str) -> None:
    backend = OpenAIHttpBackend(settings(fcfs))
    together = await asyncio.gather(*(backend.send(CHAT, line(f"first {i}"), 30.0) for i in range(3)))
    later = [await backend.send(CHAT, line(f"later {i}"), 30.0) for i in range(2)]
    await backend.close()
    by_status = statuses(fcfs)

    assert [OutcomeKind.SUCCESS] * 5 == [outcome.kind for outcome in [*together, *later]]
    assert backend.priority_enabled is False
    assert 5 == by_status["200"]
    assert 1 <= by_status["400"] <= 3  # only lines sent before the first refusal came back carried it


async def test_on_against_an_fcfs_engine_reports_its_refusal(fcfs: str) -> None:
    backend = OpenAIHttpBackend(settings(fcfs, priority="on"))
    outcome = await backend.send(CHAT, line("refused"), 30.0)
    await backend.close()

    assert (OutcomeKind.HTTP_ERROR, 400) == (outcome.kind, outcome.status_code)
    assert b"Got priority 10 but Priority scheduling is not enabled." in (outcome.body or b"")
