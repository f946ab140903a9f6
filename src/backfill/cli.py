"""The `backfill` command."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import sys
import time
from pathlib import Path
from typing import Any

import click
import structlog

from backfill import __version__
from backfill.config import Settings, load_settings
from backfill.domain.keys import make_key
from backfill.errors import ConfigError
from backfill.store.engine import create_engine, migrate
from backfill.store.sql import SqlStore


def _settings(config: Path | None, **overrides: Any) -> Settings:
    try:
        return load_settings(config, **overrides)
    except ConfigError as exc:
        raise click.ClickException(exc.message) from exc


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr, format="%(message)s")
    for noisy in ("httpx", "httpcore", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
    )


_common = [
    click.option("--data-dir", type=click.Path(path_type=Path), help="Where the SQLite file and blobs live."),
    click.option("--config", type=click.Path(path_type=Path, dir_okay=False), help="TOML config file."),
    click.option("--database-url", help="sqlite:///PATH or postgresql://user@host:port/db."),
]


def common_options(func: Any) -> Any:
    for option in reversed(_common):
        func = option(func)
    return func


@click.group()
@click.version_option(__version__)
def main() -> None:
    """backfill: a self-hosted Batch API for your own inference servers."""


@main.command()
@click.option("--host", help="Address to bind (default 127.0.0.1).")
@click.option("--port", type=int, help="Port to listen on (default 8080).")
@common_options
def serve(
    host: str | None, port: int | None, data_dir: Path | None, config: Path | None, database_url: str | None
) -> None:
    """Serve the Files and Batches APIs and run the dispatcher."""
    import uvicorn

    from backfill.http.app import create_app

    settings = _settings(config, host=host, port=port, data_dir=data_dir, database_url=database_url)
    _configure_logging(settings.log_level)
    migrate(settings.effective_database_url)  # once, before the app starts (its lifespan does not migrate)
    if not is_loopback(settings.host) and asyncio.run(_count_keys(settings)) == 0:
        raise click.ClickException(
            f"refusing to serve on {settings.host} without API keys: anyone who can reach it could use it. "
            "Create one with `backfill keys create --tenant NAME`, or bind to 127.0.0.1."
        )
    app = create_app(settings, run_migrations=False)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=int(settings.cancel_grace_s) + 5,
    )


async def _count_keys(settings: Settings) -> int:
    store = SqlStore(create_engine(settings.effective_database_url))
    try:
        return await store.count_api_keys()
    finally:
        await store.close()


@main.command(name="migrate")
@common_options
def migrate_command(data_dir: Path | None, config: Path | None, database_url: str | None) -> None:
    """Bring the database schema up to date."""
    settings = _settings(config, data_dir=data_dir, database_url=database_url)
    migrate(settings.effective_database_url)
    click.echo("database is up to date")


@main.group()
def keys() -> None:
    """Manage API keys."""


@keys.command(name="create")
@click.option("--tenant", required=True, help="Tenant the key belongs to (created if new).")
@common_options
def create_key(tenant: str, data_dir: Path | None, config: Path | None, database_url: str | None) -> None:
    """Create an API key and print it (it is shown only once)."""
    settings = _settings(config, data_dir=data_dir, database_url=database_url)
    migrate(settings.effective_database_url)
    click.echo(asyncio.run(_create_key(settings, tenant)))


async def _create_key(settings: Settings, tenant: str) -> str:
    store = SqlStore(create_engine(settings.effective_database_url))
    try:
        now = int(time.time())
        tenant_id = await store.ensure_tenant(tenant, now, settings.default_enqueued_token_limit)
        key = make_key()
        await store.add_api_key(tenant_id, key, now)
        return key.plaintext
    finally:
        await store.close()
