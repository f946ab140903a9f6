"""`backfill serve --role api|worker`: separate API and dispatcher processes on one database, and a worker's
graceful stop on SIGTERM."""

from __future__ import annotations

import io
import signal
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import httpx
import orjson
from openai.types import Batch

from tests.acceptance.conftest import MODEL, StartServer, client_for
from tests.acceptance.helpers import chat_line, jsonl, start_batch, wait_terminal
from tests.acceptance.test_harvest import MODEL as HARVEST_MODEL
from tests.acceptance.test_harvest import PROFILE as HARVEST_PROFILE
from tests.support.databases import fetch_rows
from tests.support.processes import Server, Upstream, sim_serving

T = TypeVar("T")


def test_an_api_replica_and_a_worker_run_a_batch_together(start_server: StartServer) -> None:
    api = start_server(role="api")
    worker = start_server(role="worker", data_dir=api.data_dir)  # local blobs: one directory for both
    client = client_for(api)
    lines = [chat_line(f"req-{i}", f"roles line {i}") for i in range(30)]
    uploaded = client.files.create(file=("in.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")

    done = wait_terminal(client, batch.id)

    assert ("completed", 30) == (done.status, done.request_counts.completed if done.request_counts else None)
    assert done.output_file_id is not None
    output = client.files.content(done.output_file_id).read().splitlines()
    assert [f"req-{i}" for i in range(30)] == [orjson.loads(line)["custom_id"] for line in output]
    worker_metrics = httpx.get(f"{worker.base_url}/metrics").text
    api_metrics = httpx.get(f"{api.base_url}/metrics").text
    assert 'backfill_lines_finished_total{state="succeeded"} 30.0' in worker_metrics
    assert 'backfill_lines_finished_total{state="succeeded"}' not in api_metrics  # the API sent nothing


def test_a_worker_serves_only_health_and_metrics(start_server: StartServer) -> None:
    worker = start_server(role="worker")

    answers = {
        path: httpx.get(f"{worker.base_url}{path}").status_code
        for path in ("/healthz", "/readyz", "/metrics", "/v1/batches", "/v1/files", "/v1/messages/batches")
    }
    proxied = httpx.post(f"{worker.base_url}/v1/chat/completions", json={"model": MODEL, "messages": []})

    expected = {"/healthz": 200, "/readyz": 200, "/metrics": 200}
    expected |= {"/v1/batches": 404, "/v1/files": 404, "/v1/messages/batches": 404}
    assert expected == answers
    assert 404 == proxied.status_code


def test_an_api_replica_alone_validates_nothing_and_sends_nothing(start_server: StartServer) -> None:
    api = start_server(role="api")
    client = client_for(api)
    uploaded = client.files.create(file=("in.jsonl", io.BytesIO(jsonl([chat_line("a", "x")]))), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")

    time.sleep(1.5)  # many poll intervals (0.1 s): a dispatcher would have validated it long since

    assert "validating" == client.batches.retrieve(batch.id).status


def test_split_roles_without_backends_refuse_to_start(start_server: StartServer) -> None:
    server = start_server(role="api")
    server.stop()
    server.config_path.write_text("poll_interval_s = 0.1\n")  # no [[backends]]

    result = subprocess.run(server.command("serve", "--role", "worker"), capture_output=True, timeout=60)

    assert 0 != result.returncode
    assert b"role 'worker' needs [[backends]]" in result.stderr


def test_sigterm_stops_leasing_at_once_and_finishes_lines_in_flight(
    start_server: StartServer, upstream: Upstream
) -> None:
    tag = f"sigterm-{time.time_ns()}"
    api, worker, batch = _split_roles_running(start_server, upstream, tag, lines=24, slow_ms=1500, grace_s=20.0)
    client = client_for(api)

    assert worker.process is not None
    worker.process.send_signal(signal.SIGTERM)
    signalled_at = time.time()
    exit_code = worker.process.wait(30)
    stopped_after_s = time.time() - signalled_at
    time.sleep(2.0)  # anything sent after the signal has been answered (1.5 s) and logged by now

    arrivals = [entry for entry in upstream.stats()["log"] if entry["key"].startswith(tag)]
    after_signal = [entry for entry in arrivals if entry["t"] > signalled_at]
    assert _arrived(upstream, tag) == len(arrivals)
    counts = client.batches.retrieve(batch.id).request_counts
    assert -signal.SIGTERM == exit_code  # uvicorn re-raises the signal once it has shut down cleanly
    assert [] == after_signal  # nothing new was sent once the signal arrived
    assert 1.0 < stopped_after_s < 10.0  # it waited for the lines in flight (1.5 s each), not for the grace
    assert counts is not None
    assert (len(arrivals), 0) == (counts.completed, counts.failed)  # each line sent finished and was recorded
    assert '"in_flight": 4, "aborted": 0, "event": "dispatcher.stopped"' in worker.log_text()

    start_server(role="worker", backends=_backends(upstream), data_dir=api.data_dir)  # the rest, on another worker
    done = wait_terminal(client, batch.id)
    assert ("completed", 24) == (done.status, done.request_counts.completed if done.request_counts else None)
    keys = [entry["key"] for entry in upstream.stats()["log"] if entry["key"].startswith(tag)]
    assert sorted(keys) == sorted(set(keys))


def test_sigterm_hands_back_lines_still_in_flight_when_the_grace_runs_out(
    start_server: StartServer, upstream: Upstream
) -> None:
    tag = f"grace-{time.time_ns()}"
    api, worker, batch = _split_roles_running(start_server, upstream, tag, lines=4, slow_ms=20_000, grace_s=0.5)
    client = client_for(api)

    assert worker.process is not None
    worker.process.send_signal(signal.SIGTERM)
    signalled_at = time.monotonic()
    assert -signal.SIGTERM == worker.process.wait(30)

    assert time.monotonic() - signalled_at < 8.0
    assert {"queued/0": 4} == _line_states(api, batch.id)  # handed back uncharged at once: no lease to lapse
    assert '"in_flight": 4, "aborted": 4, "event": "dispatcher.stopped"' in worker.log_text()
    assert 0 == client.batches.retrieve(batch.id).request_counts.failed  # type: ignore[union-attr]


def _backends(upstream: Upstream) -> list[dict[str, object]]:
    return [{"name": "up", "url": upstream.url, "models": [MODEL], "max_concurrency": 4}]


def _split_roles_running(
    start_server: StartServer, upstream: Upstream, tag: str, *, lines: int, slow_ms: int, grace_s: float
) -> tuple[Server, Server, Batch]:
    """An API replica and a worker (4 lines in flight at most, `shutdown_grace_s` = grace_s) running a batch of
    slow lines, once 4 of them have reached the upstream."""
    api = start_server(role="api")
    worker = start_server(role="worker", backends=_backends(upstream), data_dir=api.data_dir, shutdown_grace_s=grace_s)
    client = client_for(api)
    requests = [chat_line(f"req-{i}", f"{tag} {i} #slow:{slow_ms}") for i in range(lines)]
    uploaded = client.files.create(file=("in.jsonl", io.BytesIO(jsonl(requests))), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + 30
    while _arrived(upstream, tag) < 4:
        assert time.monotonic() < deadline, "the lines did not reach the upstream"
        time.sleep(0.05)
    return api, worker, batch


def _arrived(upstream: Upstream, tag: str) -> int:
    """Requests of this test that reached the upstream, answered or not."""
    return sum(n for key, n in upstream.stats()["by_key"].items() if key.startswith(tag))


def _line_states(server: Server, batch_id: str) -> dict[str, int]:
    """Lines of a batch by (state, attempts charged), read from the database."""
    query = "SELECT state, attempts, count(*) FROM requests WHERE batch_id = %s GROUP BY state, attempts"
    rows = fetch_rows(server.database_url, query, (batch_id,))
    return {f"{state}/{attempts}": int(str(n)) for state, attempts, n in rows}


def test_an_api_replica_s_dashboard_draws_what_the_workers_know_of_each_backend(
    start_server: StartServer, tmp_path: Path
) -> None:
    """With the dispatchers in another process, the endpoints page still has the harvest ceiling, the engine's queue
    and up/down: the worker publishes them through the database (worker_backends) and the replica reads them."""
    with sim_serving(HARVEST_PROFILE, tmp_path) as url:
        shared = {"name": "shared", "url": url, "models": [HARVEST_MODEL], "flavour": "vllm", "harvest": True}
        api = start_server(role="api", backends=[shared])
        start_server(role="worker", backends=[shared], data_dir=api.data_dir, engine_metrics_interval_s=0.2)
        start_batch(client_for(api), [chat_line(f"l{n}", f"line {n}", model=HARVEST_MODEL) for n in range(200)])
        with httpx.Client(base_url=f"{api.base_url}/ui/api", timeout=10) as ui:
            ui.post("/login", json={"key": ""}).raise_for_status()

            def drawn() -> dict[str, object] | None:
                samples = ui.get("/endpoints").json()["backends"].get("shared", [])
                full = [s for s in samples if s["harvest_ceiling"] is not None and s["engine_waiting"] is not None]
                return full[-1] if full else None

            sample = poll(drawn, timeout_s=60)

    assert sample["up"] is True
    assert sample["harvest_ceiling"] >= 1
    assert isinstance(sample["batch_in_flight"], int)


def poll(read: Callable[[], T | None], timeout_s: float) -> T:
    """`read()` once it gives something, asking again every tenth of a second (the figures are sampled by a
    process we cannot signal from here)."""
    deadline = time.monotonic() + timeout_s
    while (got := read()) is None:
        assert time.monotonic() < deadline, f"nothing after {timeout_s} s"
        time.sleep(0.1)
    return got


def test_a_worker_harvests_on_the_ttft_the_api_replica_s_proxy_measures(
    start_server: StartServer, tmp_path: Path
) -> None:
    """The proxy runs in the API replica, the harvest controller in the worker: the replica publishes its TTFT
    samples and the worker's controller learns its baseline from them (it needs 50 taken with no batch running)."""
    with sim_serving(HARVEST_PROFILE, tmp_path) as url:
        shared = {"name": "shared", "url": url, "models": [HARVEST_MODEL], "flavour": "vllm", "harvest": True}
        fast = {"engine_metrics_interval_s": 0.2}
        api = start_server(role="api", backends=[shared], **fast)
        worker = start_server(role="worker", backends=[shared], data_dir=api.data_dir, **fast)
        client = client_for(api)

        def ask(n: int) -> None:
            client.chat.completions.create(
                model=HARVEST_MODEL, messages=[{"role": "user", "content": f"hello {n}"}], max_tokens=5
            )

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(ask, range(60)))

        def baseline() -> float | None:
            metrics = httpx.get(f"{worker.base_url}/metrics").text
            line = next(
                (x for x in metrics.splitlines() if x.startswith("backfill_harvest_ttft_baseline_seconds{")), None
            )
            return None if line is None else float(line.rsplit(" ", 1)[1])

        learned = poll(baseline, timeout_s=30)

    assert 0 < learned < 30
