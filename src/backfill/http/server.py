"""Run the app under uvicorn, with a stop signal reaching the dispatcher at once."""

from __future__ import annotations

import contextlib
import errno
import gc
import socket
from types import FrameType

import uvicorn
from fastapi import FastAPI

from backfill.config import Settings
from backfill.errors import ConfigError
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


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here rather than by uvicorn so that a taken port is a one-line ConfigError
    naming the fix instead of uvicorn's log record and exit."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: unknown address ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"cannot listen on {host}:{port}: the port is already in use (another `backfill serve`?). "
                "Stop that process or choose another port with --port or BACKFILL_PORT."
            ) from None
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock


_YOUNG_COLLECTION_ALLOCATIONS = 50_000


def run_server(app: FastAPI, settings: Settings) -> None:
    """Serve `app` on settings.host:port until SIGTERM/SIGINT; returns once the app has shut down. Raises
    ConfigError, before anything starts, if the address cannot be listened on."""
    sock = bind(settings.host, settings.port)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="warning",
        log_config=None,  # uvicorn's records go through the process's logging (JSON lines), not its own format
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
    # Young objects are collected every 50,000 allocations rather than Python's 700: a line in dispatch allocates a
    # few dozen short-lived dicts and tuples that reference counting frees, and at 700 the collector ran ~470 times
    # in a 20,000-line embeddings batch (67 ms, ~5 % of the batch, BENCHMARKS.md); at 50,000 it runs a handful of
    # times. Cyclic garbage waits a little longer for it, bounded by the same count.
    gc.set_threshold(_YOUNG_COLLECTION_ALLOCATIONS, *gc.get_threshold()[1:])
    _Server(config, app).run(sockets=[sock])
