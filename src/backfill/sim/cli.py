"""`backfill sim`: run the engine simulator."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Any

import click

from backfill.errors import ConfigError
from backfill.sim.profile import load_profile


@click.group()
def sim() -> None:
    """Engine simulator: an OpenAI-compatible server that models a vLLM-like engine without a GPU."""


@sim.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", type=int, required=True, help="Port to listen on.")
@click.option(
    "--profile",
    "profile_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Engine profile (TOML); default: an H100 serving Llama-3-8B (docs/simulator.md).",
)
@click.option("--model", help="Served model name (overrides the profile's).")
@click.option("--root", help="Where the weights come from, as GET /v1/models shows it (default: the model's name).")
@click.option("--time-scale", type=float, help="Sleep this fraction of each modelled iteration (0.01: 100x faster).")
def serve(
    host: str, port: int, profile_path: Path | None, model: str | None, root: str | None, time_scale: float | None
) -> None:
    """Serve /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models and /metrics."""
    import uvicorn

    from backfill.sim.server import create_sim_app

    overrides: dict[str, Any] = {
        name: value
        for name, value in (("model", model), ("root", root), ("time_scale", time_scale))
        if value is not None
    }
    try:
        profile = dataclasses.replace(load_profile(profile_path), **overrides)
    except ConfigError as exc:
        raise click.ClickException(exc.message) from exc
    uvicorn.run(
        create_sim_app(profile),
        host=host,
        port=port,
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        http="httptools" if importlib.util.find_spec("httptools") else "h11",
        lifespan="on",
        log_level="warning",
        access_log=False,
        server_header=False,
        date_header=False,
    )


@sim.command()
@click.argument("scenario", type=click.Choice(["fair-share", "deadlines", "prefix"]))
@click.option("--policy", type=click.Choice(["backfill", "fifo", "edf"]), default="backfill", show_default=True)
@click.option("--days", type=float, default=7.0, show_default=True, help="deadlines: how long a run.")
@click.option(
    "--trace",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="deadlines: interactive trace (CSV: TIMESTAMP,ContextTokens,GeneratedTokens), tiled hourly.",
)
@click.option("--seed", type=int, default=7, show_default=True)
def replay(scenario: str, policy: str, days: float, trace: Path | None, seed: int) -> None:
    """Run a scheduling scenario in virtual time (sim.scenarios) and print what happened.

    fair-share: tenant A's 50,000 lines, tenant B's 100 a minute later; prints B's completion time.
    deadlines: days of interactive load plus 1 h and 24 h batches; prints deadline misses.
    prefix: 200 shared prompts x 100 lines, shuffled; "fifo" means arrival order.
    edf: earliest deadline first across everything (fair share ignored), a reference for deadlines.
    """
    from backfill.sim import scenarios

    result: object
    if scenario == "fair-share":
        result = scenarios.fair_share(policy, seed=seed)
    elif scenario == "prefix":
        result = scenarios.prefix_grouping(policy == "backfill", seed=seed)
    else:
        if trace is None:
            raise click.UsageError("deadlines needs --trace FILE (an interactive-traffic trace)")
        result = scenarios.deadlines(policy, scenarios.deadline_workload(trace, days=days, seed=seed))
    assert dataclasses.is_dataclass(result)
    for name, value in dataclasses.asdict(result).items():
        click.echo(f"{name}: {value:,.2f}" if isinstance(value, float) else f"{name}: {value}")
