"""Engines for SQLite (WAL, one connection per process) and PostgreSQL, and running migrations."""

from __future__ import annotations

import fcntl
import sqlite3
import threading
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
from alembic import command
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

log = structlog.get_logger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def async_url(url: str) -> str:
    """`postgresql://…` -> psycopg 3 async, `sqlite:///…` -> aiosqlite; explicit drivers are kept."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "postgresql":
        return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    if backend == "sqlite":
        return parsed.set(drivername="sqlite+aiosqlite").render_as_string(hide_password=False)
    raise ValueError(f"unsupported database URL {parsed.render_as_string()!r}: use sqlite:/// or postgresql://")


def sync_url(url: str) -> str:
    parsed = make_url(url)
    if parsed.get_backend_name() == "postgresql":
        return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    return parsed.set(drivername="sqlite").render_as_string(hide_password=False)


# A line's result is stored in its row: an embedding of a real model's size (768 floats, ~15 KB of JSON) spans four
# 4 KiB pages and their overflow chain; in 16 KiB pages, writing one cost a third less (BENCHMARKS.md, issue 17).
# Small rows cost the same either way.
SQLITE_PAGE_SIZE = 16384


# The WAL is copied back into the database file by a thread of its own (WalCheckpointer) every so often; the
# writer's own checkpoint, inside a commit, is the backstop should that thread fall behind. A WAL that grew while it
# did is cut back to the limit once it restarts.
WAL_CHECKPOINT_INTERVAL_S = 0.05
_WAL_AUTOCHECKPOINT_PAGES = 10_000
_WAL_SIZE_LIMIT_BYTES = 64 << 20


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL: readers never block the writer. synchronous=NORMAL is durable across a process crash (kill -9);
    # only a power loss can drop the last commits.
    cursor = dbapi_connection.cursor()
    for pragma in (
        "journal_mode=WAL",
        "synchronous=NORMAL",
        "busy_timeout=30000",
        "foreign_keys=ON",
        f"wal_autocheckpoint={_WAL_AUTOCHECKPOINT_PAGES}",
        f"journal_size_limit={_WAL_SIZE_LIMIT_BYTES}",
    ):
        cursor.execute(f"PRAGMA {pragma}")
    cursor.close()


class WalCheckpointer:
    """Copies a SQLite file's WAL back into the database from a thread of its own.

    SQLite's default, a checkpoint every 1,000 pages inside the writer's commit, put that second copy of every page
    on the one connection every write of the process waits for. A checkpoint runs in SQLite's C code without the
    GIL, so on a thread of its own it overlaps everything else: 768-float embeddings lines went ~9 % faster
    (BENCHMARKS.md, issue 17). PASSIVE: it never waits for, nor blocks, a reader or the writer; what it cannot copy
    yet it copies at a later tick.
    """

    def __init__(
        self,
        path: str,
        interval_s: float = WAL_CHECKPOINT_INTERVAL_S,
        on_checkpoint: Callable[[int, int], None] | None = None,
    ) -> None:
        """`on_checkpoint(frames, copied)`: called on the thread after each checkpoint (tests wait on it)."""
        self.path = path
        self.interval_s = interval_s
        self.on_checkpoint = on_checkpoint
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sqlite-wal-checkpoint", daemon=True)
        self._failing = False

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def open(self) -> sqlite3.Connection:
        """A connection to the file, never creating it (migrate() does, with its page size)."""
        return sqlite3.connect(f"file:{self.path}?mode=rw", uri=True, isolation_level=None)

    @staticmethod
    def checkpoint(connection: sqlite3.Connection) -> tuple[int, int]:
        """One PASSIVE checkpoint: the frames in the WAL, and how many of them are now in the database file."""
        _busy, frames, copied = connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return frames, copied

    def _run(self) -> None:
        connection: sqlite3.Connection | None = None
        try:
            while not self._stop.wait(self.interval_s):
                try:
                    if connection is None:
                        connection = self.open()
                    frames, copied = self.checkpoint(connection)
                    self._failing = False
                    if self.on_checkpoint is not None:
                        self.on_checkpoint(frames, copied)
                except sqlite3.Error as exc:
                    if not self._failing:  # once until it works again; the writer's own checkpoints go on
                        log.warning("sqlite.checkpoint_failed", path=self.path, error=str(exc))
                    self._failing = True
        finally:
            if connection is not None:
                connection.close()


def create_engine(url: str, *, pool_size: int = 10) -> AsyncEngine:
    if not is_sqlite(url):
        return create_async_engine(async_url(url), pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)
    database = make_url(url).database
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    # SQLite has one writer anyway: one connection per process serialises our own transactions, and
    # BEGIN IMMEDIATE takes the write lock up front so another process makes us wait (busy_timeout) instead of
    # failing a read-to-write upgrade.
    engine = create_async_engine(async_url(url), pool_size=1, max_overflow=0, pool_timeout=120)

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, record: Any) -> None:
        _sqlite_pragmas(dbapi_connection, record)
        dbapi_connection.isolation_level = None

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    if database and database != ":memory:":
        checkpointer = WalCheckpointer(database)
        checkpointer.start()
        event.listen(engine.sync_engine, "engine_disposed", lambda _engine: checkpointer.stop())
        weakref.finalize(engine, checkpointer.stop)
    return engine


def create_read_engine(url: str) -> AsyncEngine | None:
    """For a SQLite file, a few connections that only read (WAL: a reader never waits for the writer), so that
    reading a batch stays quick while the one writing connection commits results or inserts a million lines.
    None where the writing engine serves reads as well (PostgreSQL has a pool; an in-memory SQLite is one
    connection's own)."""
    if not is_sqlite(url):
        return None
    database = make_url(url).database
    if not database or database == ":memory:":
        return None
    engine = create_async_engine(async_url(url), pool_size=2, max_overflow=2, pool_timeout=120)

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, record: Any) -> None:
        _sqlite_pragmas(dbapi_connection, record)
        dbapi_connection.isolation_level = None

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN")  # deferred: a read snapshot, no write lock

    return engine


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", sync_url(url).replace("%", "%%"))
    return config


def migrate(url: str, revision: str = "head") -> None:
    """Bring the database schema to `revision` (creates the SQLite file if needed).

    Safe when several processes start at once: they migrate one after the other (a PostgreSQL advisory lock in
    migrations/env.py; for a SQLite file, a lock on a file beside it).
    """
    database = make_url(url).database if is_sqlite(url) else None
    if not database or database == ":memory:":
        command.upgrade(alembic_config(url), revision)
        return
    Path(database).parent.mkdir(parents=True, exist_ok=True)
    with open(f"{database}.migrate-lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _create_sqlite_file(Path(database))
        command.upgrade(alembic_config(url), revision)


def _create_sqlite_file(path: Path) -> None:
    """A new database file gets pages of SQLITE_PAGE_SIZE, fixed once the file is written (here, by switching it to
    WAL); an existing file keeps its own."""
    if path.exists() and path.stat().st_size > 0:
        return
    connection = sqlite3.connect(path)
    try:
        connection.execute(f"PRAGMA page_size = {SQLITE_PAGE_SIZE}")
        connection.execute("PRAGMA journal_mode = WAL")
    finally:
        connection.close()
