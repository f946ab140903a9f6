"""Embeddings lines through a real `backfill serve`, driven by the openai SDK: the upstream sees few array requests,
each line gets its own vector and its share of the usage, and a line the upstream refuses fails alone."""

from __future__ import annotations

import zlib
from collections.abc import Iterator

import orjson
import pytest

from tests.acceptance.conftest import MODEL, StartServer
from tests.acceptance.helpers import Clients, read_jsonl, upload, wait_terminal
from tests.support.processes import Upstream

LINES = 60


@pytest.fixture
def own_upstream() -> Iterator[Upstream]:
    """An upstream of this test's own: its counts are this test's alone."""
    server = Upstream.start()
    yield server
    server.stop()


def embedding_line(custom_id: str, text: str | list[str]) -> dict[str, object]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings", "body": {"model": MODEL, "input": text}}


def expected_vector(item: object) -> list[float]:
    """What the test upstream answers for one input (backfill/testing/upstream.py)."""
    checksum = zlib.crc32(orjson.dumps(item))
    return [((checksum >> (4 * i)) & 0xF) / 7.5 - 1.0 for i in range(8)]


def test_embeddings_lines_go_upstream_together_and_come_back_one_by_one(
    start_server: StartServer, own_upstream: Upstream
) -> None:
    backend = {"name": "up", "url": own_upstream.url, "models": [MODEL], "max_concurrency": 4}
    server = start_server(backends=[{**backend, "max_inputs_per_request": 16}])
    texts = {f"e-{i}": f"text number {i} " + "word " * (i % 7) for i in range(LINES)}
    texts["e-bad"] = "this one #bad400"
    lines = [embedding_line(custom_id, text) for custom_id, text in texts.items()]
    lines.append(embedding_line("e-pair", ["first of two", "second of two"]))
    with Clients() as clients:
        client = clients(server)
        batch = client.batches.create(
            input_file_id=upload(client, lines), endpoint="/v1/embeddings", completion_window="24h"
        )
        done = wait_terminal(client, batch.id)
        assert "completed" == done.status
        assert done.output_file_id is not None
        assert done.error_file_id is not None
        output = read_jsonl(client, done.output_file_id)
        errors = read_jsonl(client, done.error_file_id)

    stats = own_upstream.stats()["answered"]["/v1/embeddings"]
    by_id = {line["custom_id"]: line for line in output}
    assert sorted([*texts, "e-pair"]) == sorted([*by_id, *(line["custom_id"] for line in errors)])
    assert ["e-bad"] == [line["custom_id"] for line in errors]
    assert 400 == errors[0]["response"]["status_code"]
    assert LINES + 1 == len(by_id)
    assert stats["requests"] < LINES / 4  # few array requests (bisecting the refused one included)
    for custom_id, text in texts.items():
        if custom_id == "e-bad":
            continue
        data = by_id[custom_id]["response"]["body"]["data"]
        assert [(0, expected_vector(text))] == [(item["index"], item["embedding"]) for item in data]
    pair = by_id["e-pair"]["response"]["body"]["data"]
    assert [0, 1] == [item["index"] for item in pair]
    assert [expected_vector("first of two"), expected_vector("second of two")] == [item["embedding"] for item in pair]
    usages = [line["response"]["body"]["usage"] for line in output]
    assert all(usage["prompt_tokens"] == usage["total_tokens"] > 0 for usage in usages)
    assert stats["prompt_tokens"] == sum(usage["prompt_tokens"] for usage in usages)
    assert done.usage is not None
    assert stats["prompt_tokens"] == done.usage.input_tokens
