"""Webhooks' pure pieces: event types and bodies, secrets, the retry schedule, and the sender on fakes."""

from __future__ import annotations

import asyncio
import base64
import itertools
import time

import httpx
import orjson
import pytest
from openai import OpenAI
from pydantic import ValidationError
from standardwebhooks.webhooks import Webhook

from backfill.config import Settings, WebhookSettings
from backfill.dispatch.dispatcher import Dispatcher
from backfill.dispatch.webhooks import WebhookSender, signed_request
from backfill.domain.batches import BatchApi, BatchStatus
from backfill.domain.webhooks import (
    Delivery,
    DeliveryState,
    Event,
    RetrySchedule,
    WebhookEndpoint,
    at_risk_event,
    config_endpoint_id,
    ended_event,
    new_secret,
)
from backfill.errors import ConfigError
from backfill.metrics import Metrics
from backfill.testing import InMemoryBlobStore, InMemoryStore
from tests.support.store_data import NOW, running_batch

OUTCOMES = ("delivered", "failed", "dead")
DELIVERY = Delivery(7, Event("evt_1", "batch.completed", NOW, "batch_1"), "whep_1", "http://hook/", new_secret(), 0)


@pytest.mark.parametrize(
    ("api", "status", "expected"),
    [
        (BatchApi.OPENAI, BatchStatus.COMPLETED, "batch.completed"),
        (BatchApi.OPENAI, BatchStatus.FAILED, "batch.failed"),
        (BatchApi.OPENAI, BatchStatus.EXPIRED, "batch.expired"),
        (BatchApi.OPENAI, BatchStatus.CANCELLED, "batch.cancelled"),
        (BatchApi.ANTHROPIC, BatchStatus.CANCELLED, "message_batch.ended"),
        (BatchApi.ANTHROPIC, BatchStatus.COMPLETED, "message_batch.ended"),
    ],
)
def test_each_terminal_status_has_its_event(api: BatchApi, status: BatchStatus, expected: str) -> None:
    assert expected == ended_event(api, status)


def test_only_terminal_statuses_have_an_ended_event() -> None:
    with pytest.raises(ValueError, match="in_progress"):
        ended_event(BatchApi.OPENAI, BatchStatus.IN_PROGRESS)


def test_at_risk_event_names() -> None:
    assert ("batch.at_risk", "message_batch.at_risk") == (
        at_risk_event(BatchApi.OPENAI),
        at_risk_event(BatchApi.ANTHROPIC),
    )


def test_event_body_is_openais_event_object() -> None:
    expected = {"id": "evt_1", "object": "event", "created_at": NOW, "type": "batch.completed", "data": {"id": "b"}}
    assert expected == Event("evt_1", "batch.completed", NOW, "b").to_dict()


def test_secret_is_whsec_and_32_random_bytes() -> None:
    secret = new_secret()
    assert secret.startswith("whsec_")
    assert 32 == len(base64.b64decode(secret.removeprefix("whsec_")))
    assert secret != new_secret()


def test_endpoint_shows_its_secret_only_when_asked() -> None:
    endpoint = WebhookEndpoint("whep_1", "tenant_1", "http://hook/", "whsec_x", NOW)
    assert "secret" not in endpoint.to_dict()
    assert "whsec_x" == endpoint.to_dict(with_secret=True)["secret"]


def test_backoff_doubles_up_to_its_cap() -> None:
    schedule = RetrySchedule(base_s=5, max_s=60, retry_for_s=86400, jitter=0.1)
    assert [5, 10, 20, 40, 60, 60] == [schedule.delay_s(n) for n in range(1, 7)]
    assert 5.5 == pytest.approx(schedule.delay_s(1, rand=1.0))
    assert 60 == schedule.delay_s(10_000)


def test_retries_stop_at_the_horizon_with_one_last_try_on_it() -> None:
    schedule = RetrySchedule(base_s=5, max_s=3600, retry_for_s=86400, jitter=0)
    assert NOW + 100 + 5 == schedule.next_attempt_at(1, NOW, NOW + 100)
    assert NOW + 86400 == schedule.next_attempt_at(20, NOW, NOW + 86000)
    assert schedule.next_attempt_at(21, NOW, NOW + 86400) is None


def test_a_signed_request_verifies_with_standardwebhooks_and_the_openai_sdk() -> None:
    now = time.time()  # both check the timestamp against the real clock
    body, headers = signed_request(DELIVERY, now)

    assert DELIVERY.event.to_dict() == Webhook(DELIVERY.secret).verify(body, headers)
    event = OpenAI(api_key="unused").webhooks.unwrap(body, headers, secret=DELIVERY.secret)
    assert ("evt_1", "batch.completed", "batch_1") == (event.id, event.type, event.data.id)
    assert ("evt_1", str(int(now))) == (headers["webhook-id"], headers["webhook-timestamp"])


async def _sender(
    store: InMemoryStore, handler: httpx.MockTransport, clock: list[float], metrics: Metrics | None = None
) -> WebhookSender:
    client = httpx.AsyncClient(transport=handler)
    schedule = RetrySchedule(base_s=10, max_s=100, retry_for_s=1000, jitter=0)
    return WebhookSender(
        store, client, schedule, "sender", lambda: clock[0], poll_interval_s=1, timeout_s=25, metrics=metrics
    )


async def _completed_batch_with_endpoint(store: InMemoryStore) -> WebhookEndpoint:
    batch = await running_batch(store, 1)
    endpoint = WebhookEndpoint("whep_1", batch.tenant_id, "http://hook/", new_secret(), NOW)
    await store.add_webhook_endpoint(endpoint)
    await store.request_cancel(batch.tenant_id, batch.id, NOW)
    assert await store.claim_batch(batch.id, "w", NOW, 60.0)
    assert await store.finish_batch(batch.id, "w", BatchStatus.CANCELLED, [None, None], NOW)
    return endpoint


async def test_the_sender_retries_with_backoff_and_keeps_the_webhook_id() -> None:
    store = InMemoryStore()
    endpoint = await _completed_batch_with_endpoint(store)
    answers = itertools.chain([500, 503], itertools.repeat(204))
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(next(answers))

    clock = [float(NOW)]
    metrics = Metrics()
    sender = await _sender(store, httpx.MockTransport(handle), clock, metrics)

    tried = [await sender.send_due()]
    for at in (NOW + 9, NOW + 10, NOW + 29, NOW + 30, NOW + 100):
        clock[0] = float(at)
        tried.append(await sender.send_due())

    assert [1, 0, 1, 0, 1, 0] == tried
    assert 1 == len({request.headers["webhook-id"] for request in seen})
    last = seen[-1]
    OpenAI(api_key="unused").webhooks.verify_signature(
        last.content, last.headers, secret=endpoint.secret, tolerance=10**10
    )
    assert "batch.cancelled" == orjson.loads(last.content)["type"]
    assert [] == await store.list_deliveries(DeliveryState.DEAD)
    tries = {o: metrics.registry.get_sample_value("backfill_webhook_tries_total", {"outcome": o}) for o in OUTCOMES}
    assert {"delivered": 1.0, "failed": 2.0, "dead": None} == tries


async def test_the_sender_dead_letters_after_the_horizon() -> None:
    store = InMemoryStore()
    await _completed_batch_with_endpoint(store)
    clock = [float(NOW)]
    sender = await _sender(store, httpx.MockTransport(lambda request: httpx.Response(500, text="nope")), clock)

    while clock[0] < NOW + 2000:
        await sender.send_due()
        clock[0] += 5

    [dead] = await store.list_deliveries(DeliveryState.DEAD)
    # Tries at 0, 10, 30, 70, 150, then every 100 s to 950, and a last one on the horizon (1000).
    assert (14, "HTTP 500: nope") == (dead.attempts, dead.last_error)
    assert orjson.loads(orjson.dumps(dead.to_dict()))["event"]["type"] == "batch.cancelled"


async def test_a_receiver_that_does_not_answer_is_a_failed_try() -> None:
    store = InMemoryStore()
    await _completed_batch_with_endpoint(store)

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    clock = [float(NOW)]
    sender = await _sender(store, httpx.MockTransport(refuse), clock)

    assert 1 == await sender.send_due()
    clock[0] = NOW + 10.0
    [again] = await store.lease_deliveries("x", clock[0], 10, 30.0)
    assert 1 == again.attempts


def test_a_config_endpoint_needs_a_whsec_secret_in_its_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    entry = WebhookSettings(url="https://hooks.example/x", secret_env="HOOK_SECRET")
    secret = new_secret()
    monkeypatch.setenv("HOOK_SECRET", secret)
    assert secret == entry.secret()

    for bad in ("", "plain-text", "whsec_!!!"):
        monkeypatch.setenv("HOOK_SECRET", bad)
        with pytest.raises(ConfigError, match=r"\$HOOK_SECRET"):
            entry.secret()


def test_a_config_endpoints_id_is_stable_per_tenant_and_url() -> None:
    assert config_endpoint_id("a", "http://x/") == config_endpoint_id("a", "http://x/")
    assert config_endpoint_id("a", "http://x/") != config_endpoint_id("b", "http://x/")


async def test_a_promoted_or_at_risk_batch_is_announced_once() -> None:
    store = InMemoryStore()
    batch = await running_batch(store, 1)
    other = await running_batch(store, 1)
    await store.add_webhook_endpoint(WebhookEndpoint("whep_1", batch.tenant_id, "http://hook/", new_secret(), NOW))
    dispatcher = Dispatcher(store, InMemoryBlobStore(), [], Settings(), clock=lambda: float(NOW), owner="w")

    for _ in range(3):  # each outlook says so again
        await dispatcher._announce_at_risk([(batch.id, NOW + 99, "promoted"), (other.id, None, "on_track")], NOW)
    await dispatcher._announce_at_risk([(batch.id, NOW + 99, "at_risk")], NOW + 5)

    leased = await store.lease_deliveries("s", NOW + 10, 10, 30.0)
    assert [("batch.at_risk", batch.id, NOW)] == [(d.event.type, d.event.batch_id, d.event.created_at) for d in leased]


async def test_a_try_that_outlasts_its_timeout_is_a_failed_try() -> None:
    store = InMemoryStore()
    await _completed_batch_with_endpoint(store)
    answered = asyncio.Event()

    async def trickle(request: httpx.Request) -> httpx.Response:
        await answered.wait()  # never set: a receiver that never finishes its answer
        return httpx.Response(204)

    schedule = RetrySchedule(base_s=10, max_s=100, retry_for_s=1000, jitter=0)
    client = httpx.AsyncClient(transport=httpx.MockTransport(trickle))
    sender = WebhookSender(store, client, schedule, "s", lambda: float(NOW), poll_interval_s=1, timeout_s=0.05)

    assert 1 == await sender.send_due()
    [pending] = await store.list_deliveries(DeliveryState.PENDING)
    assert (1, "no answer within 0.05 s") == (pending.attempts, pending.last_error)


def test_a_misspelt_key_in_a_webhooks_entry_is_refused() -> None:
    with pytest.raises(ValidationError, match="secret_evn"):
        WebhookSettings.model_validate({"url": "https://hooks.example/x", "secret_evn": "HOOK_SECRET"})
