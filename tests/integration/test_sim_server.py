"""The engine simulator over real HTTP (uvicorn on a loopback port), driven with the openai SDK."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from click.testing import CliRunner
from openai.types.chat import ChatCompletion

from backfill.cli import main
from backfill.sim.profile import EngineProfile
from backfill.sim.server import create_sim_app
from backfill.sim.tokens import count_text_tokens, render_chat
from backfill.testing.pooling import class_probs, pair_score
from backfill.testing.processes import free_port, wait_http
from tests.support.processes import child_env

MODEL = "sim-test"
# Small and fast: an iteration is modelled as 10 ms + work and slept at 1/100th of that.
FAST = EngineProfile(
    model=MODEL,
    max_model_len=8192,
    max_num_seqs=8,
    max_num_batched_tokens=512,
    num_gpu_blocks=1024,
    iteration_base_s=0.01,
    time_scale=0.01,
)
LONG_SYSTEM_PROMPT = "You review products for a catalogue; be brief and factual. " * 20


@dataclass
class RunningSim:
    url: str
    client: openai.OpenAI
    http: httpx.Client

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self.http.get("/_stats").json()
        return result

    def reset(self) -> None:
        self.http.post("/_reset").raise_for_status()

    def metrics(self) -> str:
        return self.http.get("/metrics").text

    def wait_for_abort(self, timeout_s: float = 5.0) -> dict[str, Any]:
        """The stats once a request was counted as abandoned by its client, or after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            stats = self.stats()
            if stats["aborted"] or time.monotonic() > deadline:
                return stats
            time.sleep(0.02)


@contextmanager
def serve(profile: EngineProfile) -> Iterator[RunningSim]:
    """The simulator app under uvicorn in a thread of this process."""
    port = free_port()
    app = create_sim_app(profile)
    server = uvicorn.Server(uvicorn.Config(app, port=port, lifespan="on", log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, name="sim-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive(), "the simulator stopped while starting"
        assert time.monotonic() < deadline, "the simulator did not start"
        time.sleep(0.01)
    url = f"http://127.0.0.1:{port}"
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    http = httpx.Client(base_url=url, timeout=5)
    try:
        yield RunningSim(url, client, http)
    finally:
        client.close()
        http.close()
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def sim() -> Iterator[RunningSim]:
    with serve(FAST) as running:
        yield running


def chat(text: str, **fields: Any) -> dict[str, Any]:
    """Arguments for the SDK's create(): vLLM's own fields (ignore_eos, priority) go in extra_body."""
    extra = {name: fields.pop(name) for name in ("ignore_eos", "priority") if name in fields}
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], **fields, "extra_body": extra}


def flat(arguments: dict[str, Any]) -> dict[str, Any]:
    """The JSON body the SDK would send for these create() arguments."""
    return {name: value for name, value in arguments.items() if name != "extra_body"} | arguments["extra_body"]


def cached_tokens(answer: ChatCompletion) -> int:
    assert answer.usage is not None
    assert answer.usage.prompt_tokens_details is not None
    return answer.usage.prompt_tokens_details.cached_tokens or 0


def test_a_chat_completion_has_exact_usage(sim: RunningSim) -> None:
    answer = sim.client.chat.completions.create(**chat("Describe a teapot.", max_tokens=7, ignore_eos=True))

    expected_prompt = count_text_tokens(render_chat([("user", "Describe a teapot.")]), 4)
    assert answer.usage is not None
    assert (expected_prompt, 7, expected_prompt + 7) == (
        answer.usage.prompt_tokens,
        answer.usage.completion_tokens,
        answer.usage.total_tokens,
    )
    assert "length" == answer.choices[0].finish_reason
    assert 7 == count_text_tokens(answer.choices[0].message.content or "", 4)
    assert (MODEL, "chat.completion") == (answer.model, answer.object)


def test_without_ignore_eos_an_answer_stops_by_itself_or_at_max_tokens(sim: RunningSim) -> None:
    answers = [sim.client.chat.completions.create(**chat(f"Question {i}", max_tokens=300)) for i in range(10)]

    for answer in answers:
        assert answer.usage is not None
        if answer.choices[0].finish_reason == "stop":
            assert answer.usage.completion_tokens < 300
        else:
            assert ("length", 300) == (answer.choices[0].finish_reason, answer.usage.completion_tokens)
    assert 1 < len({answer.usage.completion_tokens for answer in answers if answer.usage})


def test_a_chat_stream_sends_one_chunk_a_token_then_the_usage(sim: RunningSim) -> None:
    stream = sim.client.chat.completions.create(
        **chat("Stream it.", max_tokens=5, ignore_eos=True), stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)

    assert "assistant" == chunks[0].choices[0].delta.role
    content = [chunk.choices[0].delta.content for chunk in chunks[1:-1]]
    assert 5 == len(content)
    assert [None] * 4 + ["length"] == [chunk.choices[0].finish_reason for chunk in chunks[1:-1]]
    usage = chunks[-1].usage
    assert usage is not None
    assert ([], 5) == (chunks[-1].choices, usage.completion_tokens)


def test_completions_plain_and_streamed(sim: RunningSim) -> None:
    plain = sim.client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=4, extra_body={"ignore_eos": True}
    )
    chunks = list(
        sim.client.completions.create(
            model=MODEL, prompt="Once upon a time", max_tokens=3, stream=True, extra_body={"ignore_eos": True}
        )
    )

    assert plain.usage is not None
    assert (4, 4, "length") == (
        plain.usage.prompt_tokens,
        plain.usage.completion_tokens,
        plain.choices[0].finish_reason,
    )
    assert ["length"] == [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices[0].finish_reason]
    assert 3 == len(chunks)


def test_a_repeated_prompt_prefix_is_reported_as_cached_tokens(sim: RunningSim) -> None:
    arguments = chat("", max_tokens=1, ignore_eos=True)
    arguments["messages"] = [{"role": "system", "content": LONG_SYSTEM_PROMPT}]
    first = sim.client.chat.completions.create(**arguments)
    second = sim.client.chat.completions.create(**arguments)

    assert 0 == cached_tokens(first)
    assert second.usage is not None
    assert second.usage.prompt_tokens - 16 <= cached_tokens(second) < second.usage.prompt_tokens


def test_embeddings_for_each_input(sim: RunningSim) -> None:
    client = sim.client
    result = client.embeddings.create(model=MODEL, input=["a red teapot", "a blue kettle"])  # base64, the SDK's way
    as_floats = client.embeddings.create(model=MODEL, input="a red teapot", encoding_format="float")

    assert [0, 1] == [item.index for item in result.data]
    assert [16, 16] == [len(item.embedding) for item in result.data]
    assert result.data[0].embedding == pytest.approx(as_floats.data[0].embedding)
    assert result.data[0].embedding != result.data[1].embedding
    assert 3 + 4 == result.usage.prompt_tokens


def test_models_lists_the_profile_model(sim: RunningSim) -> None:
    assert [MODEL] == [model.id for model in sim.client.models.list()]


def test_a_priority_is_refused_when_priority_scheduling_is_off(sim: RunningSim) -> None:
    with pytest.raises(openai.BadRequestError, match="Priority scheduling is not enabled"):
        sim.client.chat.completions.create(**chat("Hurry.", priority=-1))


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (chat("hi", model="other-model"), 404, "model"),
        (chat("hi", max_tokens=9000), 400, "max_tokens"),
        (chat("hi", n=2), 400, "n"),
        ({"model": MODEL, "messages": []}, 400, "messages"),
        (chat("hi", stream_options={"include_usage": True}), 400, "stream_options"),
        ({"model": MODEL, "input": [[]]}, 400, "input"),
    ],
)
def test_invalid_requests_get_an_openai_error(sim: RunningSim, body: dict[str, Any], status: int, param: str) -> None:
    path = "/v1/embeddings" if "input" in body else "/v1/chat/completions"

    response = sim.http.post(path, json=flat(body) if "extra_body" in body else body)

    assert (status, param) == (response.status_code, response.json()["error"]["param"])


def test_metrics_use_vllm_names(sim: RunningSim) -> None:
    sim.client.chat.completions.create(**chat("Count me.", max_tokens=2))

    metrics = sim.metrics()

    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:request_success_total",
    ):
        assert f"{name}{{" in metrics, name


def test_stats_count_requests_by_key_until_reset(sim: RunningSim) -> None:
    sim.reset()
    for _ in range(2):
        sim.client.chat.completions.create(**chat("line 17", max_tokens=1))

    stats = sim.stats()
    sim.reset()

    assert (2, 2, 0, {"line 17": 2}, {"200": 2}) == (
        stats["total"],
        stats["completed"],
        stats["aborted"],
        stats["by_key"],
        stats["by_status"],
    )
    assert 0 == sim.stats()["total"]


def test_a_client_that_leaves_a_stream_frees_its_slot(sim: RunningSim) -> None:
    sim.reset()
    stream = sim.client.chat.completions.create(**chat("Talk forever.", max_tokens=8000, ignore_eos=True), stream=True)
    for _, _chunk in zip(range(3), stream, strict=False):
        pass
    assert 1 == sim.stats()["running"]

    stream.close()

    stats = sim.wait_for_abort()
    assert (0, 1) == (stats["running"], stats["aborted"])
    assert 'vllm:request_success_total{finished_reason="abort",model_name="sim-test"} 1.0' in sim.metrics()


def test_a_client_that_gives_up_on_a_plain_request_frees_its_slot(sim: RunningSim) -> None:
    sim.reset()
    with pytest.raises(httpx.ReadTimeout):
        sim.http.post("/v1/chat/completions", json=flat(chat("Slow.", max_tokens=8000, ignore_eos=True)), timeout=0.3)

    stats = sim.wait_for_abort()
    assert (0, 1, {"499": 1}) == (stats["running"], stats["aborted"], stats["by_status"])


def test_time_scale_sets_how_long_the_modelled_work_takes() -> None:
    # 100 iterations of ~10 ms: 1 s modelled, 0.1 s at this scale.
    profile = EngineProfile(model=MODEL, iteration_base_s=0.01, prefill_token_s=0, decode_seq_s=0, kv_token_s=0,
                            time_scale=0.1)  # fmt: skip
    with serve(profile) as running:
        running.http.get("/health")
        started = time.monotonic()
        response = running.http.post("/v1/chat/completions", json=flat(chat("Go.", max_tokens=100, ignore_eos=True)))
        elapsed_s = time.monotonic() - started

    assert 200 == response.status_code
    assert 0.09 <= elapsed_s < 0.8  # unscaled, 1 s


async def test_priority_scheduling_serves_urgent_requests_first() -> None:
    profile = EngineProfile(model=MODEL, scheduling_policy="priority", max_num_seqs=1, iteration_base_s=0.01,
                            time_scale=0.01)  # fmt: skip
    finished: list[str] = []
    with serve(profile) as running:
        client = openai.AsyncOpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0)

        async def ask(name: str, priority: int, delay_s: float, max_tokens: int) -> None:
            await asyncio.sleep(delay_s)
            body = chat(name, max_tokens=max_tokens, ignore_eos=True, priority=priority)
            await client.chat.completions.create(**body)
            finished.append(name)

        # The background request runs ~50 s modelled (0.5 s here); the urgent one arrives while it runs.
        await asyncio.gather(ask("background", 10, 0.0, 5000), ask("urgent", 0, 0.05, 50))
        await client.close()
        preemptions = [line for line in running.metrics().splitlines() if line.startswith("vllm:num_preemptions_total")]

    assert ["urgent", "background"] == finished
    assert preemptions[0].endswith(" 1.0")


def test_backfill_sim_serve_runs_the_simulator(tmp_path: Path) -> None:
    profile = tmp_path / "profile.toml"
    profile.write_text("max_num_seqs = 4\noutput_len_dist = 'fixed'\noutput_len_mean = 3\n")
    port = free_port()
    command = [sys.executable, "-m", "backfill", "sim", "serve", "--port", str(port), "--profile", str(profile),
               "--model", "cli-model", "--time-scale", "0"]  # fmt: skip
    process = subprocess.Popen(command, env=child_env())
    try:
        wait_http(f"http://127.0.0.1:{port}/health", process)
        with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0) as client:
            answer = client.completions.create(model="cli-model", prompt="hello", max_tokens=10)
            models = [model.id for model in client.models.list()]
    finally:
        process.terminate()
        process.wait(10)

    assert ["cli-model"] == models
    assert answer.usage is not None
    assert (3, "stop") == (answer.usage.completion_tokens, answer.choices[0].finish_reason)


def test_backfill_sim_serve_refuses_a_bad_profile(tmp_path: Path) -> None:
    profile = tmp_path / "profile.toml"
    profile.write_text("max_num_seq = 4\n")

    result = CliRunner().invoke(main, ["sim", "serve", "--port", "1", "--profile", str(profile)])

    assert 1 == result.exit_code
    assert "unknown key(s) max_num_seq" in result.output


def test_vllm_pooling_apis_answer_each_input_with_vllm_s_shapes(sim: RunningSim) -> None:
    classify = sim.http.post("/classify", json={"model": MODEL, "input": ["a red teapot", "a kettle"]}).json()
    score = sim.http.post("/v1/score", json={"model": MODEL, "text_1": "tea", "text_2": ["pot", "cup"]}).json()
    rerank = sim.http.post("/rerank", json={"model": MODEL, "query": "tea", "documents": ["pot", "cup"], "top_n": 1})

    assert [(0, class_probs("a red teapot"), 2), (1, class_probs("a kettle"), 2)] == [
        (item["index"], item["probs"], item["num_classes"]) for item in classify["data"]
    ]
    assert 3 + 2 == classify["usage"]["prompt_tokens"]
    assert [(0, pair_score("tea", "pot")), (1, pair_score("tea", "cup"))] == [
        (item["index"], item["score"]) for item in score["data"]
    ]
    best = max((0, 1), key=lambda i: pair_score("tea", ("pot", "cup")[i]))
    assert [best] == [result["index"] for result in rerank.json()["results"]]


def test_a_pooling_request_without_its_inputs_is_a_400(sim: RunningSim) -> None:
    response = sim.http.post("/v1/score", json={"model": MODEL, "text_1": "tea"})

    assert (400, "text_2") == (response.status_code, response.json()["error"]["param"])
