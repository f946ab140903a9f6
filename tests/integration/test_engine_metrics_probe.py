"""EngineMetrics against the real simulator's /metrics: it sees requests queue in the engine and drain."""

from __future__ import annotations

import asyncio
import dataclasses

import httpx

from backfill.backends.engine_metrics import EngineMetrics
from backfill.config import BackendSettings
from tests.integration.test_sim_server import FAST, MODEL, serve

ONE_SLOT = dataclasses.replace(FAST, max_num_seqs=1, time_scale=0.05)


async def test_the_probe_sees_the_engine_queue_fill_and_drain() -> None:
    with serve(ONE_SLOT) as sim:
        settings = BackendSettings(name="sim", url=f"{sim.url}/v1", models=[MODEL], flavour="vllm")
        async with httpx.AsyncClient() as client:
            probe = EngineMetrics(settings, client)
            idle = await probe.waiting()
            body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 40}
            sends = [asyncio.create_task(client.post(f"{sim.url}/v1/chat/completions", json=body)) for _ in range(4)]
            seen = 0
            while not all(task.done() for task in sends):
                seen = max(seen, await probe.waiting() or 0)
                await asyncio.sleep(0.01)
            answers = await asyncio.gather(*sends)
            drained = await probe.waiting()

    assert (0, 0) == (idle, drained)
    assert seen >= 2  # one running, the others waiting for the only slot
    assert {200} == {answer.status_code for answer in answers}


async def test_an_unreachable_server_gives_no_reading() -> None:
    settings = BackendSettings(name="gone", url="http://127.0.0.1:9/v1", models=[MODEL], flavour="sglang")
    async with httpx.AsyncClient() as client:
        assert await EngineMetrics(settings, client).waiting() is None
