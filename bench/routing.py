"""Routing: one batch through `backfill serve` to two simulated endpoints of unequal speed, against the sum of
their capacities.

Issue 4: "two simulator endpoints of unequal speed (1x and 2x): >= 0.95x the sum of their capacities."

    1x   `backfill sim serve` with the default profile (an H100 serving Llama-3-8B, max_num_seqs 256).
    2x   the same profile with its four timing coefficients halved (iteration_base_s, prefill_token_s,
         decode_seq_s, kv_token_s, written to a profile TOML in a temporary directory): every engine iteration
         takes half as long, so at any concurrency it serves exactly twice as many tokens per second, with the
         same batch and KV-cache limits: a GPU twice as fast, not a second GPU.

Both run at the same --time-scale (default 0.75, so that the pooled run stays within this machine's CPU), and
every side gets fresh simulators (an empty prefix cache). The batch is bench/saturation.py's (chat, a shared
system prompt, 200-800 characters of user text, `max_tokens` exponential with mean 256 clipped to 16-1,024,
`ignore_eos: true`; default 12,000 lines).

    sweep      the ideal closed-loop client (bench/saturation.py) on each endpoint alone, first --sweep-lines lines,
               at each --sweep concurrency: the best lines/s picks that endpoint's N.
    capacity   the ideal client at its best N on each endpoint alone, on a share of the batch proportional to the
               sweep's rates (about 1/3 and 2/3 of the lines), so that each capacity run lasts about as long as
               the pooled run would at the sum of the capacities (the same start-up and drain, in proportion).
               capacity = its lines / its seconds.
    backfill   `backfill serve` (SQLite, fresh data dir) with two `[[backends]]` serving the same model, one per
               endpoint, max_concurrency 1024 each and adaptive concurrency on (the default): backfill finds
               each endpoint's concurrency and splits the lines by itself. Time: POST /v1/batches -> `completed`.

Printed: backfill's lines/s over (capacity_1x + capacity_2x), how the lines split between the endpoints (each
simulator's /_stats `completed`) against the split of their capacities, and the concurrency backfill settled at
on each (the simulator's running + waiting, and backfill's own `backfill_backend_in_flight`).

    .venv/bin/python bench/routing.py             # 12,000 lines, ~7 minutes
    .venv/bin/python bench/routing.py --quick     # 2,000 lines, a smoke run
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness import machine_line, running, table
from saturation import (
    Side,
    SimSpec,
    Workload,
    best,
    fmt_optional,
    generate,
    load_average,
    model_ceiling,
    run_backfill,
    run_ideal,
    sweep,
)

from backfill.sim.profile import EngineProfile

TIMING = ("iteration_base_s", "prefill_token_s", "decode_seq_s", "kv_token_s")


def write_fast_profile(path: Path, speedup: float) -> Path:
    """The default profile with every timing coefficient divided by `speedup`, as a profile TOML."""
    default = EngineProfile()
    path.write_text("".join(f"{name} = {getattr(default, name) / speedup!r}\n" for name in TIMING))
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=12_000, help="request lines in the batch (default 12,000)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2,000 lines, a 400-line sweep")
    parser.add_argument("--time-scale", type=float, default=0.75, help="both simulators' --time-scale (default 0.75)")
    parser.add_argument("--speedup", type=float, default=2.0, help="how much faster the second endpoint is (2)")
    parser.add_argument(
        "--sweep", type=int, nargs="+", default=[128, 256, 384, 512], help="closed-loop concurrencies to try"
    )
    parser.add_argument("--sweep-lines", type=int, default=800, help="lines per sweep point (default 800)")
    parser.add_argument("--max-concurrency", type=int, default=1024, help="each backfill backend's max_concurrency")
    parser.add_argument("--initial-concurrency", type=int, help="each backfill backend's initial_concurrency")
    parser.add_argument("--profile", type=Path, help="py-spy the backfill server into this file (.svg, .json, .txt)")
    args = parser.parse_args(argv)
    lines = 2_000 if args.quick else args.lines
    sweep_lines = min(lines, 400 if args.quick else args.sweep_lines)
    print(machine_line())
    print(f"load average at start: {load_average()}", flush=True)
    backend: dict[str, Any] = {"max_concurrency": args.max_concurrency}
    if args.initial_concurrency is not None:
        backend["initial_concurrency"] = args.initial_concurrency
    tmp = Path(tempfile.mkdtemp(prefix="backfill-bench-routing-"))
    try:
        workload = generate(tmp / "requests.jsonl", lines)
        fast_profile = write_fast_profile(tmp / f"sim-{args.speedup:g}x.toml", args.speedup)
        specs = {"sim-1x": SimSpec(args.time_scale), f"sim-{args.speedup:g}x": SimSpec(args.time_scale, fast_profile)}
        with running() as children:
            best_n, rates = {}, {}
            for name, spec in specs.items():
                print(f"sweep of {name} on the first {sweep_lines} lines (time scale {args.time_scale}):", flush=True)
                results = sweep(children, spec, workload, sweep_lines, args.sweep, label=f" {name}")
                best_n[name] = best(results)
                rates[name] = results[best_n[name]].lines_per_s
            shares = split(lines, rates)
            capacity: dict[str, Side] = {}
            ceilings: dict[str, float] = {}
            first = 0
            for name, spec in specs.items():
                bodies = workload.bodies[first : first + shares[name]]
                first += shares[name]
                ceilings[name] = len(bodies) / (
                    model_ceiling(spec.engine_profile(), bodies, best_n[name]) * args.time_scale
                )
                capacity[name] = run_ideal(children, spec, bodies, best_n[name], f"{name} alone, N={best_n[name]}")
                side = capacity[name]
                print(f"capacity {name}: {side.lines_per_s:.1f} lines/s ({side.lines} lines, {side.seconds:.1f} s)")
            ours = run_backfill(children, specs, workload, tmp / "backfill", backend, args.profile)
            print(f"backfill: {ours.lines_per_s:.1f} lines/s ({ours.seconds:.1f} s)", flush=True)
        report(workload, args.time_scale, capacity, ceilings, ours)
        if args.profile:
            print(f"profile of the backfill server: {args.profile}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"load average at end: {load_average()}")
    return 0


def split(lines: int, rates: dict[str, float]) -> dict[str, int]:
    """`lines` shared out in proportion to `rates` (the last one takes the rounding)."""
    total = sum(rates.values())
    names = list(rates)
    shares = {name: math.floor(lines * rates[name] / total) for name in names[:-1]}
    shares[names[-1]] = lines - sum(shares.values())
    return shares


def report(
    workload: Workload, time_scale: float, capacity: dict[str, Side], ceilings: dict[str, float], ours: Side
) -> None:
    lines = len(workload.ids)
    print(
        f"\n{lines} lines, {workload.output_tokens:,} output tokens (ignore_eos); time scale {time_scale}: rates are "
        f"wall-clock, {1 / time_scale:g}x the modelled ones\n"
    )
    total = sum(side.lines_per_s for side in capacity.values())
    total_tokens = sum(side.tokens_per_s for side in capacity.values())
    rows = [
        [
            side.name,
            f"{side.lines:,}",
            f"{side.seconds:.1f}",
            f"{side.lines_per_s:.1f}",
            f"{side.tokens_per_s:,.0f}",
            f"{side.lines_per_s / total:.3f}",
            f"{side.sim_in_flight:.0f}",
            f"{ceilings[name]:.1f}",
        ]
        for name, side in capacity.items()
    ]
    rows.append(["sum of capacities", "", "", f"{total:.1f}", f"{total_tokens:,.0f}", "1.000", "", ""])
    rows.append(
        [
            "backfill, both endpoints: create -> completed",
            f"{ours.lines:,}",
            f"{ours.seconds:.1f}",
            f"{ours.lines_per_s:.1f}",
            f"{ours.tokens_per_s:,.0f}",
            f"{ours.lines_per_s / total:.3f}",
            f"{ours.sim_in_flight:.0f}",
            f"{sum(ceilings.values()):.1f}",
        ]
    )
    headers = ["side", "lines", "seconds", "lines/s", "output tok/s", "x sum", "in flight", "model lines/s"]
    print(table(headers, rows))
    print(
        "\nin flight: median of the simulator's running + waiting over the middle 60% of the run; model: the engine "
        "model alone on the same lines in virtual time (no CPU, no network)"
    )
    per_sim: dict[str, dict[str, float]] = ours.extra["per_sim"]
    done = sum(p["completed"] for p in per_sim.values())
    split_rows = [
        [
            name,
            f"{p['completed']:,.0f}",
            f"{p['completed'] / done:.3f}",
            f"{capacity[name].lines_per_s / total:.3f}",
            f"{p['output_tokens']:,.0f}",
            f"{p['sim_in_flight']:.0f}",
            f"{p['own_in_flight']:.0f}",
            f"{p['max_own_in_flight']:.0f}",
            fmt_optional(p["ramp_s"], ".1f"),
        ]
        for name, p in per_sim.items()
    ]
    print("\nhow backfill split the lines (each simulator's /_stats and /metrics):\n")
    headers = [
        "endpoint", "lines", "share", "capacity share", "output tokens", "in flight", "backfill in flight",
        "max", "ramp s",
    ]  # fmt: skip
    print(table(headers, split_rows))
    print(
        "\nbackfill in flight: backfill's backfill_backend_in_flight, median over the middle 60% of the run, and its "
        "max; ramp: seconds until the simulator first held 90% of its median"
    )
    print(f"backfill server CPU: {ours.cpu_s:.1f} s; simulators' CPU: {ours.sim_cpu_s:.1f} s")
    ratio = ours.lines_per_s / total
    print(
        f"\nratio backfill / sum of capacities: {ratio:.3f}x  (goal >= 0.95x: {'met' if ratio >= 0.95 else 'NOT met'})"
    )


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
