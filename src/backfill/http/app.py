"""create_app: the whole HTTP surface. Services are opened in the lifespan, on the server's event loop.

`settings.role` decides what a process runs: "api" serves every route and runs no dispatcher, "worker" runs the
dispatcher and serves only /healthz, /readyz and /metrics, "all" does both.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

import structlog
from fastapi import FastAPI
from sqlalchemy.engine import make_url

from backfill import __version__
from backfill.config import Settings
from backfill.http.auth import Authenticator
from backfill.http.errors import install_error_handlers
from backfill.http.openapi import install_document, operation_id
from backfill.http.request_ids import RequestIdMiddleware
from backfill.http.routes import (
    admin,
    batches,
    files,
    gemini,
    health,
    message_batches,
    models,
    proxy,
    responses,
    ui,
    usage,
)
from backfill.http.ttft_publisher import TtftPublisher
from backfill.http.ui_history import EndpointHistory
from backfill.http.ui_session import SessionSigner
from backfill.ports import Backend
from backfill.services import Services

log = structlog.get_logger(__name__)
DESCRIPTION = (
    "A self-hosted Batch API: OpenAI's Files and Batches, Anthropic's Message Batches, and OpenAI's online "
    "endpoints passed to the engines. Point the openai SDK at `http://HOST:PORT/v1` and the anthropic SDK at "
    "`http://HOST:PORT`."
)


async def started(settings: Settings, services: Services, *, serves_api: bool) -> dict[str, object]:
    """What a newcomer needs to know once the server is up: where, what it serves, with what, and who may call."""
    if settings.blob_store == "s3":
        blobs = f"s3://{settings.s3_bucket}/{settings.s3_prefix}"
    else:
        blobs = str(settings.blob_dir.resolve())
    if not serves_api:
        access = "none needed: a worker serves only /healthz, /readyz and /metrics"
    elif await services.store.count_api_keys() == 0:
        access = "open mode: no API keys yet, any client on this machine may call (`backfill keys create` ends it)"
    else:
        access = "API keys required"
    return {
        "url": settings.public_url or f"http://{settings.host}:{settings.port}",
        "role": settings.role,
        "database": make_url(settings.effective_database_url).render_as_string(hide_password=True),
        "blob_store": blobs,
        "backends": [f"{backend.name}: {', '.join(sorted(backend.models))}" for backend in services.backends],
        "access": access,
        "version": __version__,
    }


def create_app(
    settings: Settings,
    *,
    backends: Sequence[Backend] | None = None,
    clock: Callable[[], float] = time.time,
    run_dispatcher: bool | None = None,
    run_migrations: bool = True,
) -> FastAPI:
    """The app for `settings.role`; `run_dispatcher` overrides whether the dispatcher runs (tests)."""
    serves_api = settings.role in ("all", "api")
    dispatching = settings.role in ("all", "worker") if run_dispatcher is None else run_dispatcher

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = await Services.open(
            settings, backends=backends, clock=clock, run_migrations=run_migrations, dispatching=dispatching
        )
        app.state.services = services
        app.state.started_at = int(clock())  # `created` of the models listed at /v1/models
        app.state.authenticator = authenticator = Authenticator(services)
        if dispatching:
            services.start_dispatcher()
        log.info("backfill.started", **await started(settings, services, serves_api=serves_api))
        if serves_api:
            services.start_usage_flusher()
        try:
            if serves_api:
                app.state.ui_history = history = EndpointHistory(services)
                async with contextlib.AsyncExitStack() as stack:
                    await stack.enter_async_context(authenticator.running())
                    await stack.enter_async_context(history.running())
                    if not dispatching:  # the harvest controllers are in the workers: they get the proxy's TTFT
                        await stack.enter_async_context(TtftPublisher(services).running())
                    yield
            else:
                yield
        finally:
            await services.close()

    app = FastAPI(
        title="backfill",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # Swagger UI and ReDoc load their assets from a CDN: only /openapi.json is served
        redoc_url=None,
        generate_unique_id_function=operation_id,
    )
    app.state.ui_signer = SessionSigner.from_setting(settings.ui_secret)
    install_document(app)
    install_error_handlers(app)
    app.add_middleware(RequestIdMiddleware)
    app.include_router(health.router)
    if serves_api:
        # The proxy's routes first: a request is matched against the routes in order, and only interactive requests
        # wait for their answer's first token (~0.1 ms a request when they came last).
        for routes in (proxy, responses, files, batches, message_batches, models, admin, gemini, usage, ui):
            app.include_router(routes.router)
    return app
