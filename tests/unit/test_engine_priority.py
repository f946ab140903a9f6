"""Batch lines carry a low engine priority to vLLM and SGLang (config `priority`: auto / on / off), to a fake
engine on a loopback socket: what goes over the wire, and what a refusal does."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import orjson
import pytest
from structlog.testing import capture_logs

from backfill.backends.openai_http import OpenAIHttpBackend, with_priority
from backfill.config import BackendSettings
from backfill.domain.outcomes import OutcomeKind
from tests.support.handler_server import Handler, HandlerSlot, serving

CHAT = "/v1/chat/completions"
LINE = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":5}'
REPLY = {"id": "chatcmpl-1", "object": "chat.completion", "choices": [], "usage": {"prompt_tokens": 1}}
# vLLM's answer to a non-zero priority without `--scheduling-policy priority`: the current error envelope, and the
# one of releases before it.
REFUSED = {
    "error": {
        "message": "Got priority 10 but Priority scheduling is not enabled.",
        "type": "BadRequestError",
        "param": None,
        "code": 400,
    }
}
REFUSED_OLD = {"object": "error", "message": REFUSED["error"]["message"], "type": "BadRequestError", "code": 400}


class Engine:
    """A fake server that records each body and answers like vLLM with or without priority scheduling."""

    def __init__(self, *, schedules_by_priority: bool, refusal: dict[str, Any] = REFUSED) -> None:
        self.schedules_by_priority = schedules_by_priority
        self.refusal = refusal
        self.bodies: list[bytes] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.bodies.append(request.content)
        if orjson.loads(request.content).get("priority", 0) != 0 and not self.schedules_by_priority:
            return httpx.Response(400, json=self.refusal)
        return httpx.Response(200, json=REPLY)

    @property
    def priorities(self) -> list[int | None]:
        return [orjson.loads(body).get("priority") for body in self.bodies]


MakeBackend = Callable[..., OpenAIHttpBackend]


@pytest.fixture
async def make_backend() -> AsyncIterator[MakeBackend]:
    made: list[OpenAIHttpBackend] = []
    slot = HandlerSlot()
    async with serving(slot) as url:

        def make(handler: Handler, **settings: Any) -> OpenAIHttpBackend:
            slot.handler = handler
            made.append(OpenAIHttpBackend(BackendSettings(name="gpu", url=url, models=["m"], **settings)))
            return made[-1]

        yield make
        for backend in made:
            await backend.close()


def test_the_field_is_spliced_into_a_compact_body() -> None:
    spliced = with_priority(LINE, 10)
    assert LINE[:-1] + b',"priority":10}' == spliced
    assert {**orjson.loads(LINE), "priority": 10} == orjson.loads(spliced)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"{}", {"priority": -10}),
        (b'{"model":"m","priority":3}', {"model": "m", "priority": -10}),  # the line's own value is replaced
        (b'{"content":"priority"}', {"content": "priority", "priority": -10}),
        (b' { "model": "m" }\n', {"model": "m", "priority": -10}),
    ],
)
def test_other_bodies_are_parsed_and_reserialised(body: bytes, expected: dict[str, Any]) -> None:
    assert expected == orjson.loads(with_priority(body, -10))


def test_a_body_that_is_not_an_object_is_left_alone() -> None:
    assert b"[1,2]" == with_priority(b"[1,2]", 10)


async def test_auto_sends_the_priority_and_learns_vllm_honours_it(make_backend: MakeBackend) -> None:
    engine = Engine(schedules_by_priority=True)
    backend = make_backend(engine, flavour="vllm")
    before = backend.priority_enabled

    outcome = await backend.send(CHAT, LINE, 30.0)

    assert (None, OutcomeKind.SUCCESS, True, [10]) == (
        before,
        outcome.kind,
        backend.priority_enabled,
        engine.priorities,
    )


@pytest.mark.parametrize("refusal", [REFUSED, REFUSED_OLD])
async def test_auto_resends_a_refused_line_at_once_and_stops_sending_the_priority(
    make_backend: MakeBackend, refusal: dict[str, Any]
) -> None:
    engine = Engine(schedules_by_priority=False, refusal=refusal)
    backend = make_backend(engine, flavour="vllm")

    with capture_logs() as logs:
        first = await backend.send(CHAT, LINE, 30.0)
        second = await backend.send(CHAT, LINE, 30.0)

    assert (OutcomeKind.SUCCESS, OutcomeKind.SUCCESS) == (first.kind, second.kind)
    assert REPLY == orjson.loads(first.body or b"")
    assert [10, None, None] == engine.priorities
    assert [LINE, LINE] == engine.bodies[1:]  # resent exactly as it came
    assert backend.priority_enabled is False
    assert 1 == sum(entry["event"] == "backend.priority_not_enabled" for entry in logs)


async def test_lines_refused_together_are_all_resent_and_logged_once(make_backend: MakeBackend) -> None:
    refused_all = asyncio.Event()
    calls = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if b'"priority"' not in request.content:
            return httpx.Response(200, json=REPLY)
        if calls == 4:
            refused_all.set()
        await refused_all.wait()  # four lines in flight with the priority before any refusal arrives
        return httpx.Response(400, json=REFUSED)

    backend = make_backend(handler, flavour="vllm")
    with capture_logs() as logs:
        outcomes = await asyncio.gather(*(backend.send(CHAT, LINE, 30.0) for _ in range(4)))

    assert [OutcomeKind.SUCCESS] * 4 == [outcome.kind for outcome in outcomes]
    assert 8 == calls
    assert 1 == sum(entry["event"] == "backend.priority_not_enabled" for entry in logs)


async def test_auto_passes_other_refusals_on(make_backend: MakeBackend) -> None:
    seen: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.content)
        return httpx.Response(400, json={"error": {"message": "max_tokens is too large", "type": "BadRequestError"}})

    backend = make_backend(handler, flavour="vllm")
    outcome = await backend.send(CHAT, LINE, 30.0)

    assert (OutcomeKind.HTTP_ERROR, 400, 1, None) == (
        outcome.kind,
        outcome.status_code,
        len(seen),
        backend.priority_enabled,
    )


async def test_on_reports_the_refusal_as_it_is(make_backend: MakeBackend) -> None:
    engine = Engine(schedules_by_priority=False)
    backend = make_backend(engine, flavour="vllm", priority="on", batch_priority=7)
    assert backend.priority_enabled is True

    outcome = await backend.send(CHAT, LINE, 30.0)

    assert (OutcomeKind.HTTP_ERROR, 400, [7]) == (outcome.kind, outcome.status_code, engine.priorities)
    assert REFUSED == orjson.loads(outcome.body or b"")


async def test_off_never_sends_it(make_backend: MakeBackend) -> None:
    engine = Engine(schedules_by_priority=True)
    backend = make_backend(engine, flavour="vllm", priority="off")

    await backend.send(CHAT, LINE, 30.0)

    assert ([LINE], False) == (engine.bodies, backend.priority_enabled)


async def test_sglang_gets_the_priority_negated_and_an_accepted_line_proves_nothing(make_backend: MakeBackend) -> None:
    engine = Engine(schedules_by_priority=True)
    backend = make_backend(engine, flavour="sglang")

    for endpoint in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        await backend.send(endpoint, LINE, 30.0)

    assert [-10, -10, -10] == engine.priorities
    assert backend.priority_enabled is None  # SGLang ignores a priority it does not schedule by


@pytest.mark.parametrize("flavour", ["openai", "llamacpp"])
@pytest.mark.parametrize("priority", ["auto", "on"])
async def test_servers_without_priorities_never_get_one(make_backend: MakeBackend, flavour: str, priority: str) -> None:
    engine = Engine(schedules_by_priority=True)
    backend = make_backend(engine, flavour=flavour, priority=priority)

    await backend.send(CHAT, LINE, 30.0)

    assert ([LINE], False) == (engine.bodies, backend.priority_enabled)


async def test_endpoints_without_the_field_and_a_zero_priority_are_sent_unchanged(make_backend: MakeBackend) -> None:
    engine = Engine(schedules_by_priority=True)
    zero = make_backend(engine, flavour="vllm", batch_priority=0)
    await make_backend(engine, flavour="vllm").send("/v1/moderations", LINE, 30.0)
    await zero.send(CHAT, LINE, 30.0)

    assert ([LINE, LINE], False) == (engine.bodies, zero.priority_enabled)


def test_priority_settings_default_to_auto_and_ten() -> None:
    settings = BackendSettings(name="b", url="http://b", models=["m"])
    assert ("auto", 10) == (settings.priority, settings.batch_priority)
    with pytest.raises(ValueError, match="priority"):
        BackendSettings(name="b", url="http://b", models=["m"], priority="sometimes")
