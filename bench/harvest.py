"""Harvesting idle GPU time: interactive latency and batch throughput on one engine shared by both, in virtual
time, every strategy side by side in one run.

The Azure conversation trace (bench/data, CC-BY 4.0) is replayed as interactive traffic on the iteration-level
engine model (sim/engine.py: an H100 serving an 8B model, vLLM-like), compressed so its busiest minute needs
about 90% of the engine, while a backlog of batch lines drawn from the same trace waits. Rows:

    interactive only    the reference: no batch work
    FIFO, no limit      batch lines sent as fast as the engine takes them (its FCFS queue decides)
    best fixed cap      the largest fixed batch concurrency whose p99 TTFT stays within +10% (searched)
    engine priority     no limit; the engine in priority mode, batch lines at low priority
    backfill            the harvest controller (proxy TTFT, engine queue and token counters) and engine priority
    clairvoyant bound   batch limit set from the interactive demand of the current 30 s, known in advance: what
                        a controller that can only read the present may approach, not exceed

Columns: interactive p50/p99 time to first token relative to interactive only; batch output tokens/s; harvest
efficiency = batch tokens served / (engine capacity - interactive tokens served), tokens = prompt + output and
the capacity measured with the same request mix. A second table repeats the run for traffic that bypasses the
proxy: the controller sees only the engine's /metrics (its queue; TTFT of every request, batch included).

Goals (issue 5): backfill's p99 TTFT within +10% of interactive only, harvest efficiency >= 80%, and >= 1.5x
the batch throughput of the best fixed cap.

    .venv/bin/python bench/harvest.py                 # the whole hour of trace
    .venv/bin/python bench/harvest.py --minutes 10    # a slice: a smoke run, not a figure
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from harness import REPO, machine_line, table

from backfill.sim.profile import EngineProfile
from backfill.sim.shared_engine import (
    SharedResult,
    capacity_tokens_per_s,
    harvest_efficiency,
    load_trace,
    run,
    scale_for_peak,
)

TRACE = REPO / "bench" / "data" / "azure_llm_2023_conv.csv"
CAPS = (8, 16, 32, 64, 128)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=58.0, help="virtual minutes of (uncompressed) trace")
    parser.add_argument("--peak", type=float, default=0.9, help="share of the engine the busiest minute needs")
    parser.add_argument("--trace", type=Path, default=TRACE)
    parser.add_argument("--caps", type=int, nargs="+", default=list(CAPS))
    args = parser.parse_args()

    profile = EngineProfile()
    trace = load_trace(args.trace)
    scale = scale_for_peak(trace, profile, args.peak)
    duration = args.minutes * 60 / scale
    capacity = capacity_tokens_per_s(profile, trace, seed=3)
    print(machine_line())
    print(
        f"trace {args.trace.name}: {args.minutes:g} min compressed x{scale:.2f} -> {duration:.0f} s virtual;"
        f" engine capacity {capacity:,.0f} tokens/s (prompt + output, trace mix)\n",
        flush=True,
    )

    def go(strategy: str) -> SharedResult:
        started = time.perf_counter()
        result = run(strategy, trace, profile, scale=scale, duration_s=duration)
        print(
            f"  {strategy}: p99 {result.ttft_quantile(0.99) * 1000:.0f} ms,"
            f" batch {result.batch_output_per_s:,.0f} out tok/s, shed {result.shed}"
            f" ({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
        return result

    alone = go("interactive")
    fifo = go("fifo")
    caps = [go(f"cap:{cap}") for cap in args.caps]
    priority = go("priority")
    backfill = go("backfill")
    metrics_only = go("backfill-metrics")
    bound = go("clairvoyant")

    p99_alone = alone.ttft_quantile(0.99)
    within = [r for r in caps if r.ttft_quantile(0.99) <= 1.10 * p99_alone]
    best_cap = max(within, key=lambda r: r.batch_output_per_s) if within else None

    def row(name: str, result: SharedResult) -> list[str]:
        p50 = result.ttft_quantile(0.5) / alone.ttft_quantile(0.5)
        p99 = result.ttft_quantile(0.99) / p99_alone
        efficiency = harvest_efficiency(result, capacity) if result is not alone else 0.0
        versus = (
            f"{result.batch_output_per_s / best_cap.batch_output_per_s:.2f}"
            if best_cap is not None and best_cap.batch_output_per_s > 0 and result is not alone
            else "-"
        )
        return [
            name,
            f"{result.ttft_quantile(0.5) * 1000:.0f} ({p50:.2f}x)",
            f"{result.ttft_quantile(0.99) * 1000:.0f} ({p99:.2f}x)",
            f"{result.batch_output_per_s:,.0f}",
            f"{efficiency:.0%}",
            versus,
        ]

    header = ["strategy", "TTFT p50 ms", "TTFT p99 ms", "batch out tok/s", "harvest eff.", "x best cap"]
    rows = [row("interactive only (reference)", alone), row("FIFO, no limit", fifo)]
    rows += [row(f"fixed cap {r.strategy[4:]}" + (" (best)" if r is best_cap else ""), r) for r in caps]
    rows += [row("engine priority alone", priority), row("backfill (proxy + metrics)", backfill)]
    rows += [row("clairvoyant bound (knows the next 30 s)", bound)]
    print()
    print(table(header, rows))
    print("\ntraffic that bypasses the proxy (the controller reads only the engine's /metrics):\n")
    print(table(header, [row("interactive only (reference)", alone), row("backfill (metrics only)", metrics_only)]))


if __name__ == "__main__":
    main()
