"""Scale-out: the throughput of 1, 2 and 4 dispatcher workers on one PostgreSQL database, and what each line
costs that database.

Issue 7: "throughput of 1, 2 and 4 workers, each capped at 32 lines in flight, against simulator endpoints whose
capacity is not the limit (so the cap is) -- goal >= 3.5x at 4 workers vs 1, showing that coordination through
PostgreSQL does not serialize them -- and the database load per 1,000 lines (statements, commits, rows touched)."

Each side, in one run: a fresh PostgreSQL database, one `backfill serve --role api` and N `backfill serve --role
worker` processes (one config file, local blobs in one shared data dir), every worker's single backend capped at
`max_concurrency` 32 with adaptive concurrency off. The simulator (`backfill sim serve`) runs a profile whose
iteration time does not grow with the batch (a 10 ms step, no per-sequence or per-token cost, 4,096 sequences),
so every request takes the same ~1 s at any concurrency: the engine is never the limit, the workers' caps are.
Each side runs N x --lines-per-worker lines (chat, `max_tokens` 100, `ignore_eos`), so every side lasts as long.

    lines/s     lines / (first line done -> batch `completed`, finalize included), polled every 0.1 s
    ideal       N x 32 / the simulator's mean request time (from its own latency histogram)
    vs 1        lines/s over the 1-worker side's
    per 1,000 lines, counted by backfill itself (every process's backfill_db_* counters, from start to end):
    stmts, commits, rows (returned by SELECTs plus written);
    and by PostgreSQL (pg_stat_database of the side's own database, from its creation to the processes' exit, so
    start-up and migrations are in): xact (transactions committed), tup_w (rows inserted, updated or deleted),
    tup_r (rows read by sequential scans plus index entries returned by index scans).

    .venv/bin/python bench/scaling.py                    # 1, 2, 4 workers, 1,500 lines a worker, ~3 minutes
    .venv/bin/python bench/scaling.py --quick            # 300 lines a worker
    BACKFILL_BENCH_DATABASE_URL=postgresql://user@host/db  # where to create the throwaway databases
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg
from harness import MODEL, Children, machine_line, running, table
from saturation import Sim, SimSpec, load_average, metric, prometheus

from backfill.testing.processes import free_port, wait_http, write_config

CAP = 32
OUTPUT_TOKENS = 100
_PG_COUNTERS = ("xact_commit", "tup_inserted", "tup_updated", "tup_deleted", "tup_returned", "tup_fetched")
_DB_METRICS = ("backfill_db_statements_total", "backfill_db_commits_total", "backfill_db_rows_total")

PROFILE = f"""
model = "{MODEL}"
max_num_seqs = 4096
max_num_batched_tokens = 65536
num_gpu_blocks = 1000000
iteration_base_s = 0.010
prefill_token_s = 0.0
decode_seq_s = 0.0
kv_token_s = 0.0
"""


@dataclass
class Side:
    workers: int
    lines: int
    seconds: float
    ideal_lines_per_s: float
    backfill_db: dict[str, float]
    postgres: dict[str, float]

    @property
    def lines_per_s(self) -> float:
        return self.lines / self.seconds

    def per_1000(self, value: float) -> str:
        return f"{value * 1000 / self.lines:,.0f}"


@contextmanager
def fresh_database(admin_url: str) -> Iterator[str]:
    """A new, empty database on the server of `admin_url`, dropped afterwards; yields its URL."""
    name = f"backfill_bench_{secrets.token_hex(4)}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    base, _, _ = admin_url.rpartition("/")
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


def pg_counters(url: str) -> dict[str, float]:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        columns = ", ".join(_PG_COUNTERS)
        row = conn.execute(f"SELECT {columns} FROM pg_stat_database WHERE datname = current_database()").fetchone()
    assert row is not None
    return dict(zip(_PG_COUNTERS, map(float, row), strict=True))


def db_metrics(ports: Sequence[int]) -> dict[str, float]:
    totals = dict.fromkeys(_DB_METRICS, 0.0)
    for port in ports:
        samples = prometheus(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text)
        for name in _DB_METRICS:
            totals[name] += metric(samples, name)
    return totals


def serve(children: Children, workdir: Path, config: Path, database_url: str, role: str) -> tuple[int, Any]:
    port = free_port()
    argv = [
        sys.executable, "-m", "backfill", "serve", "--role", role, "--port", str(port), "--config", str(config),
        "--data-dir", str(workdir / "data"), "--database-url", database_url,
    ]  # fmt: skip
    process = children.start(argv, workdir / f"{role}-{port}.log")
    wait_http(f"http://127.0.0.1:{port}/healthz", process)
    return port, process


def write_lines(path: Path, n: int) -> None:
    with path.open("wb") as out:
        for i in range(n):
            body = {
                "model": MODEL,
                "max_tokens": OUTPUT_TOKENS,
                "ignore_eos": True,
                "messages": [{"role": "user", "content": f"scaling line {i}: classify this product review"}],
            }
            line = {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
            out.write(orjson.dumps(line) + b"\n")


def run_side(children: Children, workdir: Path, admin_url: str, sim: Sim, workers: int, lines: int) -> Side:
    workdir.mkdir(parents=True)
    backend = {"name": "sim", "url": sim.url, "models": [MODEL], "flavour": "vllm"}
    backend |= {"max_concurrency": CAP, "adaptive_concurrency": False}
    config = write_config(workdir / "backfill.toml", {"poll_interval_s": 0.2}, [backend])
    write_lines(workdir / "in.jsonl", lines)
    with fresh_database(admin_url) as url:
        before_pg = pg_counters(url)
        started = [serve(children, workdir, config, url, "api")]
        started += [serve(children, workdir, config, url, "worker") for _ in range(workers)]
        ports = [port for port, _ in started]
        api = ports[0]
        before_db = db_metrics(ports)
        sim_before = sim.metrics()
        with httpx.Client(base_url=f"http://127.0.0.1:{api}/v1", timeout=120) as client:
            with (workdir / "in.jsonl").open("rb") as fh:
                uploaded = client.post("/files", data={"purpose": "batch"}, files={"file": ("in.jsonl", fh)})
            create = {"input_file_id": uploaded.json()["id"], "endpoint": "/v1/chat/completions"}
            batch = client.post("/batches", json=create | {"completion_window": "24h"}).json()
            first_done = end = None
            while end is None:
                state = client.get(f"/batches/{batch['id']}").json()
                now = time.monotonic()
                if first_done is None and state["request_counts"]["completed"] > 0:
                    first_done = now
                if state["status"] in ("completed", "failed", "expired", "cancelled"):
                    assert state["status"] == "completed", state
                    assert state["request_counts"]["completed"] == lines, state["request_counts"]
                    end = now
                time.sleep(0.1)
        assert first_done is not None
        after_db = db_metrics(ports)
        for _, process in started:
            children.stop(process)
        # A busy connection's statistics reach pg_stat_database when it idles or closes: read them once every
        # process has closed its connections.
        time.sleep(1.0)
        after_pg = pg_counters(url)
    sim_after = sim.metrics()
    requests = metric(sim_after, "vllm:e2e_request_latency_seconds_count") - metric(
        sim_before, "vllm:e2e_request_latency_seconds_count"
    )
    latency_s = (
        metric(sim_after, "vllm:e2e_request_latency_seconds_sum")
        - metric(sim_before, "vllm:e2e_request_latency_seconds_sum")
    ) / max(requests, 1)
    return Side(
        workers,
        lines,
        end - first_done,
        workers * CAP / latency_s,
        {name: after_db[name] - before_db[name] for name in _DB_METRICS},
        {name: after_pg[name] - before_pg[name] for name in _PG_COUNTERS},
    )


def report(sides: list[Side]) -> None:
    base = sides[0].lines_per_s
    headers = ["workers", "lines", "seconds", "lines/s", "ideal", "vs ideal", "vs 1", "stmts", "commits", "rows"]
    headers += ["pg xact", "pg tup_w", "pg tup_r"]
    rows = []
    for side in sides:
        pg = side.postgres
        rows.append(
            [
                str(side.workers),
                f"{side.lines:,}",
                f"{side.seconds:.1f}",
                f"{side.lines_per_s:.1f}",
                f"{side.ideal_lines_per_s:.1f}",
                f"{side.lines_per_s / side.ideal_lines_per_s:.2f}",
                f"{side.lines_per_s / base:.2f}x",
                side.per_1000(side.backfill_db["backfill_db_statements_total"]),
                side.per_1000(side.backfill_db["backfill_db_commits_total"]),
                side.per_1000(side.backfill_db["backfill_db_rows_total"]),
                side.per_1000(pg["xact_commit"]),
                side.per_1000(pg["tup_inserted"] + pg["tup_updated"] + pg["tup_deleted"]),
                side.per_1000(pg["tup_returned"]),
            ]
        )
    print("\n(database columns: per 1,000 lines, upload + validation + dispatch + finalize, API and workers)")
    print(table(headers, rows))
    last = sides[-1]
    print(f"\n{last.workers} workers vs 1: {last.lines_per_s / base:.2f}x (goal >= 3.5x)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4], help="worker counts, first = baseline")
    parser.add_argument("--lines-per-worker", type=int, default=1500, help="lines per worker in a side (1,500)")
    parser.add_argument("--quick", action="store_true", help="300 lines a worker")
    args = parser.parse_args(argv)
    per_worker = 300 if args.quick else args.lines_per_worker
    admin_url = os.environ.get("BACKFILL_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    print(machine_line())
    print(f"load average at start: {load_average()}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="backfill-bench-scaling-"))
    (tmp / "sim.toml").write_text(PROFILE)
    sides = []
    with running() as children:
        sim = Sim.start(children, SimSpec(1.0, tmp / "sim.toml"), tmp / "sim.log")
        for workers in args.workers:
            print(f"{workers} worker(s), {workers * per_worker} lines ...", flush=True)
            sides.append(run_side(children, tmp / f"w{workers}", admin_url, sim, workers, workers * per_worker))
            print(f"  {sides[-1].lines_per_s:.1f} lines/s", flush=True)
    report(sides)
    print(f"load average at end: {load_average()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
