"""Prefix grouping in virtual time: 200 shared system prompts x 100 lines each, shuffled, one batch, on a
simulated engine with automatic prefix caching whose KV cache holds about half the shared prompts at once.
Throughput with backfill's lease order (lines sharing a prefix released together) against arrival order,
everything else the same, side by side in one run.

Goal (issue 4): >= 1.3x arrival order. The lease order is the store's (prefix group, line number) order, built
by `domain.lines.group_by_prefix` from `domain.estimates.prefix_key`.

    .venv/bin/python bench/prefix_grouping.py            # 200 x 100 lines
    .venv/bin/python bench/prefix_grouping.py --quick    # 50 x 40 lines
"""

from __future__ import annotations

import argparse
import time

from harness import machine_line, table

from backfill.sim.scenarios import prefix_grouping


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="50 prompts x 40 lines")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    prompts, per_prompt = (50, 40) if args.quick else (200, 100)
    print(machine_line())
    print(
        f"{prompts} system prompts of 2,048 tokens x {per_prompt} lines (64 own prompt tokens, 32 output tokens),"
        " shuffled; KV cache 12,800 blocks of 16 tokens; virtual time\n"
    )
    rows = []
    results = {}
    for grouped in (False, True):
        started = time.perf_counter()
        results[grouped] = result = prefix_grouping(grouped, prompts=prompts, per_prompt=per_prompt, seed=args.seed)
        rows.append(
            [
                "backfill, prefix groups" if grouped else "arrival order (baseline)",
                f"{result.seconds:,.0f}",
                f"{result.lines_per_s:,.1f}",
                f"{result.cache_hit_rate:.0%}",
                f"{result.lines_per_s / results[False].lines_per_s:.2f}x",
                f"{time.perf_counter() - started:.1f}",
            ]
        )
    print(table(["order", "virtual s", "lines/s", "prefix cache hits", "x arrival", "wall s"], rows))


if __name__ == "__main__":
    main()
