"""Message batches (SPEC §4) on real engines: the embedded CPU engine (real text back) and the engine simulator
(`backfill sim serve`, vLLM-flavoured), driven by the official anthropic SDK."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from anthropic import Anthropic
from anthropic.types import TextBlock
from anthropic.types.messages import MessageBatchErroredResult, MessageBatchSucceededResult
from anthropic.types.messages.batch_create_params import Request

from backfill.backends.embedded.backend import CHAT_MODEL, is_available
from tests.acceptance.conftest import StartServer
from tests.support.processes import Server, sim_serve

SIM_MODEL = "sim-model"


def request(custom_id: str, model: str, text: str, **params: Any) -> Request:
    body = {"model": model, "max_tokens": 16, "messages": [{"role": "user", "content": text}], **params}
    return cast(Request, {"custom_id": custom_id, "params": body})


def run(server: Server, requests: list[Request], timeout_s: float) -> dict[str, Any]:
    """Create the batch, wait for its end; its results by custom_id, in the order they came."""
    with Anthropic(base_url=server.base_url, api_key="open-mode", max_retries=0, timeout=120) as client:
        batch = client.messages.batches.create(requests=requests)
        deadline = time.monotonic() + timeout_s
        while batch.processing_status != "ended":
            assert time.monotonic() < deadline, f"not ended within {timeout_s}s: {batch}"
            time.sleep(0.2)
            batch = client.messages.batches.retrieve(batch.id)
        return {result.custom_id: result.result for result in client.messages.batches.results(batch.id)}


@pytest.mark.skipif(not is_available(), reason="needs backfill[local] (llama-cpp-python, models)")
def test_a_message_batch_gets_real_text_from_the_embedded_engine(start_server: StartServer) -> None:
    server = start_server(backends=[])
    story = "Write a long story about a lighthouse keeper."
    sentiment = "Answer with one word: positive or negative."
    image = [
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}},
        {"type": "text", "text": "What is this?"},
    ]
    weather = [{"name": "weather", "input_schema": {"type": "object"}}]
    requests = [
        request("review", CHAT_MODEL, "I love this lamp, it is great.", system=sentiment, temperature=0, top_k=20),
        request("capped", CHAT_MODEL, story, max_tokens=2, temperature=0),
        request("stopped", CHAT_MODEL, story, temperature=0, stop_sequences=[" ", "e"]),
        request("image", CHAT_MODEL, "", messages=[{"role": "user", "content": image}]),
        request("tools", CHAT_MODEL, "Weather?", tools=weather),
    ]

    results = run(server, requests, timeout_s=180)

    assert ["review", "capped", "stopped", "image", "tools"] == list(results)
    review, capped, stopped = (results[name] for name in ("review", "capped", "stopped"))
    for result in (review, capped, stopped):
        assert isinstance(result, MessageBatchSucceededResult)
        assert CHAT_MODEL == result.message.model
        assert result.message.usage.input_tokens > 0
        assert result.message.usage.output_tokens > 0
    assert isinstance(review, MessageBatchSucceededResult)
    assert isinstance(review.message.content[0], TextBlock)
    assert review.message.content[0].text.strip()
    assert review.message.stop_reason in ("end_turn", "max_tokens")
    assert ("max_tokens", 2) == (capped.message.stop_reason, capped.message.usage.output_tokens)
    assert "stop_sequence" == stopped.message.stop_reason
    assert stopped.message.stop_sequence in (" ", "e")
    for name, what in (("image", "image input"), ("tools", "tool use")):
        refused = results[name]
        assert isinstance(refused, MessageBatchErroredResult)
        assert "invalid_request_error" == refused.error.error.type
        assert (
            f"{what} is not supported by the backend that serves model '{CHAT_MODEL}'." in refused.error.error.message
        )


@pytest.fixture
def simulator(tmp_path: Path) -> Iterator[str]:
    """`backfill sim serve` on a free port: a vLLM-like engine that answers at once (time scale 0)."""
    profile = tmp_path / "profile.toml"
    profile.write_text("max_num_seqs = 8\noutput_len_dist = 'fixed'\noutput_len_mean = 5\n")
    with sim_serve(profile, "--model", SIM_MODEL, "--time-scale", "0") as url:
        yield url


def test_a_message_batch_runs_on_the_engine_simulator(start_server: StartServer, simulator: str) -> None:
    server = start_server(
        backends=[{"name": "sim", "url": simulator, "models": [SIM_MODEL], "flavour": "vllm", "max_concurrency": 8}]
    )
    requests = [request(f"sim-{i}", SIM_MODEL, f"simulated question {i}", top_k=10) for i in range(6)]
    requests.append(request("short", SIM_MODEL, "cut short", max_tokens=2))

    results = run(server, requests, timeout_s=60)

    assert [f"sim-{i}" for i in range(6)] + ["short"] == list(results)
    for name in list(results)[:-1]:
        result = results[name]
        assert isinstance(result, MessageBatchSucceededResult)
        assert ("end_turn", 5) == (result.message.stop_reason, result.message.usage.output_tokens)
    short = results["short"]
    assert isinstance(short, MessageBatchSucceededResult)
    assert ("max_tokens", 2) == (short.message.stop_reason, short.message.usage.output_tokens)
