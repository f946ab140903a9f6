"""Run the app under uvicorn, with a stop signal reaching the dispatcher at once."""

from __future__ import annotations

import contextlib
import gc
from types import FrameType

import uvicorn
from fastapi import FastAPI

from backfill.config import Settings
from backfill.http.protocol import HttpLimits, guarded_protocol


class _Server(uvicorn.Server):
    """On SIGTERM/SIGINT uvicorn first drains open HTTP connections and only then runs the app's shutdown; the
    dispatcher must stop leasing the moment the signal arrives, not after the last proxy stream ends."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        services = getattr(self.app.state, "services", None)
        if services is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed already
                services.loop.call_soon_threadsafe(services.stop_dispatcher)
        super().handle_exit(sig, frame)


def run_server(app: FastAPI, settings: Settings) -> None:
    """Serve `app` on settings.host:port until SIGTERM/SIGINT; returns once the app has shut down."""
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=int(settings.cancel_grace_s) + 5,
        http=guarded_protocol(
            HttpLimits(settings.max_header_bytes, settings.header_timeout_s, settings.body_timeout_s)
        ),
    )
    # Everything imported and built so far lives as long as the process: frozen, the garbage collector's full
    # passes skip it. Unfrozen, a full pass walked it all (~100 ms with the event loop stopped, about once a minute
    # under load: every proxied stream stalled for it).
    gc.collect()
    gc.freeze()
    _Server(config, app).run()
