"""What one line costs the store: microseconds a line of each step a batch's lines take through `SqlStore`.

The steps, each over all N lines of one batch, with nothing else running in the process:

    insert    `start_batch`: the validated lines written, queued (what validation ends with)
    lease     `lease_lines`, 1,024 lines a call, until none is left (what the dispatcher's lease does)
    record    `record`, 1,024 successes a group commit, each an 8-float embedding answer (the group commit)
    results   `iter_results`: every line read back in input order (what finalization writes out)

The code timed is backfill's own store (`backfill.store.sql.SqlStore`) on a freshly migrated SQLite file, or on
PostgreSQL with `--database-url` (each round in a database of its own, created on that server and dropped after).
Each round runs in a fresh process;
a step's figure is its best round (this machine's noise only ever adds time).

`--before DIR` measures a second tree side by side: DIR is a `src` folder (`git archive REV src | tar -x -C
/tmp/before`, then `--before /tmp/before/src`), and rounds alternate between the two. Printed: each step's
best, and after / before (the figure: below 1 is faster).

    .venv/bin/python bench/store_line_costs.py                              # this tree alone
    .venv/bin/python bench/store_line_costs.py --before /tmp/before/src     # side by side
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
from harness import machine_line, table

STEPS = ("insert", "lease", "record", "results")
_CHUNK = 1024
_ANSWER = orjson.dumps(
    {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.125 * i for i in range(8)]}],
        "model": "m",
        "usage": {"prompt_tokens": 22, "total_tokens": 22},
    }
)


async def _round(lines: int, database_url: str | None) -> dict[str, float]:
    """One round in this process: the seconds of each step."""
    from backfill import ids
    from backfill.domain.batches import Batch, BatchStatus, RequestState
    from backfill.domain.files import FileRecord
    from backfill.domain.leases import LineUpdate
    from backfill.domain.usage import Usage
    from backfill.domain.valid_lines import ValidLine
    from backfill.store.engine import create_engine, migrate
    from backfill.store.sql import SqlStore

    with tempfile.TemporaryDirectory() as folder:
        url = database_url or f"sqlite:///{folder}/backfill.db"
        migrate(url)
        # The garbage collector as `backfill serve` sets it (http/server.py): what was built so far frozen, young
        # objects collected every 50,000 allocations. At Python's default it ran every 700 and cost the steps here
        # what it does not cost the server.
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, *gc.get_threshold()[1:])
        store = SqlStore(create_engine(url))
        now = int(time.time())
        tenant_id = await store.ensure_tenant(f"bench-{os.getpid()}-{now}", now)
        file = FileRecord(ids.file_id(), tenant_id, "in.jsonl", "batch", 100 * lines, "files/x", now, None)
        await store.add_file(file)
        batch = Batch(
            id=ids.batch_id(),
            tenant_id=tenant_id,
            endpoint="/v1/embeddings",
            input_file_id=file.id,
            completion_window="24h",
            status=BatchStatus.VALIDATING,
            created_at=now,
            expires_at=now + 86_400,
        )
        await store.create_batch(batch)
        valid = [ValidLine(n, f"request-{n}", 100 * n, 90, est_prompt_tokens=22) for n in range(1, lines + 1)]
        seconds: dict[str, float] = {}

        started = time.perf_counter()
        assert await store.claim_batch(batch.id, "bench", now, 600.0)
        assert await store.start_batch(batch.id, "bench", "m", valid, now)
        await store.release_batch(batch.id, "bench")
        seconds["insert"] = time.perf_counter() - started

        started = time.perf_counter()
        leased = []
        while got := await store.lease_lines(batch.id, "bench", _CHUNK, now, 600.0):
            leased += got
        seconds["lease"] = time.perf_counter() - started
        assert len(leased) == lines, f"leased {len(leased)} of {lines} lines"

        updates = [
            LineUpdate(
                line.id,
                line.batch_id,
                line.lease_seq,
                RequestState.SUCCEEDED,
                line.attempts + 1,
                result_id=ids.batch_request_id(),
                status_code=200,
                request_id=ids.request_id(),
                body=_ANSWER,
                usage=Usage(22, 0, 0, 0),
            )
            for line in leased
        ]
        started = time.perf_counter()
        written = 0
        for at in range(0, lines, _CHUNK):
            written += await store.record("bench", updates[at : at + _CHUNK])
        seconds["record"] = time.perf_counter() - started
        assert written == lines, f"recorded {written} of {lines} lines"

        started = time.perf_counter()
        read = 0
        async for result in store.iter_results(batch.id):
            assert result.state is RequestState.SUCCEEDED
            read += 1
        seconds["results"] = time.perf_counter() - started
        assert read == lines, f"read {read} of {lines} lines"
        await store.close()
        return seconds


def _child_round(src: str | None, lines: int, database_url: str | None) -> dict[str, float]:
    """One round in a fresh process, on this tree or on `src`."""
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = src
    argv = [sys.executable, __file__, "--round", "--lines", str(lines)]
    if database_url:
        argv += ["--database-url", database_url]
    out = subprocess.run(argv, env=env, check=True, capture_output=True, cwd=Path(__file__).parent).stdout
    result: dict[str, float] = orjson.loads(out.splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--database-url", help="a PostgreSQL server to create each round's database on")
    parser.add_argument("--before", help="a second tree's src folder, measured side by side")
    parser.add_argument("--round", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.round:
        if args.database_url is None:
            print(orjson.dumps(asyncio.run(_round(args.lines, None))).decode())
        else:
            with _fresh_database(args.database_url) as url:
                print(orjson.dumps(asyncio.run(_round(args.lines, url))).decode())
        return

    print(machine_line())
    trees = {"after": None} if args.before is None else {"after": None, "before": args.before}
    best: dict[str, dict[str, float]] = {name: {} for name in trees}
    for number in range(args.rounds):
        for name, src in trees.items():
            seconds = _child_round(src, args.lines, args.database_url)
            for step, value in seconds.items():
                best[name][step] = min(best[name].get(step, value), value)
            shown = ", ".join(f"{step} {1e6 * value / args.lines:.1f}" for step, value in seconds.items())
            print(f"round {number + 1} {name}: {shown} µs/line", flush=True)

    database = "PostgreSQL" if args.database_url else "SQLite"
    print(f"\n{args.lines} lines, {database}, best of {args.rounds} rounds, µs a line\n")
    headers = ["step", *trees]
    if args.before is not None:
        headers.append("after / before")
    rows = []
    for step in (*STEPS, "total"):
        values = {
            name: (sum(best[name].values()) if step == "total" else best[name][step]) * 1e6 / args.lines
            for name in trees
        }
        row = [step, *(f"{values[name]:.1f}" for name in trees)]
        if args.before is not None:
            row.append(f"{values['after'] / values['before']:.2f}")
        rows.append(row)
    print(table(headers, rows))


@contextlib.contextmanager
def _fresh_database(server_url: str) -> Iterator[str]:
    """A new, empty database on the server of `server_url`, dropped afterwards: each round migrates its own tree."""
    import sqlalchemy
    from sqlalchemy.engine import make_url

    name = f"backfill_bench_{os.getpid()}"
    admin = sqlalchemy.create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    try:
        yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE {name} WITH (FORCE)")
        admin.dispose()


if __name__ == "__main__":
    main()
