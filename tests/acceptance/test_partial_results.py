"""Partial results (docs/partial-results.md): a running batch's output file is readable from the start, a growing
prefix in input order with `X-Incomplete` and `X-Last-Line`, resumable with `?offset=`, then the complete file."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
from openai import NotFoundError, OpenAI

from tests.acceptance.conftest import StartServer, client_for
from tests.acceptance.helpers import chat_line, raw_batch, start_batch, wait_for, wait_terminal
from tests.support.processes import Server, Upstream, child_env


@pytest.fixture(scope="module")
def server(start_module_server: StartServer) -> Server:
    return start_module_server()


def read(client: OpenAI, file_id: str, offset: int | None = None) -> tuple[list[str], dict[str, str]]:
    """The custom_ids of the lines read, and the two headers."""
    query: dict[str, Any] = {} if offset is None else {"offset": offset}
    response = client.files.with_raw_response.content(file_id, extra_query=query)
    ids = [orjson.loads(line)["custom_id"] for line in response.content.splitlines()]
    return ids, {name: response.headers.get(name, "") for name in ("x-incomplete", "x-last-line")}


def test_a_running_batch_s_output_grows_in_input_order_and_ends_as_the_complete_file(
    server: Server, upstream: Upstream
) -> None:
    client = client_for(server)
    tag = uuid.uuid4().hex[:8]
    lines = [
        chat_line("a", f"a {tag}"),
        chat_line("b", f"b {tag} #bad400"),  # fails: in the error file, not the output; it does not hold the prefix
        chat_line("c", f"c {tag}"),
        chat_line("d", f"d {tag} #gate:{tag}"),  # held: the prefix stops before it
        chat_line("e", f"e {tag}"),
        chat_line("f", f"f {tag}"),
    ]
    batch = start_batch(client, lines)
    planned = raw_batch(client, batch.id)["backfill"]["output_file_id"]
    assert planned is not None
    assert raw_batch(client, batch.id)["output_file_id"] is None  # OpenAI's field: null until the batch ends
    wait_for(client, batch.id, lambda b: b.request_counts is not None and b.request_counts.completed == 4)

    assert (["a", "c"], {"x-incomplete": "true", "x-last-line": "2"}) == read(client, planned)
    assert (["c"], {"x-incomplete": "true", "x-last-line": "2"}) == read(client, planned, offset=1)
    assert ([], {"x-incomplete": "true", "x-last-line": "2"}) == read(client, planned, offset=9)

    upstream.open_gate(tag)
    done = wait_terminal(client, batch.id)

    assert planned == done.output_file_id
    assert (["d", "e", "f"], {"x-incomplete": "false", "x-last-line": "5"}) == read(client, planned, offset=2)
    full, headers = read(client, planned)
    assert ["a", "c", "d", "e", "f"] == full
    assert "" == headers["x-incomplete"]  # a plain read of a finished file is as it always was


def test_a_batch_with_no_success_has_no_output_file_once_ended(server: Server) -> None:
    client = client_for(server)
    batch = start_batch(client, [chat_line("x", f"x {uuid.uuid4().hex} #bad400")])
    planned = raw_batch(client, batch.id)["backfill"]["output_file_id"]

    done = wait_terminal(client, batch.id)

    assert done.output_file_id is None
    assert raw_batch(client, batch.id)["backfill"]["output_file_id"] is None
    with pytest.raises(NotFoundError):
        client.files.content(planned)


def test_another_tenant_cannot_read_a_running_batch_s_output(start_server: StartServer, upstream: Upstream) -> None:
    server = start_server()
    mine, theirs = client_for(server, server.create_key("research")), client_for(server, server.create_key("ops"))
    tag = uuid.uuid4().hex[:8]
    batch = start_batch(mine, [chat_line("a", f"a {tag}"), chat_line("b", f"b {tag} #gate:{tag}")])
    planned = raw_batch(mine, batch.id)["backfill"]["output_file_id"]
    wait_for(mine, batch.id, lambda b: b.request_counts is not None and b.request_counts.completed == 1)

    with pytest.raises(NotFoundError):
        theirs.files.content(planned)
    assert ["a"] == read(mine, planned)[0]
    upstream.open_gate(tag)


def test_results_follow_writes_lines_as_they_settle_then_the_error_file(
    server: Server, upstream: Upstream, tmp_path: Path
) -> None:
    client = client_for(server)
    tag = uuid.uuid4().hex[:8]
    lines = [chat_line("a", f"a {tag}"), chat_line("b", f"b {tag} #bad400"), chat_line("c", f"c {tag} #gate:{tag}")]
    batch = start_batch(client, lines)
    output = tmp_path / "out.jsonl"
    command = [sys.executable, "-m", "backfill", "results", batch.id, "-o", str(output), "--follow",
               "--base-url", server.base_url]  # fmt: skip
    follower = subprocess.Popen(command, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (output.exists() and output.read_bytes().count(b"\n") == 1):  # "a", while "c" is held
            assert follower.poll() is None, follower.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        upstream.open_gate(tag)
        _, stderr = follower.communicate(timeout=60)
    finally:
        follower.kill()

    assert 0 == follower.returncode, stderr
    assert ["a", "c"] == [orjson.loads(line)["custom_id"] for line in output.read_bytes().splitlines()]
    done = client.batches.retrieve(batch.id)
    assert done.output_file_id is not None
    assert client.files.content(done.output_file_id).content == output.read_bytes()
    errors = tmp_path / "out.errors.jsonl"
    assert ["b"] == [orjson.loads(line)["custom_id"] for line in errors.read_bytes().splitlines()]


def test_output_file_id_at_start_announces_the_id_in_openai_s_field_too(
    start_server: StartServer, upstream: Upstream
) -> None:
    client = client_for(start_server(output_file_id_at_start=True))
    tag = uuid.uuid4().hex[:8]
    batch = start_batch(client, [chat_line("a", f"a {tag}"), chat_line("b", f"b {tag} #gate:{tag}")])
    running = wait_for(client, batch.id, lambda b: b.request_counts is not None and b.request_counts.completed == 1)

    assert running.output_file_id is not None
    assert running.output_file_id == raw_batch(client, batch.id)["backfill"]["output_file_id"]
    assert (["a"], {"x-incomplete": "true", "x-last-line": "1"}) == read(client, running.output_file_id)
    upstream.open_gate(tag)
    assert running.output_file_id == wait_terminal(client, batch.id).output_file_id
