"""The dashboard's queries on SQLite and PostgreSQL, and its session over HTTP: cookie, CSRF, revocation, roles."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from backfill.config import Settings
from backfill.domain.batches import Batch, BatchApi, BatchStatus
from backfill.domain.keys import make_key
from backfill.http.app import create_app
from backfill.store.dashboard import BatchFilter, DashboardQueries
from backfill.store.sql import SqlStore
from tests.support.store_data import NOW, failed, running_batch


def a_batch(batch_id: str, tenant_id: str, **fields: object) -> Batch:
    values: dict[str, object] = {
        "endpoint": "/v1/chat/completions",
        "input_file_id": f"file-{batch_id}",
        "completion_window": "24h",
        "status": BatchStatus.IN_PROGRESS,
        "created_at": 1000,
        "expires_at": 90000,
        "model": "m1",
    } | fields
    return Batch(id=batch_id, tenant_id=tenant_id, **values)  # type: ignore[arg-type]


async def test_the_list_holds_every_api_and_filters_by_tenant_status_model_and_metadata(sql_store: SqlStore) -> None:
    a = await sql_store.ensure_tenant("a", 1000)
    b = await sql_store.ensure_tenant("b", 1000)
    await sql_store.create_batch(a_batch("batch_openai", a, metadata={"team": "eval"}))
    await sql_store.create_batch(a_batch("msgbatch_anthropic", a, api=BatchApi.ANTHROPIC, model="m2"))
    await sql_store.create_batch(a_batch("batch_done", b, status=BatchStatus.COMPLETED))
    queries = DashboardQueries(sql_store.engine)

    async def ids(where: BatchFilter) -> list[str]:
        return [batch.id for batch, _ in await queries.list_batches(where, 100)]

    assert ["batch_done", "msgbatch_anthropic", "batch_openai"] == await ids(BatchFilter())
    assert ["msgbatch_anthropic", "batch_openai"] == await ids(BatchFilter(tenant_id=a))
    assert ["batch_done"] == await ids(BatchFilter(status="completed"))
    assert ["msgbatch_anthropic"] == await ids(BatchFilter(model="m2"))
    assert ["batch_openai"] == await ids(BatchFilter(metadata='"team":"eval"'))
    assert [("batch_done", "b")] == [(x.id, name) for x, name in await queries.list_batches(BatchFilter(b), 10)]


async def test_failed_lines_are_grouped_by_error_code_with_examples(sql_store: SqlStore) -> None:
    batch = await running_batch(sql_store, 5)
    leased = await sql_store.lease_lines(batch.id, "w1", 5, NOW, 60.0)
    await sql_store.record("w1", [failed(leased[0]), failed(leased[1], None), failed(leased[2], None)])

    groups = await DashboardQueries(sql_store.engine).error_groups(batch.id, examples=1)

    assert [("timeout", 2, 1), ("http_400", 1, 1)] == [(g.code, g.count, len(g.examples)) for g in groups]


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[FastAPI]:
    settings = Settings(data_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'backfill.db'}")
    app = create_app(settings, backends=[], run_dispatcher=False)
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
async def http(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://backfill") as client:
        yield client


async def signed_in(app: FastAPI, http: httpx.AsyncClient) -> tuple[str, str, httpx.Response]:
    """A tenant key, its id, and the answer to signing in with it."""
    store = app.state.services.store
    key = make_key()
    key_id = await store.add_api_key(await store.ensure_tenant("a", 1000), key, 1000)
    return key.plaintext, key_id, await http.post("/ui/api/login", json={"key": key.plaintext})


async def test_signing_in_sets_an_httponly_same_site_strict_cookie(app: FastAPI, http: httpx.AsyncClient) -> None:
    _, _, answer = await signed_in(app, http)
    cookie = answer.headers["set-cookie"].lower()

    assert 200 == answer.status_code
    assert {"httponly", "samesite=strict", "path=/ui"} <= {part.strip() for part in cookie.split(";")}
    assert {"tenant": "a", "admin": False} == {k: v for k, v in answer.json().items() if k != "csrf"}
    assert 200 == (await http.get("/ui/api/batches")).status_code


async def test_a_wrong_key_does_not_sign_in(app: FastAPI, http: httpx.AsyncClient) -> None:
    await signed_in(app, http)  # keys exist: open mode is over
    http.cookies.clear()

    assert 401 == (await http.post("/ui/api/login", json={"key": "bf-nope"})).status_code
    assert 401 == (await http.get("/ui/api/batches")).status_code


async def test_actions_need_the_sessions_csrf_token(app: FastAPI, http: httpx.AsyncClient) -> None:
    _, _, answer = await signed_in(app, http)
    csrf = answer.json()["csrf"]

    without = await http.post("/ui/api/batches/batch_none/cancel")
    wrong = await http.post("/ui/api/batches/batch_none/cancel", headers={"x-csrf-token": "guess"})
    right = await http.post("/ui/api/batches/batch_none/cancel", headers={"x-csrf-token": csrf})

    assert (403, 403, 404) == (without.status_code, wrong.status_code, right.status_code)


async def test_revoking_the_key_ends_its_sessions(app: FastAPI, http: httpx.AsyncClient) -> None:
    _, key_id, _ = await signed_in(app, http)
    await app.state.services.store.revoke_key(key_id, 2000)

    assert 401 == (await http.get("/ui/api/session")).status_code


async def test_signing_out_drops_the_cookie(app: FastAPI, http: httpx.AsyncClient) -> None:
    await signed_in(app, http)
    await http.post("/ui/api/logout")

    assert 401 == (await http.get("/ui/api/session")).status_code


async def test_the_pages_load_only_their_own_files(http: httpx.AsyncClient) -> None:
    page = await http.get("/ui/batches/batch_x")
    script = await http.get("/ui/static/app.js")

    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert "/ui/static/app.js" in page.text
    assert "http" not in script.text.replace("http.", "").replace("history", "")
    assert 404 == (await http.get("/ui/static/../config.py")).status_code


async def test_a_worker_serves_no_dashboard(tmp_path: Path) -> None:
    engine = {"name": "e", "url": "http://127.0.0.1:9", "models": ["m"]}
    settings = Settings(
        data_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'w.db'}", role="worker", backends=[engine]
    )
    worker = create_app(settings, backends=[], run_dispatcher=False)
    async with (
        worker.router.lifespan_context(worker),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=worker), base_url="http://backfill") as client,
    ):
        assert 404 == (await client.get("/ui")).status_code


async def test_signing_in_takes_json_only(http: httpx.AsyncClient) -> None:
    """A cross-site form cannot post JSON without a preflight: sign-in CSRF is refused."""
    form = await http.post("/ui/api/login", content=b'{"key": ""}', headers={"content-type": "text/plain"})

    assert 400 == form.status_code
