"""Which endpoint of a pool takes the next line: the least loaded of those that may start one now."""

from __future__ import annotations

from collections.abc import Mapping

from backfill.policy.limits import EndpointLimits


def pick_endpoint(now: float, endpoints: Mapping[str, EndpointLimits], tokens: float) -> str | None:
    """Least loaded = fewest lines in flight per allowed slot, so a faster endpoint (whose adaptive limit has
    grown larger) takes proportionally more; ties go to the first listed. None when none may start now."""
    best: str | None = None
    best_load = float("inf")
    for name, limits in endpoints.items():
        if limits.start_at(now, tokens) > now:
            continue
        load = limits.in_flight / max(limits.limit, 1)
        if load < best_load:
            best, best_load = name, load
    return best


def next_start_at(now: float, endpoints: Mapping[str, EndpointLimits], tokens: float) -> float:
    """The earliest time any endpoint may start a line (inf: only a finishing line frees one)."""
    return min((limits.start_at(now, tokens) for limits in endpoints.values()), default=float("inf"))
