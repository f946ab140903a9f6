"""Real databases for tests: a SQLite file, and a throwaway schema on the PostgreSQL server.

PostgreSQL comes from BACKFILL_TEST_DATABASE_URL. Without it the PostgreSQL variants skip with a reason, unless
BACKFILL_REQUIRE_POSTGRES=1 (set by .ci/run), where a missing or unreachable server fails the run instead.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest

PG_URL = os.environ.get("BACKFILL_TEST_DATABASE_URL")
REQUIRE_PG = os.environ.get("BACKFILL_REQUIRE_POSTGRES") == "1"


def _conninfo(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


@contextmanager
def postgres_schema_url() -> Iterator[str]:
    """A URL whose search_path is a fresh, empty schema; the schema is dropped afterwards."""
    if not PG_URL:
        if REQUIRE_PG:
            pytest.fail("BACKFILL_REQUIRE_POSTGRES=1 but BACKFILL_TEST_DATABASE_URL is not set")
        pytest.skip("PostgreSQL tests need BACKFILL_TEST_DATABASE_URL (e.g. postgresql://postgres@127.0.0.1:5432/test)")
    schema = f"bf_test_{secrets.token_hex(6)}"
    try:
        with psycopg.connect(_conninfo(PG_URL), autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
    except psycopg.OperationalError as exc:
        if REQUIRE_PG:
            pytest.fail(f"PostgreSQL at {PG_URL} is not reachable: {exc}")
        pytest.skip(f"PostgreSQL at {PG_URL} is not reachable: {exc}")
    separator = "&" if "?" in PG_URL else "?"
    try:
        yield f"{PG_URL}{separator}options={quote(f'-csearch_path={schema}')}"
    finally:
        with psycopg.connect(_conninfo(PG_URL), autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@contextmanager
def database_url_for(kind: str, tmp_path: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'backfill.db'}"
    else:
        with postgres_schema_url() as url:
            yield url


def fetch_rows(database_url: str, query: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """Rows of `query` (`%s` placeholders), read behind a server's back from its SQLite file or PostgreSQL."""
    if database_url.startswith("sqlite"):
        with sqlite3.connect(database_url.removeprefix("sqlite:///")) as conn:
            return list(conn.execute(query.replace("%s", "?"), params))
    with psycopg.connect(_conninfo(database_url)) as conn:
        return list(conn.execute(query, params))  # type: ignore[arg-type]
