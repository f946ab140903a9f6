"""SQLite from a thread beside a busy Python thread: why the dispatcher's store work does not overlap its event loop.

backfill's SQLite statements run on aiosqlite's thread while the event loop runs on the main thread. sqlite3 lets go
of the GIL while SQLite steps a statement, and takes it back after every step: an `executemany` of N rows, or a
fetch of N rows, takes the GIL back N times. When the other thread is busy in Python, each take waits for it to let
go (the switch interval, 5 ms), so the statement crawls while the loop works and runs only while the loop idles.

This script writes the results of one group commit (N lines of the `requests` shape, each a small embedding answer
of `--floats` floats) two ways, each with the main thread idle and with it busy in a Python loop:

    executemany   what `store.lines.LineQueries.record` runs (one UPDATE a line, through the driver's executemany)
    one step      the same rows in one UPDATE ... FROM json_each(?): one step, the GIL let go for all of it

and prints the time of each, and busy / idle (the figure). The table is backfill's (`store.tables.requests`, with its
indexes) and `executemany` runs the group commit's own statement (`store.lines`).

    .venv/bin/python bench/sqlite_threads.py                 # 3,000 lines of 8 floats
    .venv/bin/python bench/sqlite_threads.py --floats 768    # a real model's size
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy
from harness import machine_line, table

from backfill.store.lines import _FINISH_LINE_SQL
from backfill.store.tables import requests

# The group commit's own statement, with `?` for SQLite.
_MANY = _FINISH_LINE_SQL.format(p="?")
_FIELDS = ("state", "attempts", "result_id", "status_code", "request_id", "body", "error_code", "error_message")
_FIELDS += ("input_tokens", "cached_tokens", "output_tokens", "reasoning_tokens", "cached_from", "id", "seq")
_ONE_STEP = (
    "UPDATE requests SET state = j.state, attempts = j.attempts, lease_owner = NULL, lease_expires_at = NULL,"
    " result_id = j.result_id, status_code = j.status_code, request_id = j.request_id, body = CAST(j.body AS BLOB),"
    " error_code = j.error_code, error_message = j.error_message, input_tokens = j.input_tokens,"
    " cached_tokens = j.cached_tokens, output_tokens = j.output_tokens, reasoning_tokens = j.reasoning_tokens,"
    " cached_from = j.cached_from FROM (SELECT "
    + ", ".join(f"max(CASE f.key WHEN {i} THEN f.atom END) AS {name}" for i, name in enumerate(_FIELDS))
    + " FROM json_each(?1) AS e, json_each(e.value) AS f GROUP BY e.key) AS j"
    " WHERE requests.id = j.id AND requests.lease_owner = ?2 AND requests.lease_seq = j.seq"
    " AND requests.state = 'leased'"
)


class Database:
    def __init__(self, path: Path, lines: int, floats: int) -> None:
        engine = sqlalchemy.create_engine(f"sqlite:///{path}")
        requests.create(engine)  # backfill's table, with its indexes
        engine.dispose()
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        for pragma in ("journal_mode = WAL", "synchronous = NORMAL"):
            self.db.execute(f"PRAGMA {pragma}")
        self.lines = lines
        vector = ",".join(f"{0.0123456789 * (i + 1):.10f}" for i in range(floats))
        self.body = (
            '{"object":"list","data":[{"object":"embedding","index":0,"embedding":[' + vector + "]}],"
            '"model":"m","usage":{"prompt_tokens":5,"total_tokens":5}}'
        ).encode()
        self.rows = [
            ("succeeded", 1, f"batch_req_{i:032x}", 200, f"req_{i}", self.body, None, None, 5, 0, 0, 0, None, i, 1)
            for i in range(lines)
        ]

    def lease_all(self) -> None:
        self.db.execute("DELETE FROM requests")
        self.db.executemany(
            "INSERT INTO requests (id, batch_id, line_no, custom_id, body_offset, body_length, est_prompt_tokens,"
            " prefix_group, state, attempts, next_attempt_at, lease_owner, lease_seq, lease_expires_at, input_tokens,"
            " cached_tokens, output_tokens, reasoning_tokens)"
            " VALUES (?, 'b', ?, 'c', 0, 0, 5, 0, 'leased', 0, 0, 'me', 1, 100.0, 0, 0, 0, 0)",
            [(i, i) for i in range(self.lines)],
        )

    def executemany(self) -> int:
        params = [(*row[:14], "me", row[14]) for row in self.rows]
        self.db.execute("BEGIN IMMEDIATE")
        written = self.db.executemany(_MANY, params).rowcount
        self.db.execute("COMMIT")
        return written

    def one_step(self) -> int:
        payload = orjson.dumps([[*row[:5], row[5].decode(), *row[6:]] for row in self.rows])
        self.db.execute("BEGIN IMMEDIATE")
        written = self.db.execute(_ONE_STEP, (payload, "me")).rowcount
        self.db.execute("COMMIT")
        return written

    def check(self) -> None:
        count, body = self.db.execute(
            "SELECT count(*), min(body = ?) FROM requests WHERE state = 'succeeded'", (self.body,)
        ).fetchone()
        if (count, body) != (self.lines, 1):
            raise RuntimeError(f"{count} of {self.lines} lines written, bodies intact: {body}")


def _busy(stop: threading.Event) -> None:
    """What the event loop does between statements, at its busiest: Python, never blocking."""
    total = 0
    while not stop.is_set():
        for i in range(1000):
            total += i


def timed(database: Database, write: Callable[[], int], busy: bool, repeat: int) -> float:
    """The median seconds of `write` on a thread of its own (as aiosqlite runs it), the main thread idle or busy."""
    times = []
    for _ in range(repeat):
        database.lease_all()
        stop = threading.Event()
        spinner = threading.Thread(target=_busy, args=(stop,)) if busy else None
        if spinner is not None:
            spinner.start()
        started = time.perf_counter()
        worker = threading.Thread(target=write)
        worker.start()
        worker.join()
        times.append(time.perf_counter() - started)
        stop.set()
        if spinner is not None:
            spinner.join()
        database.check()
    return statistics.median(times)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=3000, help="lines in the group commit (default 3000)")
    parser.add_argument("--floats", type=int, default=8, help="floats in each line's embedding (default 8)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each, the median shown (default 3)")
    args = parser.parse_args(argv)
    print(machine_line())
    print(f"sqlite {sqlite3.sqlite_version}; {args.lines} lines of {args.floats} floats, median of {args.repeat}\n")
    rows: list[list[Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        database = Database(Path(tmp) / "bench.db", args.lines, args.floats)
        for name, write in (("executemany", database.executemany), ("one step (json_each)", database.one_step)):
            idle = timed(database, write, busy=False, repeat=args.repeat)
            busy = timed(database, write, busy=True, repeat=args.repeat)
            rows.append([name, f"{idle * 1000:.1f}", f"{busy * 1000:.1f}", f"{busy / idle:.1f}x"])
    print(table(["write", "main thread idle ms", "main thread busy ms", "busy / idle"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
