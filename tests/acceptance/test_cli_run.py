"""`backfill run` as a real process against the fake upstream: files, exit codes, kill -9 and resume, refusals."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.acceptance.conftest import MODEL
from tests.support.processes import Upstream, child_env, write_config

SETTINGS: dict[str, Any] = {"poll_interval_s": 0.1, "retry_base_s": 0.05, "retry_max_s": 0.5, "lease_ttl_s": 5.0}


def line(i: int, text: str) -> dict[str, Any]:
    return {
        "custom_id": f"c-{i}",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": MODEL, "messages": [{"role": "user", "content": text}]},
    }


def write_input(path: Path, lines: list[dict[str, Any]]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(item) + b"\n" for item in lines))
    return path


def config_for(tmp_path: Path, upstream: Upstream, max_concurrency: int = 8) -> Path:
    backend = {"name": "up", "url": upstream.url, "models": [MODEL], "max_concurrency": max_concurrency}
    return write_config(tmp_path / "backfill.toml", SETTINGS, [backend])


def run_command(config: Path, source: Path, output: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "backfill", "run", str(source), "-o", str(output), "--config", str(config), *extra]


def run(config: Path, source: Path, output: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        run_command(config, source, output, *extra), env=child_env(), capture_output=True, text=True, timeout=120
    )


def custom_ids(path: Path) -> list[str]:
    return [orjson.loads(raw)["custom_id"] for raw in path.read_bytes().splitlines()]


def test_run_writes_every_line_in_order_and_exits_0(tmp_path: Path, upstream: Upstream) -> None:
    source = write_input(tmp_path / "in.jsonl", [line(i, f"ok-{time.time_ns()} {i}") for i in range(30)])
    output = tmp_path / "out.jsonl"

    done = run(config_for(tmp_path, upstream), source, output)

    assert 0 == done.returncode, done.stderr
    assert [f"c-{i}" for i in range(30)] == custom_ids(output)
    assert all(200 == orjson.loads(raw)["response"]["status_code"] for raw in output.read_bytes().splitlines())
    assert b"" == (tmp_path / "out.errors.jsonl").read_bytes()
    assert not (tmp_path / "out.jsonl.backfill").exists(), "the state directory goes once the files are written"
    assert "completed: 30 lines in" in done.stderr


def test_failed_lines_go_to_the_error_file_and_exit_1(tmp_path: Path, upstream: Upstream) -> None:
    tag = f"some-fail-{time.time_ns()}"
    lines = [line(i, f"{tag} {i}" + (" #bad400" if i % 5 == 0 else "")) for i in range(20)]
    source = write_input(tmp_path / "in.jsonl", lines)
    output, errors = tmp_path / "out.jsonl", tmp_path / "failures.jsonl"

    done = run(config_for(tmp_path, upstream), source, output, "--errors", str(errors))

    assert 1 == done.returncode, done.stderr
    assert [f"c-{i}" for i in range(20) if i % 5] == custom_ids(output)
    assert [f"c-{i}" for i in range(0, 20, 5)] == custom_ids(errors)
    assert not (tmp_path / "out.errors.jsonl").exists()


def test_an_invalid_input_file_exits_2_with_numbered_errors_and_sends_nothing(
    tmp_path: Path, upstream: Upstream
) -> None:
    tag = f"invalid-{time.time_ns()}"
    good = orjson.dumps(line(1, f"{tag} fine")).decode()
    no_id = orjson.dumps({**line(3, tag), "custom_id": None}).decode()
    source = tmp_path / "in.jsonl"
    source.write_text(f"{good}\nthis is not json\n{no_id}\n")
    output = tmp_path / "out.jsonl"

    done = run(config_for(tmp_path, upstream), source, output)

    assert 2 == done.returncode, done.stderr
    assert "in.jsonl is invalid:" in done.stderr
    assert "line 2:" in done.stderr
    assert "line 3:" in done.stderr
    assert not output.exists()
    assert not (tmp_path / "out.jsonl.backfill").exists()
    assert not [entry for entry in upstream.stats()["log"] if entry["key"].startswith(tag)]


def final_lines(state_db: Path) -> set[str]:
    """custom_ids whose result (success or failure) is committed in a run's state database."""
    with sqlite3.connect(state_db) as conn:
        rows = conn.execute("SELECT custom_id FROM requests WHERE state IN ('succeeded', 'failed')").fetchall()
    return {row[0] for row in rows}


def committed_count(state_db: Path) -> int:
    try:
        with sqlite3.connect(f"file:{state_db}?mode=ro", uri=True) as conn:
            return int(conn.execute("SELECT count(*) FROM requests WHERE state = 'succeeded'").fetchone()[0])
    except sqlite3.OperationalError:  # not created or not migrated yet
        return 0


def test_kill_9_then_rerun_continues_and_never_resends_a_finished_line(tmp_path: Path, upstream: Upstream) -> None:
    n = 160
    tag = f"resume-{time.time_ns()}"
    texts = [f"{tag} line {i} #slow:40" + (" #bad400" if i % 40 == 7 else "") for i in range(n)]
    config = config_for(tmp_path, upstream, max_concurrency=4)
    killed_in = write_input(tmp_path / "in.jsonl", [line(i, text) for i, text in enumerate(texts)])
    output = tmp_path / "out.jsonl"
    state_db = tmp_path / "out.jsonl.backfill" / "backfill.db"
    # The same lines under another tag, run without interruption alongside, for comparison.
    (tmp_path / "whole").mkdir()
    whole_in = write_input(tmp_path / "whole" / "in.jsonl", [line(i, f"whole-{t}") for i, t in enumerate(texts)])
    whole = subprocess.Popen(
        run_command(config, whole_in, tmp_path / "whole" / "out.jsonl"), env=child_env(), stderr=subprocess.PIPE
    )
    killed = subprocess.Popen(run_command(config, killed_in, output), env=child_env(), stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while committed_count(state_db) < n // 4:
        assert killed.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.02)

    killed.send_signal(signal.SIGKILL)
    killed.wait()
    killed_at = time.time()
    committed = final_lines(state_db)
    assert n // 4 <= len(committed) < n

    resumed = run(config, killed_in, output)

    _, whole_stderr = whole.communicate(timeout=60)
    assert 1 == resumed.returncode, resumed.stderr
    assert "resuming batch_" in resumed.stderr
    assert 1 == whole.returncode, whole_stderr
    errors = tmp_path / "out.errors.jsonl"
    assert custom_ids(tmp_path / "whole" / "out.jsonl") == custom_ids(output)
    assert custom_ids(tmp_path / "whole" / "out.errors.jsonl") == custom_ids(errors)
    every = custom_ids(output) + custom_ids(errors)
    assert len(every) == len(set(every)) == n
    sent_again = {
        entry["key"] for entry in upstream.stats()["log"] if entry["key"].startswith(tag) and entry["t"] > killed_at
    }
    committed_texts = {texts[int(custom_id.removeprefix("c-"))] for custom_id in committed}
    assert set() == sent_again & committed_texts
    assert sent_again, "lines in flight or queued at the kill ran after the restart"


def test_a_changed_input_is_refused_and_a_kept_state_is_not_run_again(tmp_path: Path, upstream: Upstream) -> None:
    tag = f"changed-{time.time_ns()}"
    source = write_input(tmp_path / "in.jsonl", [line(i, f"{tag} {i}") for i in range(10)])
    output = tmp_path / "out.jsonl"
    config = config_for(tmp_path, upstream)
    assert 0 == (first := run(config, source, output, "--keep-state")).returncode, first.stderr
    assert (tmp_path / "out.jsonl.backfill" / "run.json").exists()
    sent = len([entry for entry in upstream.stats()["log"] if entry["key"].startswith(tag)])

    again = run(config, source, output, "--keep-state")
    write_input(source, [line(i, f"{tag} {i}") for i in range(11)])
    changed = run(config, source, output)

    assert 0 == again.returncode, again.stderr
    assert [f"c-{i}" for i in range(10)] == custom_ids(output)
    assert sent == len([entry for entry in upstream.stats()["log"] if entry["key"].startswith(tag)])
    assert 3 == changed.returncode
    assert "in.jsonl has changed since this run started" in changed.stderr
    assert "remove" in changed.stderr


@pytest.mark.timeout(60)
def test_a_second_run_on_the_same_state_directory_is_refused(tmp_path: Path, upstream: Upstream) -> None:
    tag = f"locked-{time.time_ns()}"
    source = write_input(tmp_path / "in.jsonl", [line(i, f"{tag} {i} #slow:300") for i in range(20)])
    output = tmp_path / "out.jsonl"
    config = config_for(tmp_path, upstream, max_concurrency=1)
    first = subprocess.Popen(run_command(config, source, output), env=child_env(), stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "out.jsonl.backfill" / "run.json").exists():
            assert time.monotonic() < deadline
            time.sleep(0.02)

        second = run(config, source, output)

        assert 3 == second.returncode
        assert "another `backfill run` is using" in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()


def test_ctrl_c_says_stopping_at_once_hands_lines_in_flight_back_and_a_rerun_finishes(
    tmp_path: Path, upstream: Upstream
) -> None:
    gate = f"ctrl-c-{time.time_ns()}"
    source = write_input(tmp_path / "in.jsonl", [line(i, f"held {i} #gate:{gate}") for i in range(6)])
    output = tmp_path / "out.jsonl"
    config = config_for(tmp_path, upstream, max_concurrency=2)
    running = subprocess.Popen(run_command(config, source, output), env=child_env(), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while httpx.get(f"{upstream.url}/_gates/{gate}", timeout=10).json()["waiting"] < 2:  # both slots held
            assert running.poll() is None, "the run ended before it could be interrupted"
            assert time.monotonic() < deadline, "no line reached the upstream"
            time.sleep(0.05)

        interrupted_at = time.monotonic()
        running.send_signal(signal.SIGINT)
        _, stderr = running.communicate(timeout=60)
        took_s = time.monotonic() - interrupted_at
    finally:
        running.kill()
    upstream.open_gate(gate)
    rerun = run(config, source, output)

    assert 130 == running.returncode, stderr
    assert "stopping: lines in flight are handed back" in stderr
    assert took_s < 20, f"{took_s:.1f} s to stop; lines in flight were waited for (shutdown_grace_s is 30 s)"
    assert 0 == rerun.returncode, rerun.stderr
    assert "resuming batch_" in rerun.stderr
    assert [f"c-{i}" for i in range(6)] == custom_ids(output)
