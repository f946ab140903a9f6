"""What a dispatcher process reports about each endpoint it sends batch lines to, for the dashboard's endpoints page:
its lines in flight, the harvest ceiling it keeps to, the engine's queue, whether the endpoint is up, and the
interactive TTFT baseline its harvest controller holds batch work to.

Workers of a split deployment publish theirs through the database (store/workers.py) and the API replica that
serves /ui adds them up (`combine`)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EndpointReport:
    in_flight: int = 0
    ceiling: float | None = None  # this process's part of the harvest ceiling; None: not harvested here
    engine_waiting: int | None = None  # requests in the engine's own queue at the last scrape; None: not read
    up: bool | None = None  # the endpoint's circuit is closed; None: not known
    ttft_baseline_s: float | None = None  # None: not harvested, or not learned yet


def combine(reports: Iterable[EndpointReport]) -> EndpointReport:
    """Every process's report on one endpoint as one: lines in flight and ceilings add up (each worker keeps to its
    part of the ceiling); the engine's queue is the largest any read (they scrape the same engine, at moments a
    second apart); the endpoint is up only if no process finds it down; the baseline is the strictest one held."""
    reports = list(reports)
    ceilings = [r.ceiling for r in reports if r.ceiling is not None]
    waiting = [r.engine_waiting for r in reports if r.engine_waiting is not None]
    up = [r.up for r in reports if r.up is not None]
    baselines = [r.ttft_baseline_s for r in reports if r.ttft_baseline_s is not None]
    return EndpointReport(
        in_flight=sum(r.in_flight for r in reports),
        ceiling=sum(ceilings) if ceilings else None,
        engine_waiting=max(waiting) if waiting else None,
        up=all(up) if up else None,
        ttft_baseline_s=min(baselines) if baselines else None,
    )
