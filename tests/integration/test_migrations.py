"""Alembic's head schema is exactly the schema the code defines."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine

from backfill.store.engine import SQLITE_PAGE_SIZE, migrate, sync_url
from backfill.store.tables import metadata


def test_migrations_produce_the_models_schema(database_url: str) -> None:
    migrate(database_url)
    engine = create_engine(sync_url(database_url))
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata)
    engine.dispose()
    assert [] == diff


def test_migrating_twice_is_a_no_op(database_url: str) -> None:
    migrate(database_url)
    migrate(database_url)


def test_processes_that_start_together_migrate_one_at_a_time(database_url: str) -> None:
    # Replicas and workers started at once on a fresh database each run the migrations; without a lock all but
    # one fail on "table already exists".
    command = [sys.executable, "-m", "backfill", "migrate", "--database-url", database_url]
    env = {key: value for key, value in os.environ.items() if not key.startswith("BACKFILL_")}
    processes = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(4)]
    results = [(process.wait(120), process.stderr.read().decode() if process.stderr else "") for process in processes]
    for process in processes:
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()

    assert [0, 0, 0, 0] == [code for code, _ in results], [err for _, err in results if err]
    engine = create_engine(sync_url(database_url))
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata)
    engine.dispose()
    assert [] == diff


def test_a_new_sqlite_file_gets_large_pages_and_an_existing_one_keeps_its_own(tmp_path: Path) -> None:
    fresh, existing = tmp_path / "fresh.db", tmp_path / "existing.db"
    with closing(sqlite3.connect(existing)) as connection:  # made by an earlier version: SQLite's default pages
        connection.execute("CREATE TABLE earlier (x)")
        connection.commit()

    migrate(f"sqlite:///{fresh}")
    migrate(f"sqlite:///{existing}")

    def pragmas(path: Path) -> tuple[int, str]:
        with closing(sqlite3.connect(path)) as connection:
            return connection.execute("PRAGMA page_size").fetchone()[0], connection.execute(
                "PRAGMA journal_mode"
            ).fetchone()[0]

    assert (SQLITE_PAGE_SIZE, "wal") == pragmas(fresh)
    assert 4096 == pragmas(existing)[0]
