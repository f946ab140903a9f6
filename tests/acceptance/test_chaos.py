"""Chaos: 2 API replicas and 3 workers on PostgreSQL and a real S3 server, one process killed with SIGKILL every
few seconds and restarted, while 5 batches of 2,000 lines run against the engine simulator.

At the end every batch is completed, every custom_id is in its output file exactly once, no line reached the
simulator after its success had been committed, and counts and usage equal what the lines say.
"""

from __future__ import annotations

import io
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import openai
import orjson
import pytest
from openai import OpenAI

from tests.support.databases import fetch_rows, postgres_schema_url
from tests.support.processes import Server, sim_serving, write_config
from tests.support.s3 import S3Server, running_s3_server

BATCHES = 5
LINES = 2000
SIM_MODEL = "sim-chaos"
OUTPUT_TOKENS = 16
PROFILE = f'model = "{SIM_MODEL}"\noutput_len_dist = "fixed"\noutput_len_mean = {OUTPUT_TOKENS}\n'
T = TypeVar("T")


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with running_s3_server(tmp_path_factory.mktemp("chaos-s3")) as server:
        yield server


@pytest.fixture
def simulator(tmp_path: Path) -> Iterator[str]:
    # Answers of 16 tokens in ~0.17 s and 3 workers x 16 in flight: 10,000 lines take 35 s or more however fast
    # the machine (so a process dies many times meanwhile), with lines always in flight when one does.
    with sim_serving(PROFILE, tmp_path) as url:
        yield url


@dataclass
class Cluster:
    apis: list[Server]
    workers: list[Server]
    database_url: str
    kills: list[tuple[str, float]] = field(default_factory=list)
    # (taken at, custom_ids whose success was committed by then): none may reach the simulator after that time.
    committed: list[tuple[float, set[str]]] = field(default_factory=list)

    @property
    def processes(self) -> list[Server]:
        return self.apis + self.workers

    def clients(self) -> list[OpenAI]:
        return [OpenAI(base_url=f"{api.base_url}/v1", api_key="open", max_retries=0, timeout=30) for api in self.apis]

    def on_any_api(self, clients: list[OpenAI], call: Callable[[OpenAI], T]) -> T:
        """`call` on the first API replica that answers (one may be dead or restarting), like a load balancer."""
        deadline = time.monotonic() + 60
        while True:
            for client in clients:
                try:
                    return call(client)
                except (openai.APIConnectionError, openai.InternalServerError):
                    continue
            assert time.monotonic() < deadline, "no API replica answered for 60 s"
            time.sleep(0.2)

    def snapshot_committed(self) -> None:
        rows = fetch_rows(self.database_url, "SELECT custom_id FROM requests WHERE state = 'succeeded'")
        # Taken once the read has answered: every row it saw was committed by then. Taken before the read (as it
        # was), a line first sent and committed while the read was connecting looked "sent after its commit".
        taken_at = time.time()
        self.committed.append((taken_at, {str(row[0]) for row in rows}))

    def kill_one(self, rng: random.Random, which: Server | None = None) -> None:
        victim = which or rng.choice(self.processes)
        self.snapshot_committed()
        victim.kill9()
        self.kills.append((victim.role, time.time()))
        victim.start()


def _line(batch: int, i: int, tag: str) -> dict[str, Any]:
    return {
        "custom_id": f"b{batch}-{i}",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": SIM_MODEL,
            "max_tokens": OUTPUT_TOKENS,
            "messages": [{"role": "user", "content": f"{tag} b{batch}-{i} please summarise item {i}"}],
        },
    }


def _start_cluster(tmp_path: Path, database_url: str, s3: S3Server, simulator: str) -> Cluster:
    prefix = f"chaos-{time.time_ns()}"
    settings = {
        "blob_store": "s3",
        "s3_bucket": s3.bucket,
        "s3_prefix": prefix,
        "s3_endpoint_url": s3.endpoint_url,
        "poll_interval_s": 0.2,
        "lease_ttl_s": 3.0,  # a dead worker's lines come back within 3 s
        "retry_base_s": 0.05,
        "retry_max_s": 0.5,
        "shutdown_grace_s": 2.0,
    }
    backend = {
        "name": "sim",
        "url": simulator,
        "models": [SIM_MODEL],
        "flavour": "vllm",
        "max_concurrency": 16,
        "adaptive_concurrency": False,
    }
    config = write_config(tmp_path / "backfill.toml", settings, [backend])
    servers: dict[str, list[Server]] = {"api": [], "worker": []}
    for role, count in (("api", 2), ("worker", 3)):
        for index in range(count):
            data_dir = tmp_path / f"{role}{index}"
            data_dir.mkdir()
            server = Server(data_dir, config, database_url, role=role, extra_env=s3.env())
            servers[role].append(server.start())
    return Cluster(servers["api"], servers["worker"], database_url)


@pytest.mark.timeout(1800)  # ~80 s on a quiet machine; a busy one is slower, and _wait_all fails on a stall
def test_kill_9_anywhere_loses_nothing_and_runs_nothing_twice(
    tmp_path: Path, s3_server: S3Server, simulator: str
) -> None:
    rng = random.Random(20261203)
    tag = f"chaos{time.time_ns()}"
    with postgres_schema_url() as database_url:
        cluster = _start_cluster(tmp_path, database_url, s3_server, simulator)
        clients = cluster.clients()
        try:
            batch_ids = []
            for b in range(BATCHES):
                data = b"".join(orjson.dumps(_line(b, i, tag)) + b"\n" for i in range(LINES))
                uploaded = clients[b % 2].files.create(file=(f"in{b}.jsonl", io.BytesIO(data)), purpose="batch")
                batch = clients[b % 2].batches.create(
                    input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
                )
                batch_ids.append(batch.id)

            stop = threading.Event()
            chaos = threading.Thread(target=_kill_loop, args=(cluster, rng, stop), daemon=True)
            chaos.start()
            try:
                finished = _wait_all(cluster, clients, batch_ids, stall_s=180)
            finally:
                stop.set()
                chaos.join(60)
            cluster.snapshot_committed()

            roles_killed = {role for role, _ in cluster.kills}
            assert len(cluster.kills) >= 6, cluster.kills
            assert {"api", "worker"} == roles_killed, cluster.kills
            for b, batch in enumerate(finished):
                assert "completed" == batch["status"], batch
                lines = _result_lines(cluster, clients, batch)
                assert sorted(f"b{b}-{i}" for i in range(LINES)) == sorted(line["custom_id"] for line in lines)
                assert [f"b{b}-{i}" for i in range(LINES)] == [line["custom_id"] for line in lines]  # input order
                _assert_counts_match_lines(batch, lines)
            _assert_nothing_resent_after_success(cluster, simulator, tag)
        finally:
            for client in clients:
                client.close()
            for server in cluster.processes:
                server.stop()


def _kill_loop(cluster: Cluster, rng: random.Random, stop: threading.Event) -> None:
    # The first two kills hit a worker and an API replica, so both kinds die at least once whatever the draw.
    forced = [rng.choice(cluster.workers), rng.choice(cluster.apis)]
    while not stop.wait(rng.uniform(1.0, 2.5)):
        cluster.kill_one(rng, forced.pop(0) if forced else None)


def _wait_all(cluster: Cluster, clients: list[OpenAI], batch_ids: list[str], stall_s: float) -> list[dict[str, Any]]:
    """Until every batch ends. A busy machine makes the cluster slower, not wrong: fail only when no line has
    completed anywhere for `stall_s`, not after a fixed time."""
    best, moved_at = -1, time.monotonic()
    while True:
        batches = [cluster.on_any_api(clients, lambda c, i=batch_id: _raw_batch(c, i)) for batch_id in batch_ids]
        if all(batch["status"] in ("completed", "failed", "expired", "cancelled") for batch in batches):
            return batches
        done = sum(batch["request_counts"]["completed"] for batch in batches)
        if done > best:
            best, moved_at = done, time.monotonic()
        progress = [(batch["status"], batch["request_counts"]["completed"]) for batch in batches]
        assert time.monotonic() - moved_at < stall_s, f"no line completed for {stall_s}s: {progress}"
        time.sleep(1.0)


def _raw_batch(client: OpenAI, batch_id: str) -> dict[str, Any]:
    response = client.batches.with_raw_response.retrieve(batch_id)
    result: dict[str, Any] = orjson.loads(response.content)
    return result


def _result_lines(cluster: Cluster, clients: list[OpenAI], batch: dict[str, Any]) -> list[dict[str, Any]]:
    assert batch["error_file_id"] is None, "no line may fail: a kill never charges an attempt"
    content = cluster.on_any_api(clients, lambda c: c.files.content(batch["output_file_id"]).read())
    return [orjson.loads(line) for line in content.splitlines()]


def _assert_counts_match_lines(batch: dict[str, Any], lines: list[dict[str, Any]]) -> None:
    usages = [line["response"]["body"]["usage"] for line in lines]
    prompt = sum(usage["prompt_tokens"] for usage in usages)
    completion = sum(usage["completion_tokens"] for usage in usages)
    assert {"total": LINES, "completed": LINES, "failed": 0} == batch["request_counts"]
    expected_usage = (prompt, completion, prompt + completion)
    usage = batch["usage"]
    assert expected_usage == (usage["input_tokens"], usage["output_tokens"], usage["total_tokens"])


def _assert_nothing_resent_after_success(cluster: Cluster, simulator: str, tag: str) -> None:
    log = httpx.get(f"{simulator}/_stats", timeout=60).json()["log"]
    arrivals: dict[str, list[float]] = {}
    for entry in log:
        if entry["key"].startswith(tag):
            custom_id = entry["key"].split()[1]
            arrivals.setdefault(custom_id, []).append(entry["t"])
    assert BATCHES * LINES == len(arrivals)
    late = [
        (custom_id, taken_at)
        for taken_at, committed in cluster.committed
        for custom_id in committed
        if any(t > taken_at for t in arrivals.get(custom_id, []))
    ]
    assert [] == late
    resent = sum(len(times) - 1 for times in arrivals.values())
    print(f"chaos: {len(cluster.kills)} kills, {resent} requests sent again (lines in flight at a kill)")
