"""Usage, cost and SLA reports on a real `backfill serve` (docs/usage.md): the usage API's sums equal the sums of
the output files' usage per tenant and model, the batch object's usage agrees, costs follow the configured
prices, tenants see only their own, and `backfill usage` prints the same."""

from __future__ import annotations

import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from openai import OpenAI

from tests.acceptance.conftest import MODEL, StartServer
from tests.acceptance.helpers import Clients, chat_line, read_jsonl, start_batch, upload, wait_terminal
from tests.support.processes import Server, child_env

PRICES = {"model": MODEL, "input_per_million": 2.0, "output_per_million": 8.0}


@pytest.fixture
def connect() -> Iterator[Clients]:
    with Clients() as clients:
        yield clients


def new_key(server: Server, *args: str) -> str:
    out = subprocess.run(server.command("keys", "create", *args), env=child_env(), capture_output=True, check=True)
    return out.stdout.decode().strip().splitlines()[-1]


def report(server: Server, key: str, path: str, **params: Any) -> dict[str, Any]:
    answer = httpx.get(
        f"{server.base_url}/v1/organization/{path}",
        params=params,
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )
    assert 200 == answer.status_code, answer.text
    body: dict[str, Any] = answer.json()
    return body


def results(page: dict[str, Any]) -> list[dict[str, Any]]:
    assert "page" == page["object"]
    return [result for bucket in page["data"] for result in bucket["results"]]


def file_usage(client: OpenAI, file_id: str | None) -> Counter[str]:
    """input/output tokens and requests summed over an output file's lines."""
    sums: Counter[str] = Counter()
    for line in read_jsonl(client, file_id) if file_id else []:
        usage = line["response"]["body"].get("usage") or {}
        sums["input_tokens"] += usage.get("prompt_tokens", 0)
        sums["output_tokens"] += usage.get("completion_tokens", 0)
        sums["requests"] += 1
    return sums


def embeddings_batch(client: OpenAI, texts: list[str]) -> str:
    lines = [
        {"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings", "body": {"model": MODEL, "input": text}}
        for i, text in enumerate(texts)
    ]
    file_id = upload(client, lines)
    return client.batches.create(input_file_id=file_id, endpoint="/v1/embeddings", completion_window="24h").id


def test_usage_and_costs_equal_the_output_files_per_tenant_and_model(
    connect: Clients, start_server: StartServer
) -> None:
    server = start_server(prices=[PRICES])
    admin = new_key(server, "--tenant", "ops", "--admin")
    keys = {"research": new_key(server, "--tenant", "research"), "search": new_key(server, "--tenant", "search")}
    clients = {tenant: connect(server, key) for tenant, key in keys.items()}
    started = int(time.time())
    batch_ids = {
        "research": [
            start_batch(
                clients["research"], [chat_line(f"r{i}", f"question number {i} " * (i + 1)) for i in range(6)]
            ).id,
            embeddings_batch(clients["research"], ["one two three", "four five", "six"]),
        ],
        "search": [start_batch(clients["search"], [chat_line(f"s{i}", "short one") for i in range(3)]).id],
    }
    expected: dict[str, Counter[str]] = {}
    for tenant, ids in batch_ids.items():
        expected[tenant] = Counter()
        for batch_id in ids:
            batch = wait_terminal(clients[tenant], batch_id)
            assert "completed" == batch.status
            sums = file_usage(clients[tenant], batch.output_file_id)
            assert batch.usage is not None
            assert (sums["input_tokens"], sums["output_tokens"]) == (
                batch.usage.input_tokens,
                batch.usage.output_tokens,
            )
            expected[tenant] += sums

    page = report(
        server, admin, "usage/completions",
        start_time=started - 3600, bucket_width="1h", group_by="project_id,model", batch="true",
    )  # fmt: skip

    seen: dict[str, Counter[str]] = {}
    for result in results(page):
        assert MODEL == result["model"]
        counted = seen.setdefault(result["project_id"], Counter())
        counted["input_tokens"] += result["input_tokens"]
        counted["output_tokens"] += result["output_tokens"]
        counted["requests"] += result["num_model_requests"]
        assert result["dedicated_tokens"] == result["input_tokens"] + result["output_tokens"]
    assert expected == seen

    own = results(report(server, keys["search"], "usage/completions", start_time=started - 3600, bucket_width="1h"))
    assert expected["search"]["input_tokens"] == sum(result["input_tokens"] for result in own)

    costs = results(report(server, admin, "costs", start_time=started - 86400, group_by="project_id"))
    by_tenant = {result["project_id"]: result["amount"]["value"] for result in costs}
    research = expected["research"]
    wanted = (research["input_tokens"] * 2.0 + research["output_tokens"] * 8.0) * 0.5 / 1e6
    assert pytest.approx(wanted) == by_tenant["research"]

    slas = results(
        report(server, admin, "usage/batch_slas", start_time=started - 86400, group_by="project_id,completion_window")
    )
    research_sla = next(result for result in slas if result["project_id"] == "research")
    assert (2, 2, 0) == (
        research_sla["batches_ended"],
        research_sla["batches_in_window"],
        research_sla["lines_expired"],
    )
    assert research_sla["turnaround_p95_s"] is not None
    metrics = httpx.get(f"{server.base_url}/metrics", timeout=30).text
    assert 'backfill_batch_sla_batches_total{outcome="in_window",tenant="research",window="24h"} 2.0' in metrics
    assert 'backfill_batch_turnaround_seconds_count{tenant="search",window="24h"} 1.0' in metrics

    cli = subprocess.run(
        server.command("usage", "--since", "1d", "--by", "tenant,model"),
        env=child_env(), capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    research_row = next(line.split() for line in cli.stdout.splitlines() if line.startswith("research "))
    assert [str(research["requests"]), str(research["input_tokens"])] == research_row[2:4]


def test_interactive_requests_through_the_proxy_are_counted_for_their_tenant(
    connect: Clients, start_server: StartServer
) -> None:
    server = start_server()
    admin = new_key(server, "--tenant", "ops", "--admin")
    client = connect(server, new_key(server, "--tenant", "app"))
    started = int(time.time())

    answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello there"}])
    assert answer.usage is not None

    deadline = time.monotonic() + 15
    found: list[dict[str, Any]] = []
    while not found and time.monotonic() < deadline:  # written about once a second
        page = report(
            server, admin, "usage/completions",
            start_time=started - 60, bucket_width="1m", group_by="project_id,batch", batch="false",
        )  # fmt: skip
        found = results(page)
        time.sleep(0.2)
    assert [("app", False, 1, answer.usage.prompt_tokens, answer.usage.completion_tokens)] == [
        (r["project_id"], r["batch"], r["num_model_requests"], r["input_tokens"], r["output_tokens"]) for r in found
    ]


def test_a_tenant_key_cannot_see_another_tenants_usage(connect: Clients, start_server: StartServer) -> None:
    server = start_server()
    new_key(server, "--tenant", "ops", "--admin")
    mine, theirs = new_key(server, "--tenant", "mine"), new_key(server, "--tenant", "theirs")
    batch = start_batch(connect(server, theirs), [chat_line("x", "their line")])
    wait_terminal(connect(server, theirs), batch.id)

    page = report(server, mine, "usage/completions", start_time=int(time.time()) - 3600, project_ids="theirs")

    assert [] == results(page)
