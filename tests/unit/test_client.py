"""BackfillClient over a mock transport: requests it sends, errors as one line, streamed downloads; its settings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from backfill.client import BackfillClient
from backfill.config import load_client_settings
from backfill.domain.batches import BatchStatus
from backfill.errors import ConfigError, ServerRejected, ServerUnreachable
from backfill.result_files import default_errors_path

BASE = "http://backfill.test"


def batch_json(batch_id: str = "batch_1", status: str = "in_progress", **extra: Any) -> dict[str, Any]:
    return {
        "id": batch_id,
        "object": "batch",
        "endpoint": "/v1/chat/completions",
        "model": "m",
        "completion_window": "24h",
        "input_file_id": "file-in",
        "output_file_id": None,
        "error_file_id": None,
        "status": status,
        "created_at": 1000,
        "in_progress_at": 1001,
        "completed_at": None,
        "expires_at": 1000 + 86400,
        "request_counts": {"total": 10, "completed": 4, "failed": 1},
        "usage": {"input_tokens": 50, "output_tokens": 20, "total_tokens": 70},
        "errors": None,
        "metadata": None,
        **extra,
    }


def client_with(handler: Any, api_key: str | None = None) -> BackfillClient:
    return BackfillClient(BASE, api_key, transport=httpx.MockTransport(handler))


def test_requests_carry_the_key_and_batches_are_parsed() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=batch_json(metadata={"job": "x"}))

    with client_with(handler, api_key="sk-test") as client:
        batch = client.get_batch("batch_1")

    assert "Bearer sk-test" == seen[0].headers["authorization"]
    assert "/v1/batches/batch_1" == seen[0].url.path
    assert (BatchStatus.IN_PROGRESS, 10, 4, 1, 20) == (
        batch.status,
        batch.total,
        batch.completed,
        batch.failed,
        batch.output_tokens,
    )
    assert {"created_at": 1000, "in_progress_at": 1001, "expires_at": 87400} == batch.times
    assert {"job": "x"} == batch.metadata


def test_no_authorization_header_without_a_key() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=batch_json())

    with client_with(handler) as client:
        client.get_batch("batch_1")

    assert "authorization" not in seen[0].headers


def test_upload_then_create_sends_a_multipart_file_and_the_batch_request(tmp_path: Path) -> None:
    bodies: list[tuple[str, bytes]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append((request.url.path, request.read()))
        if request.url.path == "/v1/files":
            return httpx.Response(200, json={"id": "file-abc", "object": "file"})
        return httpx.Response(200, json=batch_json(status="validating"))

    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"custom_id": "a"}\n')
    with client_with(handler) as client:
        batch = client.create_batch(client.upload(path), "/v1/embeddings", "1h", {"k": "v"})

    (files_path, upload), (batches_path, create) = bodies
    assert ("/v1/files", "/v1/batches") == (files_path, batches_path)
    assert b'filename="in.jsonl"' in upload
    assert b'{"custom_id": "a"}' in upload
    assert b'name="purpose"\r\n\r\nbatch' in upload
    expected = {
        "input_file_id": "file-abc",
        "endpoint": "/v1/embeddings",
        "completion_window": "1h",
        "metadata": {"k": "v"},
    }
    assert expected == json.loads(create)
    assert BatchStatus.VALIDATING == batch.status


def test_error_envelope_becomes_a_one_line_message() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        error = {"message": "No such Batch object: batch_x", "type": "invalid_request_error", "param": None}
        return httpx.Response(404, json={"error": error})

    with client_with(handler) as client, pytest.raises(ServerRejected) as caught:
        client.get_batch("batch_x")

    assert "No such Batch object: batch_x (HTTP 404)" == caught.value.message
    assert 404 == caught.value.status_code


def test_an_error_that_is_not_an_envelope_is_shown_shortened() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(502, text="<html>\n  Bad   gateway\n</html>")

    with client_with(handler) as client, pytest.raises(ServerRejected) as caught:
        client.cancel_batch("batch_x")

    assert "<html> Bad gateway </html> (HTTP 502)" == caught.value.message


def test_connection_refused_says_where_and_what_to_do() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused")

    with client_with(handler) as client, pytest.raises(ServerUnreachable) as caught:
        client.list_batches()

    assert caught.value.message.startswith(f"cannot connect to the backfill server at {BASE} (connection refused)")
    assert "--base-url" in caught.value.message


def test_list_follows_pages_up_to_the_limit() -> None:
    pages = {None: (["b1", "b2"], True), "b2": (["b3", "b4"], True), "b4": (["b5"], False)}
    limits: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        limits.append(request.url.params.get("limit"))
        ids, has_more = pages[request.url.params.get("after")]
        data = [batch_json(batch_id) for batch_id in ids]
        return httpx.Response(200, json={"object": "list", "data": data, "last_id": ids[-1], "has_more": has_more})

    with client_with(handler) as client:
        assert ["b1", "b2", "b3", "b4", "b5"] == [batch.id for batch in client.list_batches(limit=10)]
        assert ["b1", "b2", "b3"] == [batch.id for batch in client.list_batches(limit=3)]
    assert ["10", "8", "6", "3", "1"] == limits


def test_download_streams_to_the_file_and_a_failed_one_leaves_no_file(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/files/file-out/content":
            return httpx.Response(200, content=b'{"a": 1}\n{"b": 2}\n')
        return httpx.Response(404, json={"error": {"message": "No such File object: file-gone"}})

    with client_with(handler) as client:
        assert 18 == client.download("file-out", tmp_path / "out.jsonl")
        with pytest.raises(ServerRejected):
            client.download("file-gone", tmp_path / "gone.jsonl")

    assert b'{"a": 1}\n{"b": 2}\n' == (tmp_path / "out.jsonl").read_bytes()
    assert ["out.jsonl"] == sorted(path.name for path in tmp_path.iterdir())


def test_client_settings_default_environment_and_options(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ("http://127.0.0.1:8080", None) == tuple(load_client_settings().model_dump().values())

    monkeypatch.setenv("BACKFILL_BASE_URL", "http://batch.internal:9000/v1/")
    monkeypatch.setenv("BACKFILL_API_KEY", "sk-env")
    from_env = load_client_settings()
    assert ("http://batch.internal:9000", "sk-env") == (from_env.base_url, from_env.api_key)

    explicit = load_client_settings(base_url="https://other:1", api_key="sk-option")
    assert ("https://other:1", "sk-option") == (explicit.base_url, explicit.api_key)


def test_client_settings_refuse_a_base_url_without_scheme() -> None:
    with pytest.raises(ConfigError, match="must start with http"):
        load_client_settings(base_url="localhost:8080")


@pytest.mark.parametrize(
    ("output", "errors"),
    [("out/results.jsonl", "out/results.errors.jsonl"), ("results.txt", "results.txt.errors.jsonl")],
)
def test_default_errors_path(output: str, errors: str) -> None:
    assert Path(errors) == default_errors_path(Path(output))


@pytest.mark.parametrize(
    ("schedule", "shown"),
    [
        ("harvesting", "harvesting: running in the capacity interactive traffic leaves"),
        ("throttled", "throttled: interactive traffic needs the servers now"),
        ("promoted", "promoted: running ahead of other work to make its window"),
    ],
)
def test_status_says_how_the_scheduler_sees_a_running_batch(schedule: str, shown: str) -> None:
    from rich.console import Console

    from backfill.cli_client import _summary
    from backfill.client import RemoteBatch

    extra = {"backfill": {"estimated_completion_at": 1_600, "schedule": schedule}}
    batch = RemoteBatch.from_json(batch_json(**extra))
    console = Console(width=200, record=True)
    console.print(_summary(batch, 1_000.0))
    assert shown in console.export_text()


def message_batch_json(batch_id: str = "msgbatch_1", status: str = "in_progress", **extra: Any) -> dict[str, Any]:
    return {
        "id": batch_id,
        "type": "message_batch",
        "processing_status": status,
        "request_counts": {"processing": 0, "succeeded": 3, "errored": 1, "canceled": 2, "expired": 0},
        "created_at": "1970-01-01T00:16:40Z",
        "expires_at": "1970-01-02T00:16:40Z",
        "ended_at": None,
        "cancel_initiated_at": None,
        "archived_at": None,
        "results_url": None,
        **extra,
    }


def test_message_batches_are_asked_for_under_messages_and_read_as_batches() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.method} {request.url.path}")
        ended = {"ended_at": "1970-01-01T00:20:00Z", "cancel_initiated_at": "1970-01-01T00:18:00Z"}
        return httpx.Response(200, json=message_batch_json(status="ended", **ended))

    with client_with(handler) as client:
        batch = client.get_batch("msgbatch_1")
        client.cancel_batch("msgbatch_1")

    assert ["GET /v1/messages/batches/msgbatch_1", "POST /v1/messages/batches/msgbatch_1/cancel"] == seen
    assert (BatchStatus.CANCELLED, 6, 3, 3, 1, 2, 0) == (
        batch.status,
        batch.total,
        batch.completed,
        batch.failed,
        batch.errored,
        batch.cancelled,
        batch.expired,
    )
    assert {"created_at": 1000, "expires_at": 87400, "cancelling_at": 1080, "cancelled_at": 1200} == batch.times


def test_list_merges_both_kinds_newest_first() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/messages/batches":
            data = [message_batch_json("msgbatch_new", created_at="1970-01-01T00:33:20Z")]
            return httpx.Response(200, json={"data": data, "has_more": False, "first_id": None, "last_id": None})
        data = [batch_json("batch_mid", created_at=1500), batch_json("batch_old", created_at=1000)]
        return httpx.Response(200, json={"object": "list", "data": data, "has_more": False})

    with client_with(handler) as client:
        listed = client.list_all(2)

    assert ["msgbatch_new", "batch_mid"] == [batch.id for batch in listed]


def test_lines_that_did_not_run_are_said_apart_from_failed_ones() -> None:
    from rich.console import Console

    from backfill.cli_client import _summary
    from backfill.client import RemoteBatch

    extension = {"estimated_completion_at": None, "schedule": None, "request_counts": {"expired": 2, "cancelled": 5}}
    counts = {"total": 10, "completed": 2, "failed": 8}
    batch = RemoteBatch.from_json(batch_json(status="cancelled", request_counts=counts, backfill=extension))
    console = Console(width=200, record=True)
    console.print(_summary(batch, 1_000.0))

    assert "10 total · 2 succeeded · 1 failed · 2 expired · 5 cancelled" in console.export_text()


def test_a_batch_waiting_for_its_model_to_load_says_so() -> None:
    from rich.console import Console

    from backfill.cli_client import _summary, snapshot_of
    from backfill.client import RemoteBatch
    from backfill.progress import RateMeter, describe

    note = "loading model smollm2-135m-instruct since 2026-12-04T05:00:00Z"
    extension = {"estimated_completion_at": None, "schedule": "loading_model", "waiting": note}
    batch = RemoteBatch.from_json(batch_json(backfill=extension))
    console = Console(width=200, record=True)
    console.print(_summary(batch, 1_000.0))

    assert note in console.export_text()
    assert "5/10 done · 1 failed · loading model" == describe(snapshot_of(batch), RateMeter())
