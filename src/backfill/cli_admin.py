"""`backfill keys`, `backfill tenants` and `backfill webhooks`: the admin API's use cases, run on the database
directly (as `migrate` does), so they work before any key exists and from any host that reaches the database."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click
import orjson
from pydantic import ValidationError

from backfill.cli_options import common_options, load
from backfill.config import Settings
from backfill.domain.tenants import DEFAULT_TENANT, QUOTAS, KeyInfo, Tenant
from backfill.errors import ApiError
from backfill.ports import Store
from backfill.store.engine import create_engine, migrate
from backfill.store.sql import SqlStore
from backfill.usecases import tenants as uc
from backfill.usecases import webhooks as wh

_T = TypeVar("_T")


@dataclass
class _Deps:
    store: Store
    settings: Settings

    def now(self) -> int:
        return int(time.time())


def _run(settings: Settings, action: Callable[[_Deps], Awaitable[_T]]) -> _T:
    migrate(settings.effective_database_url)

    async def run() -> _T:
        store = SqlStore(create_engine(settings.effective_database_url))
        try:
            return await action(_Deps(store, settings))
        finally:
            await store.close()

    try:
        return asyncio.run(run())
    except ApiError as exc:
        raise click.ClickException(exc.message) from None


def _when(unix: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(unix)) if unix is not None else "-"


def _echo_json(payload: Any) -> None:
    click.echo(orjson.dumps(payload, option=orjson.OPT_INDENT_2).decode())


# --- keys -------------------------------------------------------------------------------------------------------


@click.group()
def keys() -> None:
    """Manage API keys (admin keys reach /v1/admin/…)."""


@keys.command(name="create")
@click.option("--tenant", default=DEFAULT_TENANT, show_default=True, help="Tenant the key belongs to (made if new).")
@click.option("--admin", is_flag=True, help="An admin key: the admin API (tenants, keys) too.")
@click.option(
    "--open-mode-tenant",
    default=DEFAULT_TENANT,
    show_default=True,
    help="For the first key only: the tenant that gets the files and batches made in open mode.",
)
@common_options
def create_key(
    tenant: str,
    admin: bool,
    open_mode_tenant: str,
    data_dir: Path | None,
    config: Path | None,
    database_url: str | None,
) -> None:
    """Create an API key and print it (it is shown only once). The first key ends open mode."""
    settings = load(config, data_dir=data_dir, database_url=database_url)
    request = uc.CreateKey(tenant=tenant, admin=admin, open_mode_tenant=open_mode_tenant)
    created = _run(settings, lambda deps: uc.create_key(deps, request))
    if created.open_mode_ended is not None:
        click.echo(created.open_mode_ended.describe(), err=True)
    click.echo(created.plaintext)


@keys.command(name="list")
@click.option("--tenant", help="Only this tenant's keys.")
@click.option("--json", "as_json", is_flag=True, help="As JSON, as the admin API answers.")
@common_options
def list_keys(
    tenant: str | None, as_json: bool, data_dir: Path | None, config: Path | None, database_url: str | None
) -> None:
    """List API keys: prefix, tenant, created, last used (a few seconds late at most), revoked."""
    settings = load(config, data_dir=data_dir, database_url=database_url)
    found = _run(settings, lambda deps: uc.list_keys(deps, tenant))
    if as_json:
        _echo_json([key.to_dict() for key in found])
        return
    rows: list[tuple[str, ...]] = [("ID", "PREFIX", "TENANT", "ADMIN", "CREATED", "LAST USED", "REVOKED")]
    rows += [_key_row(key) for key in found]
    _echo_table(rows)


def _key_row(key: KeyInfo) -> tuple[str, ...]:
    return (
        key.id,
        f"{key.prefix}…",
        key.tenant,
        "yes" if key.admin else "",
        _when(key.created_at),
        _when(key.last_used_at),
        _when(key.revoked_at) if key.revoked_at else "",
    )


def _echo_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


@keys.command(name="revoke")
@click.argument("key_id")
@common_options
def revoke_key(key_id: str, data_dir: Path | None, config: Path | None, database_url: str | None) -> None:
    """Revoke a key (its id, or its prefix as listed); every server refuses it within 5 seconds."""
    settings = load(config, data_dir=data_dir, database_url=database_url)
    key = _run(settings, lambda deps: uc.revoke_key(deps, key_id))
    click.echo(f"revoked {key.id} ({key.prefix}…, tenant {key.tenant})")


@keys.command(name="rotate")
@click.argument("key_id")
@common_options
def rotate_key(key_id: str, data_dir: Path | None, config: Path | None, database_url: str | None) -> None:
    """Replace a key: print a new key of the same tenant (and admin if it was), and revoke the old one."""
    settings = load(config, data_dir=data_dir, database_url=database_url)
    created = _run(settings, lambda deps: uc.rotate_key(deps, key_id))
    click.echo(f"revoked {key_id}; the new key of tenant {created.key.tenant} is {created.key.id}:", err=True)
    click.echo(created.plaintext)


# --- tenants ----------------------------------------------------------------------------------------------------


class _Quota(click.ParamType[int | None]):
    """A positive whole number, or `none` for no limit."""

    name = "N|none"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | None:
        if value is None or isinstance(value, int):
            return value
        if str(value).lower() in ("none", "unlimited"):
            return None
        try:
            number = int(value)
        except ValueError:
            self.fail(f"{value!r} is neither a whole number nor 'none'", param, ctx)
        if number < 1:
            self.fail(f"{value} is not positive", param, ctx)
        return number


_QUOTA_HELP = {
    "enqueued_token_limit": "Estimated prompt tokens of unfinished lines, per model.",
    "max_batches_in_progress": "Batches that have not ended.",
    "batch_creates_per_minute": "Batch creates in any minute.",
    "batch_tokens_per_minute": "Estimated prompt tokens of batches started in any minute.",
}


def tenant_options(func: Any) -> Any:
    for name in reversed(QUOTAS):
        func = click.option(f"--{name.replace('_', '-')}", name, type=_Quota(), help=_QUOTA_HELP[name])(func)
    return click.option("--weight", type=click.FloatRange(min=0, min_open=True), help="Fair-share weight.")(func)


def _fields(given: dict[str, Any], model: type[uc.TenantFields], **extra: Any) -> Any:
    """The options given on the command line (a quota given as `none` is cleared)."""
    ctx = click.get_current_context()
    chosen = {
        name: given[name]
        for name in ("weight", *QUOTAS)
        if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT
    }
    return model.model_validate({**chosen, **extra})


def _show_tenant(tenant: Tenant) -> None:
    click.echo(f"{tenant.name} ({tenant.id}), weight {tenant.weight:g}")
    for name in QUOTAS:
        value = getattr(tenant, name)
        click.echo(f"  {name.replace('_', ' ')}: {value if value is not None else 'no limit'}")


@click.group()
def tenants() -> None:
    """Manage tenants: fair-share weight and quotas."""


@tenants.command(name="create")
@click.argument("name")
@tenant_options
@common_options
def create_tenant(
    name: str, data_dir: Path | None, config: Path | None, database_url: str | None, **given: Any
) -> None:
    """Create a tenant (keys of a new tenant's name make one too, with the defaults)."""
    settings = load(config, data_dir=data_dir, database_url=database_url)
    request = _fields(given, uc.CreateTenant, name=name)
    _show_tenant(_run(settings, lambda deps: uc.create_tenant(deps, request)))


@tenants.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="As JSON, as the admin API answers.")
@common_options
def list_tenants(as_json: bool, data_dir: Path | None, config: Path | None, database_url: str | None) -> None:
    """List tenants with their weight and quotas."""
    settings = load(config, data_dir=data_dir, database_url=database_url)
    found = _run(settings, lambda deps: deps.store.list_tenants())
    if as_json:
        _echo_json([tenant.to_dict() for tenant in found])
        return
    header: tuple[str, ...] = ("NAME", "WEIGHT", *(name.upper() for name in QUOTAS))
    rows = [header] + [
        (t.name, f"{t.weight:g}", *(str(getattr(t, n)) if getattr(t, n) is not None else "-" for n in QUOTAS))
        for t in found
    ]
    _echo_table(rows)


@tenants.command(name="show")
@click.argument("name")
@common_options
def show_tenant(name: str, data_dir: Path | None, config: Path | None, database_url: str | None) -> None:
    """Show one tenant's weight and quotas."""
    settings = load(config, data_dir=data_dir, database_url=database_url)
    _show_tenant(_run(settings, lambda deps: uc.get_tenant(deps, name)))


@tenants.command(name="update")
@click.argument("name")
@tenant_options
@common_options
def update_tenant(
    name: str, data_dir: Path | None, config: Path | None, database_url: str | None, **given: Any
) -> None:
    """Set a tenant's weight or quotas (`--QUOTA none` lifts one); the dispatcher applies them at once."""
    settings = load(config, data_dir=data_dir, database_url=database_url)
    fields = _fields(given, uc.TenantFields)
    _show_tenant(_run(settings, lambda deps: uc.update_tenant(deps, name, fields)))


# --- webhooks ---------------------------------------------------------------------------------------------------


@click.group()
def webhooks() -> None:
    """Manage webhook endpoints (signed batch events) and dead letters."""


@webhooks.command(name="create")
@click.argument("url")
@click.option("--tenant", default=DEFAULT_TENANT, show_default=True, help="Tenant whose batch events go there.")
@click.option("--json", "as_json", is_flag=True, help="As JSON, as the admin API answers.")
@common_options
def create_webhook(
    url: str, tenant: str, as_json: bool, data_dir: Path | None, config: Path | None, database_url: str | None
) -> None:
    """Add an endpoint and print its `whsec_` secret (shown only once): receivers verify signatures with it."""
    settings = load(config, data_dir=data_dir, database_url=database_url)
    try:
        request = wh.CreateWebhook(url=url)
    except ValidationError as exc:
        raise click.BadParameter(str(exc.errors()[0]["msg"]), param_hint="URL") from None
    endpoint = _run(settings, lambda deps: wh.create_endpoint(deps, tenant, request))
    if as_json:
        _echo_json(endpoint.to_dict(with_secret=True))
        return
    click.echo(f"{endpoint.id}: {tenant}'s batch events go to {endpoint.url}; its signing secret:", err=True)
    click.echo(endpoint.secret)


@webhooks.command(name="list")
@click.option("--tenant", help="Only this tenant's endpoints.")
@click.option("--json", "as_json", is_flag=True, help="As JSON, as the admin API answers.")
@common_options
def list_webhooks(
    tenant: str | None, as_json: bool, data_dir: Path | None, config: Path | None, database_url: str | None
) -> None:
    """List webhook endpoints (never their secrets)."""
    settings = load(config, data_dir=data_dir, database_url=database_url)
    found = _run(settings, lambda deps: wh.list_endpoints(deps, tenant))
    if as_json:
        _echo_json([endpoint.to_dict() for endpoint in found])
        return
    rows: list[tuple[str, ...]] = [("ID", "TENANT", "URL", "CREATED")]
    rows += [(e.id, e.tenant_id, e.url, _when(e.created_at)) for e in found]
    _echo_table(rows)


@webhooks.command(name="delete")
@click.argument("endpoint_id")
@click.option("--tenant", default=DEFAULT_TENANT, show_default=True, help="The endpoint's tenant.")
@common_options
def delete_webhook(
    endpoint_id: str, tenant: str, data_dir: Path | None, config: Path | None, database_url: str | None
) -> None:
    """Remove an endpoint; its pending and dead deliveries go with it."""
    settings = load(config, data_dir=data_dir, database_url=database_url)
    _run(settings, lambda deps: wh.delete_endpoint(deps, tenant, endpoint_id))
    click.echo(f"deleted {endpoint_id}")


@webhooks.command(name="dead")
@click.option("--tenant", help="Only this tenant's.")
@click.option("--json", "as_json", is_flag=True, help="As JSON, as the admin API answers.")
@common_options
def dead_webhooks(
    tenant: str | None, as_json: bool, data_dir: Path | None, config: Path | None, database_url: str | None
) -> None:
    """Deliveries given up on after the retry horizon (24 h by default), newest first."""
    settings = load(config, data_dir=data_dir, database_url=database_url)
    found = _run(settings, lambda deps: wh.list_deliveries(deps, tenant=tenant))
    if as_json:
        _echo_json([record.to_dict() for record in found])
        return
    rows: list[tuple[str, ...]] = [("ID", "EVENT", "TYPE", "BATCH", "ENDPOINT", "TRIES", "GAVE UP", "LAST ERROR")]
    rows += [
        (
            str(d.seq),
            d.event.id,
            d.event.type,
            d.event.batch_id,
            d.endpoint_id,
            str(d.attempts),
            _when(d.finished_at),
            (d.last_error or "")[:60],
        )
        for d in found
    ]
    _echo_table(rows)


@webhooks.command(name="retry")
@click.argument("delivery_id", type=int)
@common_options
def retry_webhook(delivery_id: int, data_dir: Path | None, config: Path | None, database_url: str | None) -> None:
    """Send a dead letter once more (a worker picks it up within a second or so)."""
    settings = load(config, data_dir=data_dir, database_url=database_url)
    _run(settings, lambda deps: wh.redeliver(deps, delivery_id))
    click.echo(f"delivery {delivery_id} queued again")
