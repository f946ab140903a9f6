"""The embedded CPU engine with its real models (needs backfill[local]; CI installs it)."""

from __future__ import annotations

import asyncio
import base64
import math
import struct
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import pytest_asyncio

from backfill.backends.embedded.backend import is_available

pytestmark = [
    pytest.mark.skipif(not is_available(), reason="needs backfill[local] (llama-cpp-python, models)"),
    pytest.mark.asyncio(loop_scope="module"),
]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def chat() -> AsyncIterator[Any]:
    from backfill.backends.embedded.backend import EmbeddedChatBackend

    backend = EmbeddedChatBackend(slots=4, context_per_slot=1024)
    yield backend
    await backend.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def embeddings() -> AsyncIterator[Any]:
    from backfill.backends.embedded.backend import EmbeddedEmbeddingBackend

    backend = EmbeddedEmbeddingBackend()
    yield backend
    await backend.close()


def chat_body(text: str, **params: Any) -> bytes:
    return orjson.dumps({"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": text}], **params})


async def test_chat_completion_has_real_text_usage_and_finish_reason(chat: Any) -> None:
    outcome = await chat.send("/v1/chat/completions", chat_body("Name a color.", max_tokens=12, temperature=0), 60)

    body = orjson.loads(outcome.body)
    assert 200 == outcome.status_code
    assert "chat.completion" == body["object"]
    assert body["choices"][0]["message"]["content"].strip()
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    assert body["usage"]["prompt_tokens"] > 5
    assert body["usage"]["completion_tokens"] >= 1
    assert outcome.usage.input_tokens == body["usage"]["prompt_tokens"]


async def test_max_tokens_cuts_generation_with_finish_reason_length(chat: Any) -> None:
    outcome = await chat.send(
        "/v1/chat/completions", chat_body("Write a long story about the sea.", max_tokens=5, temperature=0), 60
    )

    body = orjson.loads(outcome.body)
    assert (5, "length") == (body["usage"]["completion_tokens"], body["choices"][0]["finish_reason"])


async def test_greedy_and_seeded_sampling_are_reproducible(chat: Any) -> None:
    prompt = "Invent a name for a cat."
    greedy = [
        orjson.loads(
            (await chat.send("/v1/chat/completions", chat_body(prompt, max_tokens=10, temperature=0), 60)).body
        )
        for _ in range(2)
    ]
    seeded = [
        orjson.loads(
            (
                await chat.send("/v1/chat/completions", chat_body(prompt, max_tokens=10, temperature=1.2, seed=7), 60)
            ).body
        )
        for _ in range(2)
    ]

    assert greedy[0]["choices"][0]["message"] == greedy[1]["choices"][0]["message"]
    assert seeded[0]["choices"][0]["message"] == seeded[1]["choices"][0]["message"]


async def test_stop_sequence_ends_the_text_before_it(chat: Any) -> None:
    body = {"model": "smollm2-135m-instruct", "prompt": "1, 2, 3, 4, 5,", "max_tokens": 20, "temperature": 0}
    free = orjson.loads((await chat.send("/v1/completions", orjson.dumps(body), 60)).body)["choices"][0]["text"]
    assert "7" in free, free  # the model counts on; then stop it there
    stopped = orjson.loads((await chat.send("/v1/completions", orjson.dumps({**body, "stop": ["7"]}), 60)).body)

    assert free[: free.index("7")] == stopped["choices"][0]["text"]
    assert "stop" == stopped["choices"][0]["finish_reason"]


async def test_responses_endpoint_returns_a_response_object(chat: Any) -> None:
    body = {"model": "smollm2-135m-instruct", "input": "Say hello.", "max_output_tokens": 8, "temperature": 0}
    response = orjson.loads((await chat.send("/v1/responses", orjson.dumps(body), 60)).body)

    assert "response" == response["object"]
    assert response["output"][0]["content"][0]["text"].strip()
    assert response["usage"]["output_tokens"] >= 1


async def test_unsupported_content_is_a_clear_400(chat: Any) -> None:
    image = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
    body = orjson.dumps({"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": image}]})
    outcome = await chat.send("/v1/chat/completions", body, 60)

    assert 400 == outcome.status_code
    assert "only text content" in orjson.loads(outcome.body)["error"]["message"]


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / (
        math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    )


async def test_embeddings_rank_a_paraphrase_above_an_unrelated_sentence(embeddings: Any) -> None:
    texts = ["The cat sat on the mat.", "A cat was sitting on the rug.", "Quarterly revenue grew by four percent."]
    body = orjson.dumps({"model": "all-minilm-l6-v2", "input": texts})
    result = orjson.loads((await embeddings.send("/v1/embeddings", body, 60)).body)

    vectors = [item["embedding"] for item in result["data"]]
    assert [384, 384, 384] == [len(vector) for vector in vectors]
    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2]) + 0.3
    assert result["usage"]["prompt_tokens"] > 10


async def test_base64_embeddings_decode_to_the_float_vector(embeddings: Any) -> None:
    floats = orjson.loads(
        (
            await embeddings.send("/v1/embeddings", orjson.dumps({"model": "all-minilm-l6-v2", "input": "hello"}), 60)
        ).body
    )["data"][0]["embedding"]
    encoded = orjson.loads(
        (
            await embeddings.send(
                "/v1/embeddings",
                orjson.dumps({"model": "all-minilm-l6-v2", "input": "hello", "encoding_format": "base64"}),
                60,
            )
        ).body
    )["data"][0]["embedding"]

    decoded = struct.unpack("<384f", base64.b64decode(encoded))
    assert all(abs(x - y) < 1e-6 for x, y in zip(floats, decoded, strict=True))


async def test_dimensions_other_than_384_are_rejected(embeddings: Any) -> None:
    body = orjson.dumps({"model": "all-minilm-l6-v2", "input": "hi", "dimensions": 128})
    outcome = await embeddings.send("/v1/embeddings", body, 60)

    assert 400 == outcome.status_code
    assert "dimensions" == orjson.loads(outcome.body)["error"]["param"]


async def test_weights_are_converted_once_into_the_cache(tmp_path: Any) -> None:
    from backfill.backends.embedded.backend import smollm2_gguf
    from backfill.backends.embedded.weights import prepared_gguf

    source = smollm2_gguf()
    first = prepared_gguf(source, "q8_0", tmp_path, threads=2)
    written = first.stat().st_mtime_ns
    again = prepared_gguf(source, "q8_0", tmp_path, threads=2)

    assert first == again != source
    assert tmp_path == first.parent
    assert first.name.endswith(".Q8_0.gguf")
    assert written == again.stat().st_mtime_ns  # found, not converted again
    assert [first] == list(tmp_path.iterdir())  # no temporary file left behind
    assert source == prepared_gguf(source, "shipped", tmp_path)


async def test_auto_weights_convert_only_when_there_is_batching_to_gain() -> None:
    from backfill.backends.embedded.weights import resolve

    assert ("shipped", "q8_0", "q4_0") == (resolve("auto", 1), resolve("auto", 8), resolve("q4_0", 1))


async def test_a_cache_that_cannot_be_written_falls_back_to_the_shipped_file(tmp_path: Any) -> None:
    from backfill.backends.embedded.backend import smollm2_gguf
    from backfill.backends.embedded.weights import prepared_gguf

    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")

    assert smollm2_gguf() == prepared_gguf(smollm2_gguf(), "q8_0", blocked)


async def test_an_empty_prompt_is_a_400_and_the_engine_keeps_serving(chat: Any) -> None:
    empty = await chat.send("/v1/completions", orjson.dumps({"model": "smollm2-135m-instruct", "prompt": ""}), 60)
    after = await chat.send("/v1/chat/completions", chat_body("Name a color.", max_tokens=4, temperature=0), 60)

    assert (400, "prompt") == (empty.status_code, orjson.loads(empty.body)["error"]["param"])
    assert 200 == after.status_code


async def test_lines_sent_together_get_the_tokens_and_vectors_each_gets_alone(embeddings: Any) -> None:
    from backfill.dispatch.coalesced import send_together

    texts = ["hello", "A considerably longer sentence about sending embeddings lines together.", "short one"]
    bodies = [{"model": "all-minilm-l6-v2", "input": text} for text in texts]
    alone = [orjson.loads((await embeddings.send("/v1/embeddings", orjson.dumps(b), 60)).body) for b in bodies]
    together = await send_together(embeddings, "/v1/embeddings", bodies, 60, 32)

    assert [a["usage"]["prompt_tokens"] for a in alone] == [o.usage.input_tokens for o in together]
    vectors = [orjson.loads(o.body or b"{}")["data"][0]["embedding"] for o in together]
    assert all(cosine(a["data"][0]["embedding"], v) > 0.999 for a, v in zip(alone, vectors, strict=True))


LABEL_SCHEMA = {
    "type": "object",
    "properties": {"label": {"type": "string", "enum": ["positive", "negative"]}},
    "required": ["label"],
    "additionalProperties": False,
}


async def test_a_json_schema_response_format_makes_every_answer_match_the_schema(chat: Any) -> None:
    schema_format = {"type": "json_schema", "json_schema": {"name": "label", "schema": LABEL_SCHEMA, "strict": True}}
    # Sampled, not greedy: the grammar has to hold whatever token the model draws. max_tokens has room for an
    # answer spelt a character a token (a sampled sequence may take that path), so no answer is cut short.
    texts = ["Great phone case, I love it.", "It broke after a day.", "Tell me a story about dragons."]
    outcomes = [
        await chat.send(
            "/v1/chat/completions", chat_body(text, max_tokens=64, temperature=0.8, response_format=schema_format), 60
        )
        for text in texts
    ]

    answers = [orjson.loads(orjson.loads(o.body)["choices"][0]["message"]["content"]) for o in outcomes]
    assert all(answer["label"] in ("positive", "negative") for answer in answers)
    assert all(set(answer) == {"label"} for answer in answers)


async def test_json_object_output_parses_and_the_responses_api_takes_text_format(chat: Any) -> None:
    as_object = await chat.send(
        "/v1/chat/completions",
        chat_body(
            "Give a JSON object with a name.", max_tokens=48, temperature=0, response_format={"type": "json_object"}
        ),
        60,
    )
    body = {
        "model": "smollm2-135m-instruct",
        "input": "Is this review positive or negative? 'Love it.'",
        "max_output_tokens": 16,
        "temperature": 0,
        "text": {"format": {"type": "json_schema", "name": "label", "schema": LABEL_SCHEMA, "strict": True}},
    }
    response = orjson.loads((await chat.send("/v1/responses", orjson.dumps(body), 60)).body)

    text = orjson.loads(as_object.body)["choices"][0]["message"]["content"]
    finished = orjson.loads(as_object.body)["choices"][0]["finish_reason"]
    assert "length" == finished or isinstance(orjson.loads(text), dict)
    assert orjson.loads(response["output"][0]["content"][0]["text"])["label"] in ("positive", "negative")


@pytest.mark.parametrize(
    ("param", "value"),
    [("logit_bias", {"1": 5}), ("presence_penalty", 0.5), ("stream", True)],
)
async def test_parameters_the_engine_cannot_honour_are_a_400_naming_them(chat: Any, param: str, value: Any) -> None:
    outcome = await chat.send("/v1/chat/completions", chat_body("Hi.", max_tokens=4, **{param: value}), 60)

    error = orjson.loads(outcome.body)["error"]
    assert 400 == outcome.status_code
    assert param == error["param"]
    assert f"'{param}' is not supported by the embedded engine" in error["message"]


async def test_defaults_sent_explicitly_are_accepted(chat: Any) -> None:
    params = {"logprobs": False, "presence_penalty": 0, "frequency_penalty": 0.0, "stream": False, "logit_bias": {}}
    outcome = await chat.send("/v1/chat/completions", chat_body("Hi.", max_tokens=4, temperature=0, **params), 60)

    assert 200 == outcome.status_code


async def test_an_unknown_response_format_type_is_a_400(chat: Any) -> None:
    outcome = await chat.send(
        "/v1/chat/completions", chat_body("Hi.", max_tokens=4, response_format={"type": "xml"}), 60
    )

    assert 400 == outcome.status_code
    assert "response_format.type" == orjson.loads(outcome.body)["error"]["param"]


def log_softmax(logits: Any) -> Any:
    import numpy as np

    row = np.asarray(logits, dtype=np.float64)
    peak = row.max()
    return row - (peak + np.log(np.exp(row - peak).sum()))


def reference_steps(chat: Any, prompt: str, steps: int) -> list[tuple[bytes, Any]]:
    """A single sequence run alone through llama-cpp-python's `Llama`, on the very file the engine loaded, decoded
    greedily: each step's token and the log-softmax of the logits it was chosen from."""
    import numpy as np
    from llama_cpp import Llama

    # flash_attn as the engine has it (llama.cpp's default, auto, turns it on for this model on the CPU): it moves
    # logprobs by up to ~0.3 against plain attention.
    llama = Llama(
        str(chat.engine.loaded_path), n_ctx=1024, logits_all=True, flash_attn=True, verbose=False, n_threads=2
    )
    try:
        llama.eval(llama.tokenize(prompt.encode(), add_bos=True, special=True))
        found = []
        for _ in range(steps):
            row = log_softmax(llama.scores[llama.n_tokens - 1])
            token = int(np.argmax(row))
            found.append((llama.detokenize([token]), row))
            llama.eval([token])
        return found
    finally:
        llama.close()


async def test_chat_logprobs_are_the_models_own_and_the_chosen_token_tops_them_at_temperature_0(chat: Any) -> None:
    body = chat_body("Name three fruits.", max_tokens=12, temperature=0, logprobs=True, top_logprobs=5)
    crowd = [chat.send("/v1/chat/completions", chat_body(f"Count to {n}.", max_tokens=12), 60) for n in (3, 4, 5)]
    outcomes = await asyncio.gather(chat.send("/v1/chat/completions", body, 60), *crowd)  # in one continuous batch

    choice = orjson.loads(outcomes[0].body)["choices"][0]
    content = choice["logprobs"]["content"]
    assert choice["message"]["content"] == "".join(token["token"] for token in content)
    for token in content:
        tops = token["top_logprobs"]
        assert 5 == len(tops)
        assert token["logprob"] == max(top["logprob"] for top in tops)  # greedy: the chosen token is the likeliest
        assert token["bytes"] == tops[0]["bytes"]
        assert sum(math.exp(top["logprob"]) for top in tops) <= 1.0
        assert sorted((top["logprob"] for top in tops), reverse=True) == [top["logprob"] for top in tops]
    prompt = await asyncio.to_thread(chat.engine.format_chat, (("user", "Name three fruits."),))
    reference = await asyncio.to_thread(reference_steps, chat, prompt, len(content))
    assert [bytes(token["bytes"]) for token in content] == [piece for piece, _ in reference]
    for token, (_, row) in zip(content, reference, strict=True):
        expected = sorted(row.tolist(), reverse=True)[:5]
        assert expected == pytest.approx([top["logprob"] for top in token["top_logprobs"]], abs=0.01)
        assert expected[0] == pytest.approx(token["logprob"], abs=0.01)


async def test_completion_logprobs_have_openais_legacy_shape(chat: Any) -> None:
    body = {"model": "smollm2-135m-instruct", "prompt": "1, 2, 3,", "max_tokens": 6, "temperature": 0, "logprobs": 3}
    choice = orjson.loads((await chat.send("/v1/completions", orjson.dumps(body), 60)).body)["choices"][0]

    logprobs = choice["logprobs"]
    assert choice["text"] == "".join(logprobs["tokens"])
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"])
    assert len("1, 2, 3,") == logprobs["text_offset"][0]
    assert [3] * len(logprobs["tokens"]) == [len(top) for top in logprobs["top_logprobs"]]
    for chosen, logprob, top in zip(
        logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"], strict=True
    ):
        assert logprob == max(top.values())
        assert logprob == top[chosen]
        assert sum(math.exp(value) for value in top.values()) <= 1.0 + 1e-9


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"logprobs": 3}, "logprobs"),
    ],
)
async def test_bad_logprobs_parameters_are_a_400_naming_them(chat: Any, params: dict[str, Any], param: str) -> None:
    outcome = await chat.send("/v1/chat/completions", chat_body("Hi.", max_tokens=4, **params), 60)

    assert (400, param) == (outcome.status_code, orjson.loads(outcome.body)["error"]["param"])
