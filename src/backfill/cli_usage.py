"""`backfill usage`: tokens, cost and batch SLAs per tenant, model and kind over a period, read from the database
directly like the other admin commands (cli_admin.py), with the use cases the usage API runs."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import click

from backfill.cli_admin import _echo_json, _echo_table, _run
from backfill.cli_options import common_options, load
from backfill.domain.usage_report import BUCKET_LIMITS, Price, UsageCounts, line_items
from backfill.usecases import usage as uc

_DURATION = re.compile(r"^(\d+)([mhdw])$")
_UNIT_S = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_BY = {"tenant": "project_id", "model": "model", "kind": "batch"}
_CAPACITIES = ("harvested_tokens", "off_peak_tokens", "promoted_tokens", "dedicated_tokens")


def _seconds(value: str) -> int:
    match = _DURATION.match(value)
    if match is None:
        raise click.BadParameter(f"expected a duration such as 30m, 12h, 7d or 2w, got {value!r}")
    return int(match.group(1)) * _UNIT_S[match.group(2)]


def _by(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in _BY]
    if unknown:
        raise click.BadParameter(f"unknown {', '.join(unknown)}: expected any of {', '.join(_BY)}")
    return names


async def _pages(deps: Any, report: Any, query: uc.ReportQuery) -> list[dict[str, Any]]:
    """Every bucket's results over the period (following next_page)."""
    results: list[dict[str, Any]] = []
    page: str | None = None
    while True:
        answer = await report(deps, None, uc.ReportQuery(**{**query.__dict__, "page": page}))
        results += [result for bucket in answer["data"] for result in bucket["results"]]
        page = answer["next_page"]
        if page is None:
            return results


def _group_value(result: dict[str, Any], name: str) -> str:
    if name == "tenant":
        return str(result["project_id"])
    if name == "model":
        return str(result["model"])
    return "batch" if result["batch"] else "interactive"


def usage_table(
    results: list[dict[str, Any]], by: list[str], prices: dict[str, Price], discount: float
) -> list[tuple[str, ...]]:
    """Rows of the usage table: results (grouped by tenant, model and batch) summed by `by`, with their cost."""
    sums: dict[tuple[str, ...], dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for result in results:
        group = tuple(_group_value(result, name) for name in by)
        counts = UsageCounts(
            result["num_model_requests"], result["input_tokens"], result["input_cached_tokens"], result["output_tokens"]
        )
        price = prices.get(result["model"])
        cost = (
            sum(
                line_items(
                    result["model"], counts, price, batch=bool(result["batch"]), batch_discount=discount
                ).values()
            )
            if price
            else 0.0
        )
        row = sums[group]
        row["requests"] += result["num_model_requests"]
        row["input_tokens"] += result["input_tokens"]
        row["cached_tokens"] += result["input_cached_tokens"]
        row["output_tokens"] += result["output_tokens"]
        for name in _CAPACITIES:
            row[name] += result[name]
        row["result_cache_hits"] += result.get("result_cache_hits", 0)  # absent from servers before the cache
        row["cost"] += cost
    header = (
        *(name.upper() for name in by), "REQUESTS", "INPUT", "CACHED", "OUTPUT", "HARVESTED", "FROM CACHE", "COST USD"
    )  # fmt: skip
    rows: list[tuple[str, ...]] = [header]
    for group, row in sorted(sums.items()):
        batch_tokens = sum(
            row[name] for name in ("harvested_tokens", "off_peak_tokens", "promoted_tokens", "dedicated_tokens")
        )
        harvested = (
            f"{100 * (row['harvested_tokens'] + row['off_peak_tokens']) / batch_tokens:.0f}%" if batch_tokens else "-"
        )
        rows.append(
            (
                *group,
                f"{row['requests']:.0f}",
                f"{row['input_tokens']:.0f}",
                f"{row['cached_tokens']:.0f}",
                f"{row['output_tokens']:.0f}",
                harvested,
                f"{row['result_cache_hits']:.0f}",
                f"{row['cost']:.4f}",
            )
        )
    return rows


def sla_table(results: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    """Rows of the SLA table, one per tenant and completion window (the results of one bucket)."""
    header = ("TENANT", "WINDOW", "ENDED", "IN WINDOW", "EXPIRED", "P50 S", "P95 S", "LINES EXPIRED")
    rows: list[tuple[str, ...]] = [header]
    for r in results:
        rows.append(
            (
                str(r["project_id"]),
                str(r["completion_window"]),
                str(r["batches_ended"]),
                str(r["batches_in_window"]),
                str(r["batches_expired"]),
                "-" if r["turnaround_p50_s"] is None else str(r["turnaround_p50_s"]),
                "-" if r["turnaround_p95_s"] is None else str(r["turnaround_p95_s"]),
                str(r["lines_expired"]),
            )
        )
    return rows


@click.command()
@click.option("--since", default="7d", show_default=True, help="How far back: 30m, 12h, 7d, 2w.")
@click.option("--by", "by", default="tenant,model", show_default=True, help="Group by any of tenant, model, kind.")
@click.option("--tenant", "tenants", multiple=True, help="Only this tenant (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="As JSON: the usage API's results and the SLA results.")
@common_options
def usage(
    since: str,
    by: str,
    tenants: tuple[str, ...],
    as_json: bool,
    data_dir: Path | None,
    config: Path | None,
    database_url: str | None,
) -> None:
    """Tokens, cost and batch SLAs per tenant and model over a period (docs/usage.md)."""
    settings = load(config, data_dir=data_dir, database_url=database_url)
    period_s, groups = _seconds(since), _by(by)

    async def report(deps: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        now = deps.now()
        start = (now - period_s) // 60 * 60
        width = "1d" if period_s > 2 * 86400 else "1h" if period_s > 2 * 3600 else "1m"
        query = uc.ReportQuery(
            start_time=start,
            end_time=now + 1,
            bucket_width=width,
            group_by=("project_id", "model", "batch"),
            limit=BUCKET_LIMITS[width][1],
            project_ids=tenants,
        )
        rows = await _pages(deps, uc.completions_usage, query)
        slas = await uc.batch_slas(
            deps,
            None,
            uc.ReportQuery(
                start_time=start,
                end_time=now + 1,
                bucket_width="1d",
                limit=31,
                group_by=("project_id", "completion_window"),
                project_ids=tenants,
            ),
        )
        return rows, _merge_slas([r for bucket in slas["data"] for r in bucket["results"]])

    rows, slas = _run(settings, report)
    if as_json:
        _echo_json({"usage": rows, "batch_slas": slas})
        return
    prices = {entry.model: entry.to_price() for entry in settings.prices}
    click.echo(f"Usage over the last {since}:")
    _echo_table(usage_table(rows, groups, prices, settings.batch_discount))
    click.echo("")
    click.echo("Batch SLAs:")
    _echo_table(sla_table(slas))


def _merge_slas(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One result per tenant and window over the period. Percentiles of a day each cannot be merged exactly: the
    worst day's is shown (the API's `bucket_width` gives them per bucket)."""
    merged: dict[tuple[Any, Any], dict[str, Any]] = {}
    for r in results:
        key = (r["project_id"], r["completion_window"])
        if key not in merged:
            merged[key] = dict(r)
            continue
        into = merged[key]
        for name in ("batches_ended", "batches_in_window", "batches_completed", "batches_failed", "batches_expired",
                     "batches_cancelled", "lines_expired"):  # fmt: skip
            into[name] += r[name]
        for name in ("turnaround_p50_s", "turnaround_p95_s"):
            values = [v for v in (into[name], r[name]) if v is not None]
            into[name] = max(values) if values else None
    return sorted(merged.values(), key=lambda r: (str(r["project_id"]), str(r["completion_window"])))
