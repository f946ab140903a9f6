"""Acceptance fixtures: a real upstream process and real `backfill serve` processes on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

from tests.support.databases import database_url_for
from tests.support.processes import Server, Upstream, write_config

MODEL = "test-model"
StartServer = Callable[..., Server]


@pytest.fixture(scope="session")
def upstream() -> Iterator[Upstream]:
    server = Upstream.start()
    yield server
    server.stop()


TEST_SETTINGS: dict[str, Any] = {
    "completion_windows": ["24h", "1h", "4s"],
    "poll_interval_s": 0.1,
    "retry_base_s": 0.05,
    "retry_max_s": 0.5,
    "lease_ttl_s": 5.0,
    "cancel_grace_s": 1.0,
    "request_timeout_s": 30.0,
}


def _launcher(directory: Path, database_url: str, upstream: Upstream, started: list[Server]) -> StartServer:
    def start(
        backends: list[dict[str, Any]] | None = None,
        role: str = "all",
        data_dir: Path | None = None,
        **settings: Any,
    ) -> Server:
        config = {**TEST_SETTINGS, **settings}
        if backends is None:
            backends = [{"name": "upstream", "url": upstream.url, "models": [MODEL], "max_concurrency": 16}]
        index = len(started)
        if data_dir is None:
            data_dir = directory / f"data{index}"
            data_dir.mkdir()
        config_path = write_config(directory / f"backfill{index}.toml", config, backends)
        server = Server(data_dir, config_path, database_url, role=role)
        started.append(server)
        return server.start()

    return start


@pytest.fixture
def start_server(database_url: str, tmp_path: Path, upstream: Upstream) -> Iterator[StartServer]:
    """Start `backfill serve` with test-friendly settings; keyword arguments override config values.

    `backends=[...]` replaces the default single backend (the upstream, serving MODEL); `role` is passed as
    `serve --role` (default all); `data_dir` shares another server's (its local blobs) instead of a new one.
    """
    started: list[Server] = []
    yield _launcher(tmp_path, database_url, upstream, started)
    for server in started:
        server.stop()


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def start_module_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, upstream: Upstream
) -> Iterator[StartServer]:
    """Like `start_server`, but the servers live for the whole test module (one per database kind).

    For modules of many quick tests that each leave the server as they found it.
    """
    directory = tmp_path_factory.mktemp(f"module-{request.param}")
    started: list[Server] = []
    with database_url_for(request.param, directory) as database_url:
        yield _launcher(directory, database_url, upstream, started)
        for server in started:
            server.stop()


_OPENED: list[OpenAI] = []


def client_for(server: Server, api_key: str = "open-mode") -> OpenAI:
    """An SDK client on `server`; closed when the test ends (no socket is left to the garbage collector)."""
    client = OpenAI(base_url=f"{server.base_url}/v1", api_key=api_key, max_retries=0, timeout=60)
    _OPENED.append(client)
    return client


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _OPENED:
        _OPENED.pop().close()
