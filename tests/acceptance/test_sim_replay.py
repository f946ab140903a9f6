"""`backfill sim replay`: the scheduler in virtual time, from the command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support.processes import child_env


def replay(*args: str | Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "backfill", "sim", "replay", *map(str, args)]
    return subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=300)


def fields(output: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in output.splitlines())


def test_deadlines_over_a_day_of_a_trace(tmp_path: Path) -> None:
    trace = tmp_path / "trace.csv"
    rows = [f"2023-11-16 18:{m:02d}:{s:02d}.0000000,{300 + 7 * s},{50 + s}" for m in range(60) for s in range(0, 60, 6)]
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "\n".join(rows) + "\n")

    ran = replay("deadlines", "--days", "1", "--trace", trace)

    assert 0 == ran.returncode, ran.stderr
    result = fields(ran.stdout)
    assert ("backfill", "0") == (result["policy"], result["missed"])
    assert int(result["lines"].replace(",", "")) > 1000


def test_deadlines_need_a_trace() -> None:
    ran = replay("deadlines")
    assert 2 == ran.returncode
    assert "needs --trace" in ran.stderr
