"""Harvesting: a real `backfill serve` shares an engine simulator with interactive traffic sent through its proxy.

While interactive requests keep the engine full, the harvest controller cuts the batch lines' ceiling and hands
back the newest lines; the batch shows it is throttled, and still completes with every line exactly once.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.acceptance.conftest import StartServer, client_for
from tests.acceptance.helpers import chat_line, jsonl, read_jsonl, wait_terminal
from tests.support.processes import Server, sim_serving

MODEL = "harvest-sim"
# Four sequences at a time, 20 tokens each at ~10 ms a step: a line takes about 0.25 s when the engine is free.
PROFILE = f"""
model = "{MODEL}"
max_num_seqs = 4
output_len_dist = "fixed"
output_len_mean = 20
iteration_base_s = 0.01
scheduling_policy = "priority"
"""


@pytest.fixture
def simulator(tmp_path: Path) -> Iterator[str]:
    with sim_serving(PROFILE, tmp_path) as url:
        yield url


def gauge(server: Server, name: str, **labels: str) -> float | None:
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


def test_interactive_load_throttles_batch_work_which_still_completes_once_per_line(
    start_server: StartServer, simulator: str
) -> None:
    server = start_server(
        backends=[
            {
                "name": "shared",
                "url": simulator,
                "models": [MODEL],
                "flavour": "vllm",
                "max_concurrency": 8,
                "harvest": True,
                "priority": "on",
            },
        ],
        engine_metrics_interval_s=0.2,
        outlook_interval_s=0.3,
        poll_interval_s=0.2,
    )
    client = client_for(server)
    lines = [chat_line(f"line-{n}", f"batch line {n}", model=MODEL) for n in range(120)]
    uploaded = client.files.create(file=("input.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")

    def ceiling() -> float:
        return gauge(server, "backfill_harvest_limit", backend="shared") or 0.0

    deadline = time.monotonic() + 20
    while ceiling() < 4 and time.monotonic() < deadline:  # harvesting: the ceiling grows from 0 while idle
        time.sleep(0.1)
    before = ceiling()
    assert before >= 4

    stop = threading.Event()
    answered: list[int] = []

    def interactive() -> None:
        with client_for(server) as session:
            while not stop.is_set():
                reply = session.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=20
                )
                answered.append(reply.usage.completion_tokens if reply.usage else 0)

    users = [threading.Thread(target=interactive) for _ in range(10)]
    for user in users:
        user.start()
    states: set[str] = set()
    lowest = before
    try:
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            lowest = min(lowest, ceiling())
            extra = client.batches.retrieve(batch.id).model_extra or {}
            states.add(str((extra.get("backfill") or {}).get("schedule")))
            time.sleep(0.1)
    finally:
        stop.set()
        for user in users:
            user.join(30)

    assert answered
    assert all(tokens == 20 for tokens in answered)  # interactive requests were all served, in full
    assert lowest < before  # ten users keep more than the engine's four slots busy: the ceiling was cut
    assert "throttled" in states
    assert (gauge(server, "backfill_lines_shed_total", backend="shared") or 0) >= 1  # the newest went back

    done = wait_terminal(client, batch.id, timeout_s=120)
    assert "completed" == done.status
    assert done.output_file_id is not None
    output = read_jsonl(client, done.output_file_id)
    assert sorted(f"line-{n}" for n in range(120)) == sorted(line["custom_id"] for line in output)
    assert all(200 == line["response"]["status_code"] for line in output)
    assert done.request_counts is not None
    assert (120, 0) == (done.request_counts.completed, done.request_counts.failed)
