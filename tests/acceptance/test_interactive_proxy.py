"""The interactive proxy on a real `backfill serve` in front of real engine simulators, driven by the openai SDK."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam
from prometheus_client.parser import text_string_to_metric_families

from tests.acceptance.conftest import StartServer, client_for
from tests.support.processes import Server, child_env, free_port, wait_http

SIM_MODEL = "sim-model"
SLOW_MODEL = "slow-model"
CHAT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say something."}]


@dataclass
class Simulator:
    url: str
    process: subprocess.Popen[bytes]

    def stats(self) -> dict[str, int]:
        stats: dict[str, int] = httpx.get(f"{self.url}/_stats?log=0", timeout=10).json()
        return stats


def start_simulator(directory: Path, model: str, time_scale: float) -> Simulator:
    profile = directory / f"{model}.toml"
    profile.write_text("max_num_seqs = 8\noutput_len_dist = 'fixed'\noutput_len_mean = 5\n")
    port = free_port()
    command = [sys.executable, "-m", "backfill", "sim", "serve", "--port", str(port), "--profile", str(profile),
               "--model", model, "--time-scale", str(time_scale)]  # fmt: skip
    process = subprocess.Popen(command, env=child_env())
    wait_http(f"http://127.0.0.1:{port}/health", process)
    return Simulator(f"http://127.0.0.1:{port}", process)


@pytest.fixture(scope="module")
def simulators(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Simulator]]:
    """One simulator that answers at once, one that takes real time (for clients that leave early)."""
    directory = tmp_path_factory.mktemp("sims")
    sims = {SIM_MODEL: start_simulator(directory, SIM_MODEL, 0), SLOW_MODEL: start_simulator(directory, SLOW_MODEL, 1)}
    yield sims
    for sim in sims.values():
        sim.process.terminate()
        sim.process.wait(10)


@pytest.fixture(scope="module")
def proxied(start_module_server: StartServer, simulators: dict[str, Simulator]) -> tuple[Server, str]:
    """`backfill serve` in front of both simulators, with an API key (so requests without one are refused)."""
    backends = [
        {"name": name, "url": sim.url, "models": [name], "flavour": "vllm", "max_concurrency": 8}
        for name, sim in simulators.items()
    ]
    server = start_module_server(backends=backends)
    return server, server.create_key("interactive")


@pytest.fixture
def client(proxied: tuple[Server, str]) -> OpenAI:
    server, key = proxied
    return client_for(server, key)


def metric(server: Server, name: str, **labels: str) -> float:
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(key) == value for key, value in labels.items()):
                return float(sample.value)
    return 0.0


def eventually(holds: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    """Whether `holds()` becomes true within `timeout_s` (what the server records when a request ends comes a
    moment after the client has read the answer's last byte)."""
    deadline = time.monotonic() + timeout_s
    while not holds():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_chat_completion_comes_back_with_usage(client: OpenAI) -> None:
    completion = client.chat.completions.create(model=SIM_MODEL, messages=CHAT, max_tokens=16)

    assert SIM_MODEL == completion.model
    assert completion.usage is not None
    assert (5, True) == (completion.usage.completion_tokens, completion.usage.prompt_tokens > 0)
    assert completion.choices[0].message.content


def test_chat_stream_arrives_in_chunks_with_usage_last(client: OpenAI, proxied: tuple[Server, str]) -> None:
    server, _ = proxied
    before = metric(server, "backfill_interactive_ttft_seconds_count", backend=SIM_MODEL)
    ok_before = metric(server, "backfill_interactive_requests_total", backend=SIM_MODEL, outcome="2xx")

    stream = client.chat.completions.create(
        model=SIM_MODEL,
        messages=CHAT,
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)

    texts = [chunk.choices[0].delta.content for chunk in chunks if chunk.choices and chunk.choices[0].delta.content]
    assert 5 == len(texts)
    assert chunks[-1].usage is not None
    assert 5 == chunks[-1].usage.completion_tokens
    assert before + 1 == metric(server, "backfill_interactive_ttft_seconds_count", backend=SIM_MODEL)
    assert eventually(
        lambda: ok_before + 1 == metric(server, "backfill_interactive_requests_total", backend=SIM_MODEL, outcome="2xx")
    )


def test_completion_and_embeddings_pass_through(client: OpenAI) -> None:
    completion = client.completions.create(model=SIM_MODEL, prompt="Once upon a time", max_tokens=3)
    embedding = client.embeddings.create(model=SIM_MODEL, input=["one", "two"])

    assert completion.usage is not None
    assert (3, "length") == (completion.usage.completion_tokens, completion.choices[0].finish_reason)
    assert 2 == len(embedding.data)
    assert embedding.data[0].embedding
    assert embedding.usage.prompt_tokens > 0


def test_responses_get_the_backends_own_answer(client: OpenAI) -> None:
    """The simulator has no /v1/responses: its 404 comes back as it was sent."""
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.create(model=SIM_MODEL, input="Hello")

    assert "Unknown route: POST /v1/responses" in caught.value.message


def test_requests_without_a_valid_key_are_refused(proxied: tuple[Server, str]) -> None:
    server, _ = proxied
    with pytest.raises(openai.AuthenticationError) as caught:
        client_for(server, "sk-wrong").chat.completions.create(model=SIM_MODEL, messages=CHAT)
    missing = httpx.post(f"{server.base_url}/v1/chat/completions", json={"model": SIM_MODEL, "messages": CHAT})

    assert "invalid_api_key" == caught.value.code
    assert (401, "missing_api_key") == (missing.status_code, missing.json()["error"]["code"])


def test_an_unknown_model_is_a_404_naming_the_served_ones(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-nope", messages=CHAT)

    assert "model_not_found" == caught.value.code
    assert f"Served models: {SIM_MODEL}, {SLOW_MODEL}." in caught.value.message


def test_a_body_that_is_not_json_is_a_400(proxied: tuple[Server, str]) -> None:
    server, key = proxied
    answer = httpx.post(
        f"{server.base_url}/v1/embeddings", content=b"{nope", headers={"authorization": f"Bearer {key}"}, timeout=10
    )

    assert 400 == answer.status_code
    assert "invalid_request_error" == answer.json()["error"]["type"]


def test_a_client_that_leaves_a_stream_frees_the_engine_slot(
    client: OpenAI, proxied: tuple[Server, str], simulators: dict[str, Simulator]
) -> None:
    server, _ = proxied
    slow = simulators[SLOW_MODEL]
    aborted = slow.stats()["aborted"]
    stream = client.chat.completions.create(
        model=SLOW_MODEL,
        messages=CHAT,
        max_tokens=4000,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    stream.close()

    assert eventually(lambda: aborted + 1 == slow.stats()["aborted"])
    assert eventually(lambda: 0 == metric(server, "backfill_interactive_in_flight", backend=SLOW_MODEL))
    assert 1 <= metric(server, "backfill_interactive_requests_total", backend=SLOW_MODEL, outcome="cancelled")


def test_a_client_that_stops_waiting_for_a_plain_answer_frees_the_engine_slot(
    proxied: tuple[Server, str], simulators: dict[str, Simulator]
) -> None:
    server, key = proxied
    slow = simulators[SLOW_MODEL]
    aborted = slow.stats()["aborted"]
    impatient = OpenAI(base_url=f"{server.base_url}/v1", api_key=key, max_retries=0, timeout=0.5)
    with impatient, pytest.raises(openai.APITimeoutError):
        impatient.chat.completions.create(
            model=SLOW_MODEL,
            messages=CHAT,
            max_tokens=4000,
            extra_body={"ignore_eos": True},
        )

    assert eventually(lambda: aborted + 1 == slow.stats()["aborted"])
    assert eventually(lambda: 0 == metric(server, "backfill_interactive_in_flight", backend=SLOW_MODEL))
    assert "Traceback" not in server.log_text()
