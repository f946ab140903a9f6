"""Options and settings shared by the server-side commands (`serve`, `migrate`, `keys`, `tenants`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from backfill.config import Settings, config_warnings, load_settings
from backfill.errors import ConfigError


def load(config: Path | None, **overrides: Any) -> Settings:
    """Settings, or the command fails with what is wrong in them; warnings (a misspelt variable) go to stderr."""
    try:
        settings = load_settings(config, **overrides)
    except ConfigError as exc:
        raise click.ClickException(exc.message) from exc
    for warning in config_warnings():
        click.echo(f"warning: {warning}", err=True)
    return settings


_common = [
    click.option("--data-dir", type=click.Path(path_type=Path), help="Where the SQLite file and blobs live."),
    click.option("--config", type=click.Path(path_type=Path, dir_okay=False), help="TOML config file."),
    click.option("--database-url", help="sqlite:///PATH or postgresql://user@host:port/db."),
]


def common_options(func: Any) -> Any:
    for option in reversed(_common):
        func = option(func)
    return func
