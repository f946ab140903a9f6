"""Services.open wires the store as the settings say."""

from __future__ import annotations

from pathlib import Path

from backfill.config import Settings
from backfill.services import Services
from backfill.store.engine import is_sqlite


async def test_the_database_pool_has_the_configured_size(database_url: str, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, database_url=database_url, database_pool_size=3)
    services = await Services.open(settings, backends=[])
    try:
        size = services.store.engine.sync_engine.pool.size()  # type: ignore[attr-defined]  # QueuePool
    finally:
        await services.close()

    assert (1 if is_sqlite(database_url) else 3) == size  # SQLite: one connection per process, always
