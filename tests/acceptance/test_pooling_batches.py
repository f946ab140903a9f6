"""vLLM's pooling APIs as batch endpoints, through a real `backfill serve` driven by the openai SDK: classify lines
reach the engine (the simulator, `backfill sim serve`) many to a request and come back one by one, score lines that
share their query merge, rerank lines go one a request; a line the engine refuses fails alone, and a line without
what its endpoint needs is refused at validation with its own error."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from backfill.sim.tokens import count_text_tokens
from backfill.testing.pooling import class_probs, pair_score
from tests.acceptance.conftest import MODEL, StartServer
from tests.acceptance.helpers import Clients, read_jsonl, upload, wait_terminal
from tests.support.processes import Server, Upstream, sim_serving

SIM_MODEL = "pooling-sim"
PROFILE = f"""
model = "{SIM_MODEL}"
max_num_seqs = 64
iteration_base_s = 0.001
time_scale = 0.1
"""
LINES = 40


@pytest.fixture
def simulator(tmp_path: Path) -> Iterator[str]:
    with sim_serving(PROFILE, tmp_path) as url:
        yield url


def sim_backend(url: str) -> dict[str, Any]:
    return {"name": "sim", "url": f"{url}/v1", "models": [SIM_MODEL], "flavour": "vllm", "max_concurrency": 4,
            "max_inputs_per_request": 16}  # fmt: skip


def line(custom_id: str, url: str, **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": {"model": SIM_MODEL, **body}}


def run_batch(server: Server, lines: list[dict[str, Any]], endpoint: str) -> tuple[Any, dict[str, Any], list[Any]]:
    """The finished batch, its output lines by custom_id and its error lines."""
    with Clients() as clients:
        client: OpenAI = clients(server)
        batch = client.batches.create(
            input_file_id=upload(client, lines),
            endpoint=endpoint,  # type: ignore[arg-type] # vLLM's paths, not in the SDK's list: sent as given
            completion_window="24h",
        )
        done = wait_terminal(client, batch.id)
        output = read_jsonl(client, done.output_file_id) if done.output_file_id else []
        errors = read_jsonl(client, done.error_file_id) if done.error_file_id else []
    return done, {item["custom_id"]: item for item in output}, errors


def sim_requests(url: str, path: str) -> int:
    log = httpx.get(f"{url}/_stats", timeout=10).json()["log"]
    return sum(1 for entry in log if entry["path"] == path and entry["status"] == 200)


def test_classify_lines_reach_the_engine_together_and_come_back_one_by_one(
    start_server: StartServer, simulator: str
) -> None:
    server = start_server(backends=[sim_backend(simulator)])
    texts: dict[str, str | list[str]] = {f"c-{i}": f"review number {i} " + "fine " * (i % 5) for i in range(LINES)}
    texts["c-pair"] = ["first of two", "second of two"]
    lines = [line(custom_id, "/classify", input=text) for custom_id, text in texts.items()]

    done, by_id, errors = run_batch(server, lines, "/classify")

    assert ("completed", []) == (done.status, errors)
    assert sorted(texts) == sorted(by_id)
    assert sim_requests(simulator, "/classify") < LINES / 4
    for custom_id, text in texts.items():
        items = text if isinstance(text, list) else [text]
        body = by_id[custom_id]["response"]["body"]
        assert 200 == by_id[custom_id]["response"]["status_code"]
        assert [(i, class_probs(item), 2) for i, item in enumerate(items)] == [
            (entry["index"], entry["probs"], entry["num_classes"]) for entry in body["data"]
        ]
    usages = [item["response"]["body"]["usage"]["prompt_tokens"] for item in by_id.values()]
    engine_tokens = sum(
        count_text_tokens(item, 4) for text in texts.values() for item in (text if isinstance(text, list) else [text])
    )
    assert all(tokens > 0 for tokens in usages)
    assert engine_tokens == sum(usages)  # shared out, none lost or made up
    assert done.usage is not None
    assert engine_tokens == done.usage.input_tokens


def test_score_lines_sharing_a_query_merge_and_rerank_lines_go_one_a_request(
    start_server: StartServer, simulator: str
) -> None:
    server = start_server(backends=[sim_backend(simulator)])
    queries = ("what is a kettle", "where do teapots come from")
    pairs = {
        f"s-{q}-{d}": (query, f"document {d} about {query[-6:]}") for q, query in enumerate(queries) for d in range(10)
    }
    score_lines = [line(custom_id, "/v1/score", text_1=a, text_2=b) for custom_id, (a, b) in pairs.items()]

    done, by_id, errors = run_batch(server, score_lines, "/v1/score")

    assert ("completed", []) == (done.status, errors)
    assert sim_requests(simulator, "/v1/score") < len(pairs) / 4  # lines of one query go together
    for custom_id, (a, b) in pairs.items():
        assert [{"index": 0, "object": "score", "score": pair_score(a, b)}] == by_id[custom_id]["response"]["body"][
            "data"
        ]

    documents = ["a kettle boils water", "a teapot steeps tea", "a cup holds it"]
    rerank_lines = [
        line(f"r-{n}", "/rerank", query=query, documents=documents, top_n=2) for n, query in enumerate(queries)
    ]
    done, by_id, errors = run_batch(server, rerank_lines, "/rerank")

    assert ("completed", []) == (done.status, errors)
    assert 2 == sim_requests(simulator, "/rerank")
    for n, query in enumerate(queries):
        expected = sorted(range(3), key=lambda i: -pair_score(query, documents[i]))[:2]
        assert expected == [result["index"] for result in by_id[f"r-{n}"]["response"]["body"]["results"]]


def test_a_classify_line_the_engine_refuses_fails_alone(start_server: StartServer, upstream: Upstream) -> None:
    server = start_server()
    lines = [
        {"custom_id": f"c-{i}", "method": "POST", "url": "/classify", "body": {"model": MODEL, "input": f"text {i}"}}
        for i in range(8)
    ]
    lines[3]["body"]["input"] = "this one #bad400"

    done, by_id, errors = run_batch(server, lines, "/classify")

    assert "completed" == done.status
    assert (["c-3"], 400) == ([item["custom_id"] for item in errors], errors[0]["response"]["status_code"])
    assert 7 == len(by_id)
    assert class_probs("text 7") == by_id["c-7"]["response"]["body"]["data"][0]["probs"]


def test_a_pooling_line_without_its_inputs_is_refused_with_its_own_error(start_server: StartServer) -> None:
    server = start_server()
    lines = [
        {"custom_id": "ok", "method": "POST", "url": "/classify", "body": {"model": MODEL, "input": "fine"}},
        {"custom_id": "none", "method": "POST", "url": "/classify", "body": {"model": MODEL}},
        {"custom_id": "num", "method": "POST", "url": "/classify", "body": {"model": MODEL, "input": 7}},
    ]

    done, _, _ = run_batch(server, lines, "/classify")

    assert "failed" == done.status
    assert done.errors is not None
    assert [
        ("invalid_request", 2, "body.input", "Input parameter is required."),
        (
            "invalid_request",
            3,
            "body.input",
            "Invalid 'body.input': expected a string or an array, but got an integer instead.",
        ),
    ] == [(error.code, error.line, error.param, error.message) for error in done.errors.data]
