"""The WAL of a SQLite file is copied back into the database by a thread of its own, which stops with its engine."""

from __future__ import annotations

import sqlite3
import threading
from contextlib import closing
from pathlib import Path

import pytest

from backfill.store.engine import WalCheckpointer, create_engine, migrate


def _writer(path: Path) -> sqlite3.Connection:
    """A connection that writes and never checkpoints on its own."""
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA wal_autocheckpoint=0")
    connection.execute("CREATE TABLE t (body BLOB)")
    return connection


def test_one_checkpoint_copies_every_frame_of_the_wal(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    with closing(_writer(path)) as writer, closing(sqlite3.connect(path, isolation_level=None)) as other:
        writer.executemany("INSERT INTO t VALUES (?)", [(b"x" * 20_000,) for _ in range(50)])

        frames, copied = WalCheckpointer.checkpoint(other)

    assert frames > 50
    assert frames == copied


def test_the_thread_copies_what_the_writer_leaves_in_the_wal(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    with closing(_writer(path)) as writer:
        size_before = path.stat().st_size
        writer.executemany("INSERT INTO t VALUES (?)", [(b"x" * 20_000,) for _ in range(50)])
        assert path.stat().st_size == size_before  # all of it is in the WAL
        copied_all = threading.Event()

        def on_checkpoint(frames: int, copied: int) -> None:
            if frames > 0 and copied == frames:
                copied_all.set()

        checkpointer = WalCheckpointer(str(path), interval_s=0.01, on_checkpoint=on_checkpoint)
        checkpointer.start()
        try:
            assert copied_all.wait(timeout=60)
        finally:
            checkpointer.stop()
        assert path.stat().st_size > 50 * 20_000


def _checkpoint_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "sqlite-wal-checkpoint"]


async def test_an_engine_s_checkpointer_stops_when_it_is_disposed(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'backfill.db'}"
    migrate(url)
    before = set(_checkpoint_threads())

    engine = create_engine(url)
    mine = [thread for thread in _checkpoint_threads() if thread not in before]
    assert 1 == len(mine)
    await engine.dispose()

    assert not mine[0].is_alive()


def test_the_checkpointer_never_creates_a_database_file(tmp_path: Path) -> None:
    path = tmp_path / "not-yet.db"

    with pytest.raises(sqlite3.OperationalError):
        WalCheckpointer(str(path)).open()

    assert not path.exists()
