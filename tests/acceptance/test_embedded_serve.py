"""Zero config: `backfill serve` with no backend runs chat and embeddings batches on the embedded CPU engine."""

from __future__ import annotations

import math
from pathlib import Path

import orjson
import pytest

from backfill.backends.embedded.backend import is_available
from tests.acceptance.conftest import StartServer, client_for
from tests.acceptance.helpers import upload, wait_terminal

pytestmark = pytest.mark.skipif(not is_available(), reason="needs backfill[local] (llama-cpp-python, models)")

PARAPHRASES = ["The cat sat on the mat.", "A cat was sitting on the rug.", "Quarterly revenue grew by four percent."]


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / (
        math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    )


def test_chat_and_embeddings_batches_run_on_the_embedded_engine(start_server: StartServer) -> None:
    server = start_server(backends=[])
    client = client_for(server)
    chat_lines = [
        {
            "custom_id": f"review-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "smollm2-135m-instruct",
                "max_tokens": 8,
                "temperature": 0,
                "messages": [
                    {"role": "system", "content": "Answer with one word: positive or negative."},
                    {"role": "user", "content": text},
                ],
            },
        }
        for i, text in enumerate(["I love this lamp, it is great.", "It broke after one day. Awful.", "Works fine."])
    ]
    embedding_lines = [
        {"custom_id": f"emb-{i}", "method": "POST", "url": "/v1/embeddings",
         "body": {"model": "all-minilm-l6-v2", "input": text}}
        for i, text in enumerate(PARAPHRASES)
    ]  # fmt: skip

    chat = client.batches.create(
        input_file_id=upload(client, chat_lines), endpoint="/v1/chat/completions", completion_window="24h"
    )
    embed = client.batches.create(
        input_file_id=upload(client, embedding_lines), endpoint="/v1/embeddings", completion_window="24h"
    )
    chat_done, embed_done = wait_terminal(client, chat.id, 180), wait_terminal(client, embed.id, 180)

    assert ("completed", 3, 0) == (
        chat_done.status,
        chat_done.request_counts.completed,
        chat_done.request_counts.failed,
    )
    assert chat_done.usage is not None
    assert chat_done.usage.input_tokens > 0
    assert chat_done.usage.output_tokens > 0
    assert chat_done.output_file_id is not None
    replies = [orjson.loads(line) for line in client.files.content(chat_done.output_file_id).text.splitlines()]
    assert all(r["response"]["body"]["choices"][0]["message"]["content"].strip() for r in replies)
    assert "smollm2-135m-instruct" == chat_done.model

    assert ("completed", 3) == (embed_done.status, embed_done.request_counts.completed)
    assert embed_done.output_file_id is not None
    results = [orjson.loads(line) for line in client.files.content(embed_done.output_file_id).text.splitlines()]
    vectors = [r["response"]["body"]["data"][0]["embedding"] for r in results]
    assert [384, 384, 384] == [len(v) for v in vectors]
    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2])
    loading = [line for line in server.log_text().splitlines() if '"event": "model.load' in line]
    assert ["model.loading", "model.loaded"] == [orjson.loads(line)["event"] for line in loading]
    assert {"smollm2-135m-instruct"} == {orjson.loads(line)["model"] for line in loading}
    assert orjson.loads(loading[1])["seconds"] > 0


EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the engine is what is tested here
def test_the_demo_review_batch_answers_every_review_with_one_of_its_schema_labels(start_server: StartServer) -> None:
    server = start_server(backends=[])
    client = client_for(server)
    source = EXAMPLES / "reviews.jsonl"
    truth = orjson.loads((EXAMPLES / "reviews.labels.json").read_bytes())
    with source.open("rb") as lines:
        uploaded = client.files.create(file=lines, purpose="batch")

    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    done = wait_terminal(client, batch.id, 900)

    assert ("completed", len(truth), 0) == (done.status, done.request_counts.completed, done.request_counts.failed)
    assert done.output_file_id is not None
    results = [orjson.loads(line) for line in client.files.content(done.output_file_id).text.splitlines()]
    answers = [orjson.loads(r["response"]["body"]["choices"][0]["message"]["content"]) for r in results]
    assert all(set(answer) == {"label"} for answer in answers)
    assert all(answer["label"] in ("positive", "negative") for answer in answers)
    right = sum(answer["label"] == truth[r["custom_id"]] for answer, r in zip(answers, results, strict=True))
    assert right / len(truth) > 0.5, f"accuracy {right}/{len(truth)}: no better than a coin"  # BENCHMARKS.md
