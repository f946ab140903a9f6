"""A test's handler served on a real loopback socket, so a backend reaches it through its own HTTP client.

The handler is written as for `httpx.MockTransport` (an `httpx.Request` in, an `httpx.Response` out, plain or
async), which keeps the tests short; the bytes in between travel over TCP, as they do to an engine.
"""

from __future__ import annotations

import asyncio
import inspect
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import httpx
from aiohttp import web
from aiohttp.test_utils import RawTestServer

Handler = Callable[[httpx.Request], httpx.Response | Awaitable[httpx.Response]]
RawHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]  # for what an httpx.Response cannot say
_HOP_BY_HOP = frozenset({"content-length", "transfer-encoding", "connection"})


class HandlerSlot:
    """The handler the server runs now (a test may swap it between requests)."""

    def __init__(self, handler: Handler | None = None) -> None:
        self.handler = handler

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        assert self.handler is not None, "no handler set"
        seen = httpx.Request(
            request.method, str(request.url), headers=list(request.headers.items()), content=await request.read()
        )
        answer = self.handler(seen)
        if inspect.isawaitable(answer):
            answer = await answer
        headers = {name: value for name, value in answer.headers.items() if name.lower() not in _HOP_BY_HOP}
        return web.Response(status=answer.status_code, body=answer.content, headers=headers)


async def never_answers(request: httpx.Request) -> httpx.Response:
    """A handler that keeps the request waiting until the client leaves or the server closes."""
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


def closed_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago and that nobody listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@asynccontextmanager
async def serving(handler: HandlerSlot | RawHandler) -> AsyncIterator[str]:
    """Serve `handler` on 127.0.0.1 (a free port) while the block runs; yields the base URL (no trailing slash).
    A handler whose client leaves is cancelled (`handler_cancellation`), so a test can wait for that."""
    server = RawTestServer(handler, host="127.0.0.1", handler_cancellation=True)
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()
