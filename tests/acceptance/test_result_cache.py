"""The result cache across batches (docs/evals.md), end to end: a real `backfill serve` in front of a real engine
simulator, which counts the requests it receives. An eval suite of 500 deterministic cases run again with 5 cases
changed sends exactly those 5; the engine restarted on other weights under the same model name runs them all."""

from __future__ import annotations

import random
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from openai import OpenAI

from tests.acceptance.conftest import MODEL, StartServer, client_for
from tests.acceptance.helpers import read_jsonl, start_batch, upload, wait_terminal
from tests.support.processes import EngineProcess, Upstream, free_port

SIM_MODEL = "sim-eval"
CASES = 500
CACHE_ON = {"backfill_result_cache": "true"}


def case(text: str, *, seed: int | None = None) -> dict[str, object]:
    """One eval case as eval tools write them: a random custom_id, a deterministic request."""
    body: dict[str, object] = {"model": SIM_MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 4}
    if seed is None:
        body["temperature"] = 0
    else:
        body["seed"] = seed
    return {"custom_id": uuid.uuid4().hex, "method": "POST", "url": "/v1/chat/completions", "body": body}


def sim_process(profile: Path, port: int, root: str) -> EngineProcess:
    command = [
        sys.executable, "-m", "backfill", "sim", "serve", "--port", str(port), "--profile", str(profile),
        "--model", SIM_MODEL, "--time-scale", "0", "--root", root,
    ]  # fmt: skip
    return EngineProcess(command, port, "/health")


class Simulator:
    """The engine, which can be restarted on the same port with other weights."""

    def __init__(self, profile: Path) -> None:
        self.profile = profile
        self.engine = sim_process(profile, free_port(), "/weights/v1").start()
        self.url = self.engine.url

    def requests_since_reset(self) -> int:
        stats: dict[str, Any] = httpx.get(f"{self.url}/_stats?log=0", timeout=10).json()
        return int(stats["total"])

    def reset(self) -> None:
        httpx.post(f"{self.url}/_reset", timeout=10).raise_for_status()

    def restart_on(self, root: str) -> None:
        self.engine.stop()
        self.engine = sim_process(self.profile, self.engine.port, root)  # stopped by the fixture, even if it fails
        self.engine.start()


@pytest.fixture
def simulator(tmp_path: Path) -> Iterator[Simulator]:
    profile = tmp_path / "profile.toml"
    profile.write_text("max_num_seqs = 64\noutput_len_dist = 'fixed'\noutput_len_mean = 3\n")
    sim = Simulator(profile)
    yield sim
    sim.engine.stop()


def run(client: OpenAI, lines: list[dict[str, object]], metadata: dict[str, str] | None = CACHE_ON) -> list[Any]:
    batch = wait_terminal(client, start_batch(client, lines, metadata=metadata).id, timeout_s=240)
    assert batch.status == "completed"
    assert batch.output_file_id is not None
    return read_jsonl(client, batch.output_file_id)


def cache_hits(base_url: str) -> int:
    """Lines answered from the cache over the last hour, as the usage API reports them."""
    answer = httpx.get(
        f"{base_url}/v1/organization/usage/completions",
        params={"start_time": int(time.time()) - 3600, "bucket_width": "1h"},
        headers={"Authorization": "Bearer open-mode"},
        timeout=30,
    )
    assert 200 == answer.status_code, answer.text
    return sum(result["result_cache_hits"] for bucket in answer.json()["data"] for result in bucket["results"])


def bodies_by_prompt(lines: list[dict[str, object]], output: list[Any]) -> dict[str, Any]:
    prompt_of = {line["custom_id"]: orjson.dumps(line["body"]) for line in lines}
    return {prompt_of[result["custom_id"]]: result["response"]["body"] for result in output}


def test_a_rerun_with_five_cases_changed_sends_five_requests_and_new_weights_rerun_all(
    start_server: StartServer, simulator: Simulator
) -> None:
    backend = {
        "name": "sim", "url": simulator.url, "models": [SIM_MODEL], "flavour": "vllm", "max_concurrency": 32,
        "model_identity_ttl_s": 0, "priority": "off",
    }  # fmt: skip
    server = start_server(backends=[backend])
    client = client_for(server)
    prompts = [f"question {i}: what is {i} + {i}?" for i in range(CASES)]
    first = [case(text, seed=7) if i % 10 == 0 else case(text) for i, text in enumerate(prompts)]
    simulator.reset()

    first_output = run(client, first)

    assert simulator.requests_since_reset() == CASES
    changed = set(random.Random(5).sample(range(CASES), 5))
    second = [case(f"{text} (reworded)") if i in changed else case(text) for i, text in enumerate(prompts)]
    for i in range(0, CASES, 10):
        if i not in changed:
            second[i] = case(prompts[i], seed=7)
    simulator.reset()

    second_output = run(client, second)

    assert simulator.requests_since_reset() == 5
    cached = [result for result in second_output if result.get("backfill", {}).get("cached")]
    assert len(cached) == CASES - 5
    assert {result["custom_id"] for result in second_output} - {result["custom_id"] for result in cached} == {
        second[i]["custom_id"] for i in changed
    }
    first_bodies, second_bodies = bodies_by_prompt(first, first_output), bodies_by_prompt(second, second_output)
    assert all(first_bodies[prompt] == body for prompt, body in second_bodies.items() if prompt in first_bodies)
    first_ids = {result["id"] for result in first_output}
    assert {result["backfill"]["cached_from"] for result in cached} <= first_ids
    assert cache_hits(server.base_url) == CASES - 5

    simulator.restart_on("/weights/v2")
    simulator.reset()

    run(client, second)

    assert simulator.requests_since_reset() == CASES


def test_a_batch_without_the_cache_sends_everything_and_sampled_requests_are_never_cached(
    start_server: StartServer, simulator: Simulator
) -> None:
    backend = {"name": "sim", "url": simulator.url, "models": [SIM_MODEL], "flavour": "vllm", "priority": "off"}
    server = start_server(backends=[backend])
    client = client_for(server)
    deterministic = [case(f"q{i}") for i in range(10)]
    sampled = [case(f"s{i}") for i in range(10)]
    for line in sampled:
        del line["body"]["temperature"]  # type: ignore[attr-defined]
    run(client, deterministic + sampled)
    simulator.reset()

    run(client, [case(f"q{i}") for i in range(10)], metadata=None)  # the setting's default: off
    run(client, [{**line, "custom_id": uuid.uuid4().hex} for line in sampled])

    assert simulator.requests_since_reset() == 20


def test_a_batch_with_an_unreadable_cache_flag_is_refused(start_server: StartServer) -> None:
    client = client_for(start_server())

    with pytest.raises(Exception, match="backfill_result_cache") as refused:
        start_batch(client, [case("x")], metadata={"backfill_result_cache": "yes"})

    assert getattr(refused.value, "status_code", None) == 400


def test_embeddings_lines_sent_together_reuse_kept_vectors_and_send_only_the_new_inputs(
    start_server: StartServer,
) -> None:
    upstream = Upstream.start()  # its own: its counts are this test's alone
    try:
        backend = {
            "name": "up", "url": upstream.url, "models": [MODEL], "max_concurrency": 4, "max_inputs_per_request": 16,
            "model_revision": "emb-v1",  # the test upstream has no /v1/models: known by its revision
        }  # fmt: skip
        client = client_for(start_server(backends=[backend]))

        def embed(texts: list[str]) -> list[Any]:
            lines = [
                {"custom_id": uuid.uuid4().hex, "method": "POST", "url": "/v1/embeddings",
                 "body": {"model": MODEL, "input": text}}
                for text in texts
            ]  # fmt: skip
            batch = client.batches.create(
                input_file_id=upload(client, lines),
                endpoint="/v1/embeddings",
                completion_window="24h",
                metadata=CACHE_ON,
            )
            done = wait_terminal(client, batch.id, timeout_s=120)
            assert done.output_file_id is not None
            return read_jsonl(client, done.output_file_id)

        first = embed([f"document {i}" for i in range(40)])
        before = upstream.stats()["answered"]["/v1/embeddings"]["inputs"]
        second = embed([f"document {i}" for i in range(40)] + ["a new document", "another new one"])
        after = upstream.stats()["answered"]["/v1/embeddings"]["inputs"]
    finally:
        upstream.stop()

    assert (40, 2) == (before, after - before)
    reused = [line for line in second if line.get("backfill", {}).get("cached")]
    assert 40 == len(reused)
    vectors = {repr(line["response"]["body"]["data"][0]["embedding"]) for line in first}
    assert all(repr(line["response"]["body"]["data"][0]["embedding"]) in vectors for line in reused)
