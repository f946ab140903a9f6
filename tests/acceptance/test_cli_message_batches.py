"""The client commands on Anthropic message batches (msgbatch_…), and lines that did not run said as such, as real
processes against a real server."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.acceptance.conftest import MODEL, StartServer, client_for
from tests.acceptance.helpers import chat_line
from tests.acceptance.helpers import wait_for as wait_openai
from tests.acceptance.message_batch_client import AnthropicClients, message, wait_ended, wait_for
from tests.acceptance.test_cli_client import cli, custom_ids, write_lines
from tests.support.processes import Upstream


@pytest.fixture
def connect() -> Iterator[AnthropicClients]:
    with AnthropicClients() as clients:
        yield clients


def small_backend(upstream: Upstream) -> list[dict[str, Any]]:
    return [{"name": "upstream", "url": upstream.url, "models": [MODEL], "max_concurrency": 1}]


def test_wait_status_results_and_list_know_message_batches(
    connect: AnthropicClients, start_server: StartServer, tmp_path: Path
) -> None:
    server = start_server()
    client = connect(server)
    tag = uuid.uuid4().hex
    openai_batch = cli(
        "submit", write_lines(tmp_path / "in.jsonl", [chat_line("c", tag)]), "--wait", "--base-url", server.base_url
    )
    batch = client.messages.batches.create(requests=[message(f"m-{i}", f"{tag} {i}") for i in range(3)])

    waited = cli("wait", batch.id, "--base-url", server.base_url)
    shown = cli("status", batch.id, "--base-url", server.base_url)
    as_json = cli("status", batch.id, "--json", "--base-url", server.base_url)
    output = tmp_path / "results.jsonl"
    fetched = cli("results", batch.id, "-o", output, "--base-url", server.base_url)
    listed = cli("list", "--base-url", server.base_url)
    listed_json = cli("list", "--json", "--base-url", server.base_url)

    assert 0 == waited.returncode, waited.stderr
    assert f"{batch.id} completed: 3 succeeded, 0 failed" in waited.stderr
    assert f"backfill results {batch.id} -o" in waited.stderr
    assert 0 == shown.returncode, shown.stderr
    assert "message batch (/v1/messages)" in shown.stdout
    assert "3 total · 3 succeeded · 0 failed" in shown.stdout
    assert f"/v1/messages/batches/{batch.id}/results" in shown.stdout
    assert ("message_batch", "ended") == tuple(
        orjson.loads(as_json.stdout)[key] for key in ("type", "processing_status")
    )
    assert 0 == fetched.returncode, fetched.stderr
    assert ["m-0", "m-1", "m-2"] == custom_ids(output)
    assert {"succeeded"} == {orjson.loads(line)["result"]["type"] for line in output.read_bytes().splitlines()}
    assert 0 == listed.returncode, listed.stderr
    rows = {line.split()[0]: line.split()[1:3] for line in listed.stdout.splitlines()[1:]}
    openai_id = openai_batch.stdout.strip()
    assert {batch.id: ["message", "completed"], openai_id: ["batch", "completed"]} == rows  # order: test_client.py
    assert {batch.id, openai_id} == {item["id"] for item in orjson.loads(listed_json.stdout)}


def test_cancel_a_message_batch_and_its_cancelled_requests_are_not_failed(
    connect: AnthropicClients, start_server: StartServer, upstream: Upstream, tmp_path: Path
) -> None:
    server = start_server(backends=small_backend(upstream))
    client = connect(server)
    tag = uuid.uuid4().hex
    requests = [message("quick", f"quick {tag}")] + [
        message(f"hang-{i}", f"hang {i} {tag} #gate:{tag}") for i in range(4)
    ]
    batch = client.messages.batches.create(requests=requests)
    wait_for(client, batch.id, lambda b: b.request_counts.succeeded == 1)

    cancelled = cli("cancel", batch.id, "--base-url", server.base_url)
    waited = cli("wait", batch.id, "--base-url", server.base_url)
    upstream.open_gate(tag)
    shown = cli("status", batch.id, "--base-url", server.base_url)
    again = cli("cancel", batch.id, "--base-url", server.base_url)
    fetched = cli("results", batch.id, "-o", tmp_path / "out.jsonl", "--base-url", server.base_url)

    assert 0 == cancelled.returncode, cancelled.stderr
    assert f"{batch.id} cancelling" == cancelled.stdout.strip()
    assert 1 == waited.returncode, waited.stderr
    assert f"{batch.id} cancelled: 1 succeeded, 0 failed, 4 cancelled" in waited.stderr
    assert "5 total · 1 succeeded · 0 failed · 4 cancelled" in shown.stdout
    assert 0 == again.returncode, again.stderr
    assert "had already ended (cancelled); nothing to cancel" in again.stderr
    assert 0 == fetched.returncode, fetched.stderr
    assert "5 results in" in fetched.stderr


def test_expired_requests_are_said_expired(
    connect: AnthropicClients, start_server: StartServer, upstream: Upstream
) -> None:
    server = start_server(backends=small_backend(upstream), message_batch_window_s=4)
    client = connect(server)
    tag = uuid.uuid4().hex
    requests = [message("quick", f"quick {tag}")] + [
        message(f"hang-{i}", f"hang {i} {tag} #gate:{tag}") for i in range(2)
    ]
    batch = client.messages.batches.create(requests=requests)
    wait_ended(client, batch.id, timeout_s=60)
    upstream.open_gate(tag)

    waited = cli("wait", batch.id, "--base-url", server.base_url)
    listed = cli("list", "--base-url", server.base_url)

    assert 1 == waited.returncode, waited.stderr
    assert f"{batch.id} expired: 1 succeeded, 0 failed, 2 expired" in waited.stderr
    row = next(line for line in listed.stdout.splitlines() if line.startswith(batch.id))
    assert "0, 2 expired" in row


def test_cancelled_lines_of_a_batch_are_not_shown_as_failed(
    start_server: StartServer, upstream: Upstream, tmp_path: Path
) -> None:
    server = start_server(backends=small_backend(upstream))
    tag = uuid.uuid4().hex
    lines = [chat_line("quick", f"quick {tag}")] + [
        chat_line(f"hang-{i}", f"hang {i} {tag} #gate:{tag}") for i in range(3)
    ]
    batch_id = cli("submit", write_lines(tmp_path / "in.jsonl", lines), "--base-url", server.base_url).stdout.strip()
    wait_openai(
        client_for(server),
        batch_id,
        lambda batch: batch.request_counts is not None and batch.request_counts.completed == 1,
    )

    cli("cancel", batch_id, "--base-url", server.base_url)
    waited = cli("wait", batch_id, "--base-url", server.base_url)
    upstream.open_gate(tag)
    as_json = orjson.loads(cli("status", batch_id, "--json", "--base-url", server.base_url).stdout)

    assert 1 == waited.returncode, waited.stderr
    assert f"{batch_id} cancelled: 1 succeeded, 0 failed, 3 cancelled" in waited.stderr
    assert {"total": 4, "completed": 1, "failed": 3} == as_json["request_counts"]
    assert {"expired": 0, "cancelled": 3} == as_json["backfill"]["request_counts"]
