from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from backfill.store.engine import create_engine, is_sqlite, migrate
from backfill.store.sql import SqlStore


@pytest.fixture(scope="session")
def migrated_sqlite_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Migrated once per session; each test gets a copy (SQLite migrations cost an fsync per step)."""
    path = tmp_path_factory.mktemp("template") / "backfill.db"
    migrate(f"sqlite:///{path}")
    return path


@pytest.fixture
async def store(database_url: str, request: pytest.FixtureRequest) -> AsyncIterator[SqlStore]:
    """A SqlStore on a freshly migrated database (SQLite file or PostgreSQL schema)."""
    if is_sqlite(database_url):
        template: Path = request.getfixturevalue("migrated_sqlite_file")
        database = make_url(database_url).database
        assert database is not None
        shutil.copyfile(template, database)
    else:
        await asyncio.to_thread(migrate, database_url)
    store = SqlStore(create_engine(database_url))
    yield store
    await store.close()
