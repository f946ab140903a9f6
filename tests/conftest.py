from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.databases import database_url_for


@pytest.fixture(autouse=True)
def _scrub_backfill_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never see the developer's BACKFILL_* settings (the test database variables are read at import)."""
    for name in list(os.environ):
        if name.startswith("BACKFILL_"):
            monkeypatch.delenv(name)


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The same test on a real SQLite file and on a real PostgreSQL schema."""
    with database_url_for(request.param, tmp_path) as url:
        yield url
