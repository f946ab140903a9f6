"""The client commands (submit, status, wait, results, cancel, list) as real processes against a real server."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from tests.acceptance.conftest import MODEL, StartServer
from tests.acceptance.helpers import chat_line, jsonl
from tests.support.processes import Upstream, child_env, free_port


def cli(*args: str | Path, **env: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "backfill", *map(str, args)]
    return subprocess.run(command, env=child_env(**env), capture_output=True, text=True, timeout=120)


def write_lines(path: Path, lines: list[dict[str, Any]]) -> Path:
    path.write_bytes(jsonl(lines))
    return path


def custom_ids(path: Path) -> list[str]:
    return [orjson.loads(raw)["custom_id"] for raw in path.read_bytes().splitlines()]


def test_submit_and_wait_then_status_results_and_list(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server()
    tag = f"client-{time.time_ns()}"
    source = write_lines(tmp_path / "in.jsonl", [chat_line(f"r-{i}", f"{tag} {i}") for i in range(20)])

    submitted = cli("submit", source, "--wait", "--metadata", "job=cli", "--base-url", server.base_url)

    assert 0 == submitted.returncode, submitted.stderr
    batch_id = submitted.stdout.strip()
    assert batch_id.startswith("batch_")
    assert f"{batch_id} completed: 20 succeeded, 0 failed" in submitted.stderr
    assert f"backfill results {batch_id} -o" in submitted.stderr

    status = cli("status", batch_id, BACKFILL_BASE_URL=server.base_url)
    assert 0 == status.returncode, status.stderr
    assert "completed" in status.stdout
    assert "20 total · 20 succeeded · 0 failed" in status.stdout
    assert f"(model {MODEL}" in status.stdout
    assert "job=cli" in status.stdout
    assert "output file" in status.stdout

    output = tmp_path / "results.jsonl"
    fetched = cli("results", batch_id, "-o", output, "--base-url", f"{server.base_url}/v1")
    assert 0 == fetched.returncode, fetched.stderr
    assert [f"r-{i}" for i in range(20)] == custom_ids(output)
    assert b"" == (tmp_path / "results.errors.jsonl").read_bytes()

    listed = cli("list", "--limit", "5", "--base-url", server.base_url)
    assert 0 == listed.returncode, listed.stderr
    assert batch_id in listed.stdout
    assert "20/20" in listed.stdout


def test_cancel_then_wait_exits_1_and_results_hold_both_files(
    start_server: StartServer, upstream: Upstream, tmp_path: Path
) -> None:
    server = start_server(backends=[{"name": "up", "url": upstream.url, "models": [MODEL], "max_concurrency": 1}])
    tag = f"cancel-{time.time_ns()}"
    source = write_lines(tmp_path / "in.jsonl", [chat_line(f"r-{i}", f"{tag} {i} #slow:1000") for i in range(10)])
    submitted = cli("submit", source, "--base-url", server.base_url)
    assert 0 == submitted.returncode, submitted.stderr
    batch_id = submitted.stdout.strip()
    assert f"backfill wait {batch_id}" in submitted.stderr

    too_early = cli("results", batch_id, "-o", tmp_path / "early.jsonl", "--base-url", server.base_url)
    cancelled = cli("cancel", batch_id, "--base-url", server.base_url)
    waited = cli("wait", batch_id, "--base-url", server.base_url)
    output, errors = tmp_path / "out.jsonl", tmp_path / "failed.jsonl"
    fetched = cli("results", batch_id, "-o", output, "--errors", errors, "--base-url", server.base_url)

    assert 3 == too_early.returncode
    assert f"{batch_id} is still" in too_early.stderr
    assert not (tmp_path / "early.jsonl").exists()
    assert 0 == cancelled.returncode, cancelled.stderr
    assert f"{batch_id} cancelling" == cancelled.stdout.strip()
    assert 1 == waited.returncode, waited.stderr
    assert f"{batch_id} cancelled:" in waited.stderr
    assert 0 == fetched.returncode, fetched.stderr
    done, failed = custom_ids(output), custom_ids(errors)
    assert [f"r-{i}" for i in range(10)] == sorted(done + failed, key=lambda custom_id: int(custom_id[2:]))
    assert failed, "lines not started when the cancel came end in the error file"
    assert all("batch_cancelled" == orjson.loads(raw)["error"]["code"] for raw in errors.read_bytes().splitlines())


def test_an_invalid_file_submitted_with_wait_exits_2_with_line_numbers(
    start_server: StartServer, tmp_path: Path
) -> None:
    server = start_server()
    source = tmp_path / "in.jsonl"
    source.write_bytes(jsonl([chat_line("a", "fine")]) + b"not json\n")

    submitted = cli("submit", source, "--wait", "--base-url", server.base_url)
    batch_id = submitted.stdout.strip()
    fetched = cli("results", batch_id, "-o", tmp_path / "out.jsonl", "--base-url", server.base_url)

    assert 2 == submitted.returncode, submitted.stderr
    assert f"{batch_id} failed" in submitted.stderr
    assert "line 2:" in submitted.stderr
    assert 2 == fetched.returncode
    assert "line 2:" in fetched.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_api_key_from_option_or_environment_and_a_missing_one_is_a_one_line_error(
    start_server: StartServer, tmp_path: Path
) -> None:
    server = start_server()
    key = server.create_key("cli-team")

    anonymous = cli("list", "--base-url", server.base_url)
    with_option = cli("list", "--base-url", server.base_url, "--api-key", key)
    source = write_lines(tmp_path / "in.jsonl", [chat_line("only", f"keyed-{time.time_ns()}")])
    with_env = cli("submit", source, "--wait", BACKFILL_BASE_URL=server.base_url, BACKFILL_API_KEY=key)
    option_beats_env = cli("list", "--api-key", "sk-wrong", BACKFILL_BASE_URL=server.base_url, BACKFILL_API_KEY=key)

    assert 3 == anonymous.returncode
    assert "Error: You didn't provide an API key" in anonymous.stderr
    assert "(HTTP 401)" in anonymous.stderr
    assert 1 == len(anonymous.stderr.strip().splitlines())
    assert 0 == with_option.returncode, with_option.stderr
    assert 0 == with_env.returncode, with_env.stderr
    assert 3 == option_beats_env.returncode
    assert "(HTTP 401)" in option_beats_env.stderr


def test_unknown_ids_and_unfinished_batches_are_one_line_errors(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server()

    status = cli("status", "batch_nope", "--base-url", server.base_url)
    cancel = cli("cancel", "batch_nope", "--base-url", server.base_url)

    for done in (status, cancel):
        assert 3 == done.returncode
        assert "Error: No such Batch object: batch_nope (HTTP 404)" == done.stderr.strip()


def test_no_server_at_the_base_url_is_a_clear_error(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"

    done = cli("status", "batch_x", BACKFILL_BASE_URL=url)

    assert 3 == done.returncode
    assert f"cannot connect to the backfill server at {url} (connection refused)" in done.stderr
    assert 1 == len(done.stderr.strip().splitlines())


def embedding_line(custom_id: str, text: str) -> dict[str, object]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings", "body": {"model": MODEL, "input": text}}


def test_submit_takes_the_endpoint_from_the_lines_and_json_shows_the_api_objects(
    start_server: StartServer, tmp_path: Path
) -> None:
    server = start_server()
    source = write_lines(tmp_path / "emb.jsonl", [embedding_line(f"e-{i}", f"text {i}") for i in range(4)])

    submitted = cli("submit", source, "--wait", "--base-url", server.base_url)

    assert 0 == submitted.returncode, submitted.stderr
    batch_id = submitted.stdout.strip()
    shown = orjson.loads(cli("status", batch_id, "--json", "--base-url", server.base_url).stdout)
    assert ("/v1/embeddings", "completed") == (shown["endpoint"], shown["status"])
    assert {"estimated_completion_at": None, "schedule": None} == {
        key: shown["backfill"][key] for key in ("estimated_completion_at", "schedule")
    }  # an ended batch has no outlook any more
    listed = orjson.loads(cli("list", "--json", "--limit", "3", "--base-url", server.base_url).stdout)
    assert batch_id in [batch["id"] for batch in listed]


def test_a_json_array_or_mixed_endpoints_are_refused_before_anything_is_uploaded(tmp_path: Path) -> None:
    array = tmp_path / "array.jsonl"
    array.write_bytes(orjson.dumps([chat_line("a", "hi"), chat_line("b", "ho")]))
    mixed = write_lines(tmp_path / "mixed.jsonl", [chat_line("a", "hi"), embedding_line("b", "ho")])
    nowhere = f"http://127.0.0.1:{free_port()}"  # nothing listens: a refusal must come before any request

    as_array = cli("submit", array, "--base-url", nowhere)
    as_mixed = cli("submit", mixed, "--base-url", nowhere)

    assert (3, 3) == (as_array.returncode, as_mixed.returncode)
    assert "is a JSON array, not JSONL: write one request object per line" in as_array.stderr
    assert "name several endpoints (/v1/chat/completions, /v1/embeddings)" in as_mixed.stderr


def test_cancelling_a_batch_that_has_ended_is_not_an_error(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server()
    source = write_lines(tmp_path / "in.jsonl", [chat_line("r-0", "hello")])
    batch_id = cli("submit", source, "--wait", "--base-url", server.base_url).stdout.strip()

    cancelled = cli("cancel", batch_id, "--base-url", server.base_url)

    assert 0 == cancelled.returncode, cancelled.stderr
    assert f"{batch_id} completed" == cancelled.stdout.strip()
    assert "had already ended (completed); nothing to cancel" in cancelled.stderr


def test_diff_matches_two_runs_by_request_and_reports_what_moved(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server(max_attempts=2)
    tag = f"diff-{time.time_ns()}"
    common = [f"{tag} {i}" for i in range(5)]
    flaky = f"{tag} flaky #fail500:2"  # both attempts of the first run fail; the second run's succeed
    first = write_lines(tmp_path / "a.jsonl", [chat_line(f"a-{i}", text) for i, text in enumerate([*common, flaky])])
    second = write_lines(
        tmp_path / "b.jsonl",
        [chat_line(f"b-{i}", text) for i, text in enumerate([flaky, *reversed(common), f"{tag} new"])],
    )
    run_a = cli("submit", first, "--wait", "--base-url", server.base_url)
    run_b = cli("submit", second, "--wait", "--base-url", server.base_url)
    batch_a, batch_b = run_a.stdout.strip(), run_b.stdout.strip()

    text = cli("diff", batch_a, batch_b, "--base-url", server.base_url)
    as_json = cli("diff", batch_a, batch_b, "--json", "--base-url", server.base_url)

    assert 0 == text.returncode, text.stderr
    assert "matched 6 requests: 5 same, 0 changed, 0 new failures, 1 fixed, 0 still failing" in text.stdout
    report = orjson.loads(as_json.stdout)
    assert ([], ["b-6"]) == (report["only_in_a"], report["only_in_b"])
    assert [("a-5", "b-0")] == [(item["custom_id_a"], item["custom_id_b"]) for item in report["fixed"]]
    assert report["tokens"]["b"]["output"] > report["tokens"]["a"]["output"]  # the fixed line's tokens
