"""The `backfill` command."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import sys
from pathlib import Path

import click
import structlog
from rich.console import Console
from structlog.typing import Processor

from backfill import __version__, cli_options
from backfill.cli_admin import keys, tenants, webhooks
from backfill.cli_client import COMMANDS as CLIENT_COMMANDS
from backfill.cli_client import CommandFailed
from backfill.cli_options import common_options
from backfill.cli_usage import usage
from backfill.config import Settings, config_warnings, load_settings, parse_duration_s
from backfill.domain.batches import ENDPOINTS, BatchStatus
from backfill.errors import BackfillError, ConfigError
from backfill.offline import RunRequest, RunResult, run_offline, state_dir_for
from backfill.progress import ExitCode, ProgressDisplay, make_console
from backfill.result_files import default_errors_path
from backfill.sim.cli import sim
from backfill.store.engine import create_engine, migrate
from backfill.store.sql import SqlStore

_settings = cli_options.load


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _configure_logging(level: str) -> None:
    """One JSON object per line on stdout, ours and every library's (uvicorn, alembic, httpx) alike."""
    stamp: list[Processor] = [structlog.processors.add_log_level, structlog.processors.TimeStamper(fmt="iso")]
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *stamp],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer(),
            ],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    structlog.configure(
        processors=[*stamp, structlog.processors.format_exc_info, structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
    )


@click.group()
@click.version_option(__version__)
def main() -> None:
    """backfill: a self-hosted Batch API for your own inference servers."""


@main.command()
@click.option("--host", help="Address to bind (default 127.0.0.1).")
@click.option("--port", type=int, help="Port to listen on (default 8080).")
@click.option(
    "--role",
    type=click.Choice(["all", "api", "worker"]),
    help="api: the HTTP API only; worker: the dispatcher, serving only /healthz, /readyz and /metrics; "
    "all (default): both.",
)
@common_options
def serve(
    host: str | None,
    port: int | None,
    role: str | None,
    data_dir: Path | None,
    config: Path | None,
    database_url: str | None,
) -> None:
    """Serve the Files and Batches APIs and run the dispatcher (or one of the two, with --role)."""
    from backfill.http.app import create_app
    from backfill.http.server import run_server

    settings = _settings(config, host=host, port=port, role=role, data_dir=data_dir, database_url=database_url)
    _configure_logging(settings.log_level)
    migrate(settings.effective_database_url)  # once, before the app starts (its lifespan does not migrate)
    if settings.role != "worker" and not is_loopback(settings.host) and asyncio.run(_count_keys(settings)) == 0:
        raise click.ClickException(
            f"refusing to serve on {settings.host} without API keys: anyone who can reach it could use it. "
            "Create one with `backfill keys create --tenant NAME`, or bind to 127.0.0.1."
        )
    try:
        run_server(create_app(settings, run_migrations=False), settings)
    except ConfigError as exc:
        raise click.ClickException(exc.message) from None


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


def _check_window(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        parse_duration_s(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


@main.command(name="run")
@click.argument("input_path", metavar="IN.jsonl", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Output file (JSONL)."
)
@click.option(
    "--errors",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Error file (default: OUTPUT with .errors.jsonl in place of .jsonl).",
)
@click.option(
    "--config", type=click.Path(path_type=Path, dir_okay=False), help="TOML config file: backends and limits."
)
@click.option("--endpoint", type=click.Choice(sorted(ENDPOINTS)), default="/v1/chat/completions", show_default=True)
@click.option(
    "--window",
    default="24h",
    show_default=True,
    callback=_check_window,
    help="Completion window (any duration: 90m, 24h, 7d).",
)
@click.option("--keep-state", is_flag=True, help="Keep the state directory once the files are written.")
def run_command(
    input_path: Path,
    output: Path,
    errors: Path | None,
    config: Path | None,
    endpoint: str,
    window: str,
    keep_state: bool,
) -> None:
    """Run a batch file offline, in this process, resumably.

    The input goes through the server's own validation, dispatcher and
    finalizer, to the backends of --config (with none configured, the
    embedded engine). A live progress bar shows done/failed/total,
    requests/s, output tokens/s and the ETA.

    \b
    Results: OUTPUT and the error file, in input order, both always
    written (empty when no line belongs there). Lines not done within
    --window end in the error file as batch_expired.

    \b
    State: OUTPUT.backfill/ beside the output holds a copy of the input,
    a SQLite database with every line's result, and a lock. Killed (even
    with kill -9), the same command continues where it stopped and never
    runs a finished line again; a changed input file is refused. The
    directory is removed once the files are written (--keep-state keeps
    it) and when the input is invalid.

    \b
    Exit codes:
      0    every line succeeded
      1    some lines failed or expired
      2    the input file is invalid (errors printed with line numbers),
           or the command line is wrong
      3    any other error (config, state directory busy or holding
           another input, ...)
      130  interrupted: run the same command again to continue
    """
    console = make_console()
    try:
        settings = load_settings(config)
    except ConfigError as exc:
        raise CommandFailed(exc.message) from None
    for warning in config_warnings():
        console.print(f"warning: {warning}", markup=False, style="yellow")
    _configure_logging("warning")  # the progress bar is the news; warnings and errors still show
    request = RunRequest(input_path, output, errors or default_errors_path(output), endpoint, window, keep_state)
    try:
        with ProgressDisplay(console) as display:
            note = functools.partial(console.print, markup=False)
            result = asyncio.run(run_offline(settings, request, display.update, note))
    except BackfillError as exc:
        raise CommandFailed(exc.message) from None
    except OSError as exc:
        raise CommandFailed(str(exc)) from None
    except KeyboardInterrupt:
        console.print(f"interrupted; run the same command again to continue ({state_dir_for(output)})", markup=False)
        raise click.exceptions.Exit(ExitCode.INTERRUPTED) from None
    except Exception:
        console.print_exception()  # a bug: all of it, but not exit code 1, which means "some lines failed"
        raise click.exceptions.Exit(ExitCode.ERROR) from None
    _report_run(console, request, result)
    raise click.exceptions.Exit(result.snapshot.exit_code)


def _report_run(console: Console, request: RunRequest, result: RunResult) -> None:
    snapshot = result.snapshot
    if snapshot.status is BatchStatus.FAILED:
        console.print(f"{request.input_path} is invalid:", markup=False)
        for error in result.errors:
            where = f"line {error.line}: " if error.line is not None else ""
            console.print(f"  {where}{error.message} ({error.code})", markup=False)
        return
    console.print(
        f"{snapshot.status.value}: {snapshot.completed} lines in {request.output_path}, "
        f"{snapshot.failed} in {request.errors_path}",
        markup=False,
    )
    if result.state_dir is not None:
        console.print(f"state kept in {result.state_dir}", markup=False)


for _command in CLIENT_COMMANDS:
    main.add_command(_command)
main.add_command(sim)
main.add_command(keys)
main.add_command(tenants)
main.add_command(webhooks)
main.add_command(usage)
