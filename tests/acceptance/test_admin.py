"""Tenants and keys through the admin API and the CLI, on real processes (docs/tenants.md): admin-only access,
revocation seen by every process within 5 s, each quota refused in OpenAI's shape, and open mode's end."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.acceptance.conftest import StartServer
from tests.acceptance.helpers import Clients, chat_line, error_of, start_batch, wait_terminal
from tests.support.processes import Server, Upstream, child_env, sim_serving

REVOKED_WITHIN_S = 5.0


@pytest.fixture
def connect() -> Iterator[Clients]:
    with Clients() as clients:
        yield clients


def cli(server: Server, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        server.command(*args), env=child_env(), capture_output=True, text=True, check=True, timeout=120
    )


def new_key(server: Server, *args: str) -> str:
    return cli(server, "keys", "create", *args).stdout.strip().splitlines()[-1]


def admin_call(server: Server, key: str | None, method: str, path: str, body: Any = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, f"{server.base_url}/v1/admin{path}", json=body, headers=headers, timeout=30)


def refused_until(server: Server, key: str, deadline: float) -> float:
    """Poll `GET /v1/files` with `key` until it answers 401; when it did (monotonic)."""
    with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=10) as http:
        while time.monotonic() < deadline:
            if http.get("/v1/files").status_code == 401:
                return time.monotonic()
            time.sleep(0.05)
    raise TimeoutError(f"{server.base_url} still takes the revoked key")


def test_a_key_revoked_through_one_process_is_refused_by_another_within_5_s(
    connect: Clients, start_server: StartServer
) -> None:
    first = start_server()
    second = start_server(role="api", data_dir=first.data_dir)
    admin = new_key(first, "--tenant", "ops", "--admin")
    key = new_key(first, "--tenant", "research")
    for server in (first, second):  # each process now remembers the key
        assert [] == list(connect(server, key).files.list())
    key_id = admin_call(first, admin, "GET", "/keys?tenant=research").json()["data"][0]["id"]

    revoked = admin_call(first, admin, "POST", f"/keys/{key_id}/revoke")
    revoked_at = time.monotonic()
    refused_at = [refused_until(server, key, revoked_at + REVOKED_WITHIN_S) for server in (second, first)]

    assert 200 == revoked.status_code
    assert max(refused_at) - revoked_at < REVOKED_WITHIN_S
    assert [] == list(connect(second, admin).files.list())  # other keys go on working


def test_a_revoked_key_through_the_cli_and_a_rotated_one(connect: Clients, start_server: StartServer) -> None:
    server = start_server()
    key = new_key(server, "--tenant", "research")
    assert [] == list(connect(server, key).files.list())
    listed = cli(server, "keys", "list", "--tenant", "research").stdout

    rotated = cli(server, "keys", "rotate", key[:15])
    new = rotated.stdout.strip()
    deadline = time.monotonic() + REVOKED_WITHIN_S

    assert key[:15] in listed
    assert refused_until(server, key, deadline) < deadline
    assert [] == list(connect(server, new).files.list())


def test_the_admin_api_takes_admin_keys_only(connect: Clients, start_server: StartServer) -> None:
    server = start_server()
    admin = new_key(server, "--tenant", "ops", "--admin")
    tenant_key = new_key(server, "--tenant", "research")

    with pytest.raises(openai.PermissionDeniedError) as forbidden:
        connect(server, tenant_key).get("/admin/tenants", cast_to=httpx.Response)
    missing = admin_call(server, None, "GET", "/tenants")
    listed = admin_call(server, admin, "GET", "/tenants").json()

    assert {
        "message": "This operation needs an admin API key (`backfill keys create --admin`).",
        "type": "permission_error",
        "param": None,
        "code": "admin_key_required",
    } == error_of(forbidden.value)
    assert (401, "missing_api_key") == (missing.status_code, missing.json()["error"]["code"])
    assert ["ops", "research"] == [tenant["name"] for tenant in listed["data"]]
    assert [] == list(connect(server, admin).files.list())  # an admin key is a tenant's key too


def test_in_open_mode_the_admin_api_is_open_until_the_first_key(start_server: StartServer) -> None:
    server = start_server()

    created = admin_call(server, None, "POST", "/keys", {"tenant": "ops", "admin": True}).json()
    deadline = time.monotonic() + REVOKED_WITHIN_S
    while admin_call(server, None, "GET", "/tenants").status_code != 401:
        assert time.monotonic() < deadline, "open mode did not end"
        time.sleep(0.05)

    assert (True, "ops") == (created["admin"], created["tenant"])
    assert "open mode ends" in created["open_mode_ended"]["message"]
    assert 200 == admin_call(server, created["key"], "GET", "/tenants").status_code


def test_the_first_key_gives_open_mode_data_to_the_tenant_named(connect: Clients, start_server: StartServer) -> None:
    server = start_server()
    made_open = wait_terminal(connect(server), start_batch(connect(server), [chat_line("one", "open mode")]).id)

    created = cli(server, "keys", "create", "--tenant", "research", "--open-mode-tenant", "research")
    key = created.stdout.strip()

    assert "open mode ends" in created.stderr
    assert "1 batches made in open mode now belong to 'research'" in created.stderr
    assert [made_open.id] == [batch.id for batch in connect(server, key).batches.list()]


def quota_key(server: Server, **quotas: int) -> str:
    """A key of a fresh tenant with these quotas, set through the admin API."""
    admin = new_key(server, "--tenant", "ops", "--admin")
    name = f"t-{uuid.uuid4().hex[:8]}"
    assert 200 == admin_call(server, admin, "POST", "/tenants", {"name": name}).status_code
    updated = admin_call(server, admin, "POST", f"/tenants/{name}", quotas).json()
    assert quotas == {quota: updated[quota] for quota in quotas}
    return new_key(server, "--tenant", name)


def test_batches_in_progress_are_refused_over_the_quota(
    connect: Clients, start_server: StartServer, upstream: Upstream
) -> None:
    server = start_server()
    client = connect(server, quota_key(server, max_batches_in_progress=1))
    gate = uuid.uuid4().hex
    held = start_batch(client, [chat_line("held", f"wait #gate:{gate}")])

    with pytest.raises(openai.RateLimitError) as refused:
        start_batch(client, [chat_line("two", "second")])
    upstream.open_gate(gate)
    wait_terminal(client, held.id)
    after = start_batch(client, [chat_line("three", "third")])

    error = error_of(refused.value)
    assert ("rate_limit_error", "batch_limit_exceeded") == (error["type"], error["code"])
    assert "validating" == after.status


def test_batch_creates_per_minute_are_refused_with_a_retry_after(connect: Clients, start_server: StartServer) -> None:
    server = start_server()
    client = connect(server, quota_key(server, batch_creates_per_minute=1))
    start_batch(client, [chat_line("one", "first")])

    with pytest.raises(openai.RateLimitError) as refused:
        start_batch(client, [chat_line("two", "second")])

    error = error_of(refused.value)
    assert ("rate_limit_error", "rate_limit_exceeded") == (error["type"], error["code"])
    assert 0 < int(refused.value.response.headers["retry-after"]) <= 60


@pytest.mark.parametrize(
    "quota", [{"batch_tokens_per_minute": 5}, {"enqueued_token_limit": 5}], ids=["per_minute", "enqueued"]
)
def test_a_batch_over_a_token_quota_fails_with_token_limit_exceeded(
    connect: Clients, start_server: StartServer, quota: dict[str, int]
) -> None:
    server = start_server()
    client = connect(server, quota_key(server, **quota))

    batch = wait_terminal(client, start_batch(client, [chat_line("long", "many words " * 20)]).id)

    assert batch.errors is not None
    assert [("failed", "token_limit_exceeded")] == [(batch.status, error.code) for error in batch.errors.data]


FAIR_MODEL = "fair-sim"
# Four sequences at a time, 20 tokens each at ~10 ms a step: the engine, not the tenants, is the bottleneck.
FAIR_PROFILE = f"""
model = "{FAIR_MODEL}"
max_num_seqs = 4
output_len_dist = "fixed"
output_len_mean = 20
iteration_base_s = 0.01
"""


def test_weights_3_to_1_share_a_simulated_engine_about_3_to_1(
    connect: Clients, start_server: StartServer, tmp_path: Path
) -> None:
    with sim_serving(FAIR_PROFILE, tmp_path) as simulator:
        backend = {"name": "sim", "url": simulator, "models": [FAIR_MODEL], "max_concurrency": 4, "harvest": False}
        server = start_server(backends=[backend], poll_interval_s=0.1)
        cli(server, "tenants", "create", "heavy", "--weight", "3")
        cli(server, "tenants", "create", "light", "--weight", "1")
        clients = {name: connect(server, new_key(server, "--tenant", name)) for name in ("heavy", "light")}
        lines = [chat_line(f"line-{n}", f"line {n}", model=FAIR_MODEL) for n in range(150)]
        batches = {name: start_batch(client, lines).id for name, client in clients.items()}

        def done() -> dict[str, int]:
            found = {name: clients[name].batches.retrieve(batch_id) for name, batch_id in batches.items()}
            assert all(batch.status in ("validating", "in_progress") for batch in found.values())
            return {name: (b.request_counts.completed if b.request_counts else 0) for name, b in found.items()}

        deadline = time.monotonic() + 60
        start = done()
        while min(start.values()) == 0 and time.monotonic() < deadline:  # from when both are running
            time.sleep(0.05)
            start = done()
        while (now := done())["heavy"] - start["heavy"] < 90 and time.monotonic() < deadline:
            time.sleep(0.1)

    heavy, light = now["heavy"] - start["heavy"], now["light"] - start["light"]
    assert 2.0 <= heavy / max(light, 1) <= 4.5, f"heavy {heavy} lines, light {light} lines"
