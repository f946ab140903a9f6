"""Signed webhooks on real processes (docs/webhooks.md): a receiver on loopback verifies every delivery with the
openai SDK and the standardwebhooks package; a kill -9 between the terminal status and the delivery, and a receiver
that is down for a while, still get the event; distinct events never share a webhook-id; a receiver down past the
retry horizon leaves a dead letter in the admin API."""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import orjson
import pytest
from openai import OpenAI
from standardwebhooks.webhooks import Webhook

from backfill.domain.webhooks import new_secret
from backfill.testing.processes import free_port
from tests.acceptance.conftest import StartServer
from tests.acceptance.helpers import Clients, chat_line, start_batch, wait_for, wait_terminal
from tests.acceptance.message_batch_client import AnthropicClients, message, wait_ended
from tests.support.processes import Server, Upstream, child_env

# Seconds, not the production minutes and hours: tries every 0.2 s doubling to 1 s.
FAST = {
    "webhook_poll_interval_s": 0.1,
    "webhook_retry_base_s": 0.2,
    "webhook_retry_max_s": 1.0,
    "webhook_timeout_s": 2.0,
}
WAIT_S = 60.0


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes

    @property
    def event(self) -> dict[str, Any]:
        payload: dict[str, Any] = orjson.loads(self.body)
        return payload


@dataclass
class Receiver:
    """A webhook receiver on a loopback port: answers `status` to every POST (after `hold` is set, if it is not),
    and records what it accepted (2xx) and every try it saw."""

    port: int = field(default_factory=free_port)
    status: int = 204
    accepted: list[Received] = field(default_factory=list)
    tries: list[Received] = field(default_factory=list)
    hold: threading.Event | None = None
    changed: threading.Condition = field(default_factory=threading.Condition)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                seen = Received({key.lower(): value for key, value in self.headers.items()}, body)
                with receiver.changed:
                    receiver.tries.append(seen)
                    receiver.changed.notify_all()
                if receiver.hold is not None:
                    receiver.hold.wait(WAIT_S)
                status = receiver.status
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()
                if 200 <= status < 300:
                    with receiver.changed:
                        receiver.accepted.append(seen)
                        receiver.changed.notify_all()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def wait(self, done: Callable[[Receiver], bool], what: str) -> None:
        with self.changed:
            if not self.changed.wait_for(lambda: done(self), WAIT_S):
                raise TimeoutError(f"the receiver never saw {what}: tries {[t.event for t in self.tries]}")


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    made = Receiver()
    yield made
    if made.hold is not None:
        made.hold.set()
    made.stop()


@pytest.fixture
def connect() -> Iterator[Clients]:
    with Clients() as clients:
        yield clients


def admin(server: Server, method: str, path: str, body: Any = None) -> Any:
    response = httpx.request(method, f"{server.base_url}/v1/admin{path}", json=body, timeout=30)
    response.raise_for_status()
    return response.json()


def add_endpoint(server: Server, url: str, tenant: str = "default") -> str:
    """Its secret (shown only at creation)."""
    created = admin(server, "POST", f"/tenants/{tenant}/webhooks", {"url": url})
    assert created["secret"].startswith("whsec_")
    secret: str = created["secret"]
    return secret


def verified(received: Received, secret: str) -> dict[str, Any]:
    """The event, checked as a receiver would: by the openai SDK and by the standardwebhooks package."""
    payload: dict[str, Any] = Webhook(secret).verify(received.body, received.headers)
    if payload["type"].startswith("batch."):  # OpenAI's own event types: parsed into the SDK's event models
        unwrapped = OpenAI(api_key="unused").webhooks.unwrap(received.body, received.headers, secret=secret)
        assert (payload["id"], payload["type"]) == (unwrapped.id, unwrapped.type)
    else:
        OpenAI(api_key="unused").webhooks.verify_signature(received.body, received.headers, secret=secret)
    assert received.headers["webhook-id"] == payload["id"]
    return payload


def test_completed_and_cancelled_batches_are_delivered_signed_with_distinct_ids(
    connect: Clients, start_server: StartServer, upstream: Upstream, receiver: Receiver
) -> None:
    server = start_server(**FAST)
    receiver.start()
    secret = add_endpoint(server, receiver.url)
    client = connect(server)
    done = start_batch(client, [chat_line("a", "hello"), chat_line("b", "world")])
    gate = uuid.uuid4().hex
    held = start_batch(client, [chat_line("held", f"wait #gate:{gate}")])
    wait_for(client, held.id, lambda batch: batch.status == "in_progress")
    client.batches.cancel(held.id)
    upstream.open_gate(gate)
    wait_terminal(client, done.id)
    wait_terminal(client, held.id)

    receiver.wait(lambda r: len(r.accepted) >= 2, "two events")

    events = {event["data"]["id"]: event for event in (verified(got, secret) for got in receiver.accepted)}
    assert {done.id: "batch.completed", held.id: "batch.cancelled"} == {k: v["type"] for k, v in events.items()}
    assert 2 == len({event["id"] for event in events.values()})
    assert {"id", "object", "created_at", "type", "data"} == set(events[done.id])
    assert "event" == events[done.id]["object"]


def test_kill_9_between_terminal_status_and_delivery_still_delivers_after_restart(
    connect: Clients, start_server: StartServer, receiver: Receiver
) -> None:
    server = start_server(**FAST)
    receiver.hold = threading.Event()  # the first try hangs: the server dies while sending it
    receiver.status = 503
    receiver.start()
    secret = add_endpoint(server, receiver.url)
    batch = start_batch(connect(server), [chat_line("a", "hello")])

    receiver.wait(lambda r: len(r.tries) >= 1, "the first try")
    server.kill9()
    receiver.status = 204
    receiver.hold.set()
    restarted = start_server(data_dir=server.data_dir, **FAST)

    receiver.wait(lambda r: len(r.accepted) >= 1, "a delivery after the restart")
    event = verified(receiver.accepted[0], secret)
    assert ("batch.completed", batch.id) == (event["type"], event["data"]["id"])
    assert receiver.tries[0].headers["webhook-id"] == event["id"]  # the same event, sent again
    assert "completed" == connect(restarted).batches.retrieve(batch.id).status


def test_a_receiver_down_for_a_while_gets_the_event_once_it_is_back(
    connect: Clients, start_server: StartServer, receiver: Receiver
) -> None:
    server = start_server(**FAST)
    secret = add_endpoint(server, receiver.url)  # nothing listens there yet
    batch = start_batch(connect(server), [chat_line("a", "hello")])
    wait_terminal(connect(server), batch.id)

    failed_tries = 0
    deadline = time.monotonic() + WAIT_S
    while failed_tries < 3:  # the server has tried, and failed, a few times
        assert time.monotonic() < deadline, "the delivery was never tried"
        pending = admin(server, "GET", "/webhooks/deliveries?state=pending")["data"]
        failed_tries = pending[0]["attempts"] if pending else 0
        time.sleep(0.05)  # polling the admin API for a condition, as wait_for does the batch
    assert "ConnectError" in pending[0]["last_error"]
    receiver.start()

    receiver.wait(lambda r: len(r.accepted) >= 1, "the event once back")
    event = verified(receiver.accepted[0], secret)
    assert (batch.id, pending[0]["event"]["id"]) == (event["data"]["id"], event["id"])


def test_a_delivery_past_the_retry_horizon_is_dead_lettered_and_can_be_sent_again(
    connect: Clients, start_server: StartServer, receiver: Receiver
) -> None:
    server = start_server(**{**FAST, "webhook_retry_for_s": 1.0})
    receiver.status = 500
    receiver.start()
    add_endpoint(server, receiver.url)
    batch = start_batch(connect(server), [chat_line("a", "hello")])

    deadline = time.monotonic() + WAIT_S
    while not (dead := admin(server, "GET", "/webhooks/dead")["data"]):
        assert time.monotonic() < deadline, "nothing was dead-lettered"
        time.sleep(0.05)
    receiver.status = 204
    admin(server, "POST", f"/webhooks/dead/{dead[0]['id']}/retry")

    receiver.wait(lambda r: len(r.accepted) >= 1, "the dead letter sent again")
    assert (batch.id, "HTTP 500: ") == (dead[0]["event"]["data"]["id"], dead[0]["last_error"])
    assert dead[0]["event"]["id"] == receiver.accepted[0].headers["webhook-id"]
    assert [] == admin(server, "GET", "/webhooks/dead")["data"]


def test_endpoints_through_the_cli(start_server: StartServer) -> None:
    server = start_server()

    def cli(*args: str) -> str:
        done = subprocess.run(
            server.command("webhooks", *args), env=child_env(), capture_output=True, text=True, check=True, timeout=120
        )
        return done.stdout

    secret = cli("create", "http://127.0.0.1:9/hook", "--tenant", "default").strip()
    [listed] = orjson.loads(cli("list", "--json"))
    shown = admin(server, "GET", "/tenants/default/webhooks")["data"]
    cli("delete", listed["id"], "--tenant", "default")

    assert secret.startswith("whsec_")
    assert [listed] == shown
    assert "secret" not in listed
    assert [] == admin(server, "GET", "/tenants/default/webhooks")["data"]


def test_an_endpoint_from_the_config_file_gets_signed_events(
    connect: Clients, start_server: StartServer, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = new_secret()
    monkeypatch.setenv("TEST_HOOK_SECRET", secret)  # the server inherits it
    receiver.start()
    server = start_server(**FAST, webhooks=[{"url": receiver.url, "secret_env": "TEST_HOOK_SECRET"}])
    batch = start_batch(connect(server), [chat_line("a", "hello")])

    receiver.wait(lambda r: len(r.accepted) >= 1, "the event")

    assert batch.id == verified(receiver.accepted[0], secret)["data"]["id"]
    [listed] = admin(server, "GET", "/tenants/default/webhooks")["data"]
    assert (receiver.url, True) == (listed["url"], listed["id"].startswith("whep_config_"))


def test_a_message_batch_that_ends_sends_message_batch_ended(start_server: StartServer, receiver: Receiver) -> None:
    server = start_server(**FAST)
    receiver.start()
    secret = add_endpoint(server, receiver.url)
    with AnthropicClients() as connect:
        client = connect(server)
        batch = client.messages.batches.create(requests=[message("a", "hello")])
        wait_ended(client, batch.id)

    receiver.wait(lambda r: len(r.accepted) >= 1, "the event")

    event = verified(receiver.accepted[0], secret)
    assert ("message_batch.ended", batch.id) == (event["type"], event["data"]["id"])


def test_a_batch_promoted_to_make_its_window_announces_batch_at_risk_once(
    connect: Clients, start_server: StartServer, upstream: Upstream, receiver: Receiver
) -> None:
    server = start_server(outlook_interval_s=0.3, **FAST)  # estimates refreshed well inside the window
    receiver.start()
    secret = add_endpoint(server, receiver.url)
    gate = uuid.uuid4().hex
    lines = [chat_line(f"quick-{i}", f"quick {i}") for i in range(4)] + [chat_line("held", f"held #gate:{gate}")]
    # A 4 s window is inside the promotion margin (a tenth of the window, at least 5 minutes) from the start.
    batch = start_batch(connect(server), lines, window="4s")

    receiver.wait(lambda r: any(got.event["type"] == "batch.at_risk" for got in r.accepted), "batch.at_risk")
    upstream.open_gate(gate)
    wait_terminal(connect(server), batch.id)
    receiver.wait(lambda r: any(got.event["type"] != "batch.at_risk" for got in r.accepted), "the batch's end")

    events = [verified(got, secret) for got in receiver.accepted]
    assert [batch.id] == [event["data"]["id"] for event in events if event["type"] == "batch.at_risk"]
    assert {batch.id} == {event["data"]["id"] for event in events}
