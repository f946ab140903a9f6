"""Gemini Batch API end to end (docs/gemini.md): the google-genai SDK, unchanged, against a real `backfill serve`
whose requests the fake OpenAI upstream runs, through the same store and dispatcher as the other two APIs."""

from __future__ import annotations

import math
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from google import genai
from google.genai import errors, types

from backfill.backends.embedded.backend import is_available
from tests.acceptance.conftest import MODEL, StartServer
from tests.support.processes import Server, Upstream, child_env

ENDED = {"JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_EXPIRED"}
_OPENED: list[genai.Client] = []


def gemini_client(server: Server, api_key: str = "open-mode", version: str = "v1beta") -> genai.Client:
    client = genai.Client(
        api_key=api_key,
        http_options=types.HttpOptions(base_url=f"{server.base_url}/gemini", api_version=version, timeout=60_000),
    )
    _OPENED.append(client)
    return client


@pytest.fixture(autouse=True)
def _close_gemini_clients() -> Iterator[None]:
    yield
    while _OPENED:
        _OPENED.pop().close()


@pytest.fixture(scope="module")
def server(start_module_server: StartServer) -> Server:
    return start_module_server()


def reply_to(text: str) -> str:
    """What the fake upstream answers."""
    return f"This is a fake reply to {len(text.split())} words."


def ask(text: str, **config: Any) -> dict[str, Any]:
    """An inlined request as the SDK takes it (snake_case)."""
    request: dict[str, Any] = {"contents": [{"role": "user", "parts": [{"text": text}]}]}
    if config:
        request["config"] = config
    return request


def wait_ended(client: genai.Client, name: str, timeout_s: float = 120) -> types.BatchJob:
    """Poll as a client does; the batch's state decides, not a timer (the timeout only bounds a hang)."""
    deadline = time.monotonic() + timeout_s
    while True:
        job = client.batches.get(name=name)
        if job.state is not None and job.state.value in ENDED:
            return job
        assert time.monotonic() < deadline, f"{name} still {job.state} after {timeout_s} s"
        time.sleep(0.1)


def texts_of(job: types.BatchJob) -> list[str | None]:
    assert job.dest is not None
    assert job.dest.inlined_responses is not None
    return [item.response.text if item.response is not None else None for item in job.dest.inlined_responses]


@pytest.mark.parametrize("version", ["v1beta", "v1"])
def test_an_inline_batch_runs_and_answers_each_request_in_order_with_its_metadata(server: Server, version: str) -> None:
    client = gemini_client(server, version=version)
    tag = uuid.uuid4().hex[:8]
    texts = [f"inline {tag} number {i}" + " word" * i for i in range(4)]
    requests = [
        {**ask(text, temperature=0.0, max_output_tokens=20), "metadata": {"n": str(i)}} for i, text in enumerate(texts)
    ]

    job = client.batches.create(model=MODEL, src=requests, config={"display_name": f"inline-{tag}"})

    assert job.name is not None
    assert job.name.startswith("batches/")
    assert job.display_name == f"inline-{tag}"
    assert job.model == f"models/{MODEL}"
    assert job.state is not None
    assert job.state.value in {"JOB_STATE_PENDING", "JOB_STATE_RUNNING"}
    ended = wait_ended(client, job.name)
    assert ended.state is not None
    assert ended.state.value == "JOB_STATE_SUCCEEDED"
    assert ended.end_time is not None
    assert [reply_to(text) for text in texts] == texts_of(ended)
    assert ended.dest is not None
    assert ended.dest.inlined_responses is not None
    assert [{"n": str(i)} for i in range(4)] == [item.metadata for item in ended.dest.inlined_responses]
    first = ended.dest.inlined_responses[0].response
    assert first is not None
    assert first.candidates is not None
    assert first.candidates[0].finish_reason == types.FinishReason.STOP
    assert first.usage_metadata is not None
    assert first.usage_metadata.prompt_token_count
    assert first.usage_metadata.candidates_token_count
    assert job.name in [listed.name for listed in client.batches.list(config={"page_size": 2})]


def test_a_file_batch_runs_and_its_responses_file_holds_every_key_in_input_order(
    server: Server, tmp_path: Path
) -> None:
    client = gemini_client(server)
    tag = uuid.uuid4().hex[:8]
    lines = [
        # camelCase, as Google's docs write them, and snake_case, as Python users do
        {"key": f"k-{i}", "request": {"contents": [{"parts": [{"text": f"file {tag} {i}"}]}],
                                      "generationConfig": {"maxOutputTokens": 16}}}
        if i % 2 == 0
        else {"key": f"k-{i}", "request": {"contents": [{"role": "user", "parts": [{"text": f"file {tag} {i} x"}]}],
                                           "generation_config": {"max_output_tokens": 16}}}
        for i in range(6)
    ]  # fmt: skip
    path = tmp_path / "requests.jsonl"
    path.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))

    uploaded = client.files.upload(file=path, config={"display_name": f"requests-{tag}", "mime_type": "jsonl"})
    assert uploaded.name is not None
    assert uploaded.size_bytes == path.stat().st_size
    assert client.files.get(name=uploaded.name).size_bytes == path.stat().st_size
    assert uploaded.name in [listed.name for listed in client.files.list(config={"page_size": 2})]
    job = client.batches.create(model=f"models/{MODEL}", src=uploaded.name)
    assert job.name is not None
    ended = wait_ended(client, job.name)

    assert ended.state is not None
    assert ended.state.value == "JOB_STATE_SUCCEEDED"
    assert ended.dest is not None
    assert ended.dest.file_name is not None
    content = client.files.download(file=ended.dest.file_name)
    answers = [orjson.loads(line) for line in content.splitlines()]
    assert [f"k-{i}" for i in range(6)] == [answer["key"] for answer in answers]
    expected = [reply_to(f"file {tag} {i}" + ("" if i % 2 == 0 else " x")) for i in range(6)]
    assert expected == [answer["response"]["candidates"][0]["content"]["parts"][0]["text"] for answer in answers]


def test_a_request_that_cannot_run_gets_its_own_error_and_the_others_run(server: Server) -> None:
    client = gemini_client(server)
    tag = uuid.uuid4().hex[:8]
    requests = [
        ask(f"fine {tag} one"),
        ask(f"two candidates {tag}", candidate_count=2),
        {"contents": [{"role": "user", "parts": [{"inline_data": {"mime_type": "image/png", "data": "AAAA"}}]}]},
        ask(f"fine {tag} four #bad400"),
        ask(f"fine {tag} five"),
    ]

    ended = wait_ended(client, client.batches.create(model=MODEL, src=requests).name or "")

    assert ended.state is not None
    assert ended.state.value == "JOB_STATE_SUCCEEDED"
    assert ended.dest is not None
    assert ended.dest.inlined_responses is not None
    items = ended.dest.inlined_responses
    assert [reply_to(f"fine {tag} one"), None, None, None, reply_to(f"fine {tag} five")] == texts_of(ended)
    assert items[1].error is not None
    assert "candidateCount" in (items[1].error.message or "")
    assert items[2].error is not None
    assert "only text parts" in (items[2].error.message or "")
    assert items[3].error is not None
    assert items[3].error.code == 3  # INVALID_ARGUMENT: the backend's 400
    assert "400" in (items[3].error.message or "")


def test_cancel_mid_batch_ends_it_cancelled_with_the_finished_requests_kept(server: Server, upstream: Upstream) -> None:
    client = gemini_client(server)
    tag = uuid.uuid4().hex[:8]
    requests = [ask(f"quick {tag} {i}") for i in range(2)] + [ask(f"held {tag} {i} #gate:{tag}") for i in range(2)]
    job = client.batches.create(model=MODEL, src=requests)
    assert job.name is not None
    deadline = time.monotonic() + 60
    while httpx.get(f"{upstream.url}/_gates/{tag}", timeout=10).json()["waiting"] < 2:  # both held, in flight
        assert time.monotonic() < deadline
        time.sleep(0.05)

    client.batches.cancel(name=job.name)
    upstream.open_gate(tag)  # after the cancel's grace period the held ones are cut off anyway
    ended = wait_ended(client, job.name)

    assert ended.state is not None
    assert ended.state.value == "JOB_STATE_CANCELLED"
    assert ended.dest is not None
    assert ended.dest.inlined_responses is not None
    assert [reply_to(f"quick {tag} {i}") for i in range(2)] == texts_of(ended)[:2]


def test_errors_are_googles_and_a_batch_is_deleted_once_ended(server: Server) -> None:
    client = gemini_client(server)
    with pytest.raises(errors.ClientError) as missing:
        client.batches.get(name="batches/batch_0000")
    assert (404, "NOT_FOUND") == (missing.value.code, missing.value.status)
    with pytest.raises(errors.ClientError) as unknown_model:
        client.batches.create(model="no-such-model", src=[ask("hello")])
    assert 404 == unknown_model.value.code
    assert MODEL in (unknown_model.value.message or "")
    with pytest.raises(errors.ClientError) as empty:
        client.batches.create(model=MODEL, src=[])
    assert (400, "INVALID_ARGUMENT") == (empty.value.code, empty.value.status)

    name = client.batches.create(model=MODEL, src=[ask("delete me")]).name or ""
    wait_ended(client, name)
    client.batches.delete(name=name)
    with pytest.raises(errors.ClientError) as gone:
        client.batches.get(name=name)
    assert 404 == gone.value.code


def test_another_tenants_batch_is_not_found(start_server: StartServer) -> None:
    server = start_server()
    mine, theirs = server.create_key("research"), server.create_key("ops")
    name = gemini_client(server, mine).batches.create(model=MODEL, src=[ask("private")]).name or ""

    with pytest.raises(errors.ClientError) as hidden:
        gemini_client(server, theirs).batches.get(name=name)
    assert 404 == hidden.value.code
    assert name not in [job.name for job in gemini_client(server, theirs).batches.list()]
    with pytest.raises(errors.ClientError) as no_key:
        gemini_client(server, "not-a-key").batches.get(name=name)
    assert 401 == no_key.value.code
    assert wait_ended(gemini_client(server, mine), name).state == types.JobState.JOB_STATE_SUCCEEDED


def test_kill_9_mid_batch_loses_nothing(start_server: StartServer, upstream: Upstream) -> None:
    server = start_server()
    tag = uuid.uuid4().hex[:8]
    requests = [ask(f"crash {tag} {i}") for i in range(20)] + [ask(f"crash {tag} held #gate:{tag}")]
    name = gemini_client(server).batches.create(model=MODEL, src=requests).name or ""
    deadline = time.monotonic() + 60
    while httpx.get(f"{upstream.url}/_gates/{tag}", timeout=10).json()["waiting"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)

    server.kill9()
    upstream.open_gate(tag)
    server.start()
    ended = wait_ended(gemini_client(server), name)

    assert ended.state is not None
    assert ended.state.value == "JOB_STATE_SUCCEEDED"
    expected = [reply_to(f"crash {tag} {i}") for i in range(20)] + [reply_to(f"crash {tag} held #gate:{tag}")]
    assert expected == texts_of(ended)


# The SDK marks create_embeddings experimental with a warning, which the suite's settings turn into an error.
@pytest.mark.filterwarnings("ignore::google.genai._common.ExperimentalWarning")
def test_an_embeddings_batch_answers_one_vector_per_content_in_order(server: Server, upstream: Upstream) -> None:
    client = gemini_client(server)
    tag = uuid.uuid4().hex[:8]
    texts = [f"embed {tag} {i}" for i in range(5)]

    job = client.batches.create_embeddings(
        model=MODEL, src={"inlined_requests": {"contents": texts}}, config={"display_name": f"embed-{tag}"}
    )
    assert job.name is not None
    ended = wait_ended(client, job.name)

    assert ended.state is not None
    assert ended.state.value == "JOB_STATE_SUCCEEDED"
    assert ended.dest is not None
    assert ended.dest.inlined_embed_content_responses is not None
    vectors = [item.response.embedding.values for item in ended.dest.inlined_embed_content_responses]  # type: ignore[union-attr]
    direct = httpx.post(f"{upstream.url}/v1/embeddings", json={"model": MODEL, "input": texts}, timeout=10).json()
    assert [row["embedding"] for row in direct["data"]] == vectors
    refused = client.batches.create_embeddings(
        model=MODEL, src={"inlined_requests": {"contents": texts[:1], "config": {"task_type": "CLUSTERING"}}}
    )
    answers = wait_ended(client, refused.name or "").dest
    assert answers is not None
    assert answers.inlined_embed_content_responses is not None
    error = answers.inlined_embed_content_responses[0].error
    assert error is not None
    assert "taskType" in (error.message or "")


@pytest.mark.filterwarnings("ignore::google.genai._common.ExperimentalWarning")
@pytest.mark.skipif(not is_available(), reason="needs backfill[local] (llama-cpp-python, models)")
def test_the_embedded_engine_answers_a_gemini_batch_held_to_its_schema_and_embeds_text(
    start_server: StartServer,
) -> None:
    client = gemini_client(start_server(backends=[]))
    schema = {"type": "OBJECT", "properties": {"label": {"type": "STRING", "enum": ["positive", "negative"]}},
              "required": ["label"]}  # fmt: skip
    config = {"temperature": 0, "max_output_tokens": 24, "response_mime_type": "application/json",
              "response_schema": schema, "system_instruction": "Label the review: positive or negative."}  # fmt: skip
    reviews = ["I love this lamp, it is great.", "It broke after one day. Awful.", "Works fine."]
    paraphrases = [
        "The cat sat on the mat.",
        "A cat was sitting on the rug.",
        "Quarterly revenue grew by four percent.",
    ]

    chat = client.batches.create(model="smollm2-135m-instruct", src=[ask(text, **config) for text in reviews])
    embed = client.batches.create_embeddings(
        model="all-minilm-l6-v2", src={"inlined_requests": {"contents": paraphrases}}
    )
    chat_done, embed_done = wait_ended(client, chat.name or "", 300), wait_ended(client, embed.name or "", 300)

    labels = [orjson.loads(text or "")["label"] for text in texts_of(chat_done)]
    assert set(labels) <= {"positive", "negative"}
    assert len(labels) == len(reviews)
    assert embed_done.dest is not None
    assert embed_done.dest.inlined_embed_content_responses is not None
    cat, rug, revenue = (
        item.response.embedding.values  # type: ignore[union-attr]
        for item in embed_done.dest.inlined_embed_content_responses
    )
    assert cosine(cat or [], rug or []) > cosine(cat or [], revenue or []) + 0.2


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / (
        math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    )


def test_the_cli_waits_for_shows_lists_and_downloads_a_gemini_batch(server: Server, tmp_path: Path) -> None:
    client = gemini_client(server)
    tag = uuid.uuid4().hex[:8]
    name = client.batches.create(model=MODEL, src=[ask(f"cli {tag} {i}") for i in range(3)]).name or ""
    batch_id = name.removeprefix("batches/")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "backfill", *args, "--base-url", server.base_url]
        return subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=120, check=False)

    waited = cli("wait", name)
    shown = cli("status", batch_id)
    listed = cli("list", "--json")
    results = cli("results", batch_id, "-o", str(tmp_path / "out.jsonl"))

    assert 0 == waited.returncode, waited.stderr
    assert "completed" in shown.stdout
    assert "Gemini batch" in shown.stdout
    assert name in [item.get("name") for item in orjson.loads(listed.stdout)]
    assert 0 == results.returncode, results.stderr
    answers = [orjson.loads(line) for line in (tmp_path / "out.jsonl").read_bytes().splitlines()]
    texts = [answer["response"]["candidates"][0]["content"]["parts"][0]["text"] for answer in answers]
    assert [reply_to(f"cli {tag} {i}") for i in range(3)] == texts
