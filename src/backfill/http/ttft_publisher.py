"""An API replica whose dispatchers run elsewhere (`--role api`): its proxy's interactive TTFT samples, published in
the database about once a second for the workers' harvest controllers (domain/proxy_ttft.py). With `--role all`
the controller reads the proxy's meter in the same process and nothing is published."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import structlog

from backfill import ids
from backfill.domain.proxy_ttft import SampleLog
from backfill.http.background import in_background
from backfill.services import Services

log = structlog.get_logger(__name__)


class TtftPublisher:
    def __init__(self, services: Services, owner: str | None = None) -> None:
        self.services = services
        self.owner = owner or ids.new_id("api_", 8)
        self.interval_s = services.settings.engine_metrics_interval_s
        self.log = SampleLog()

    async def publish(self) -> None:
        """The samples measured since the last call, added to what is published, and published."""
        services = self.services
        for backend in services.backends:
            self.log.add(backend.name, services.interactive.drain_ttft(backend.name))
        await services.store.share_ttft(self.owner, self.log.published(), services.clock(), 5 * self.interval_s)

    async def run(self) -> None:
        while True:
            try:
                await self.publish()
            except Exception as exc:  # the database is away: the samples wait in the log for the next round
                log.warning("proxy.ttft_publish_failed", error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(self.interval_s)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """`run` in the background while the block runs; the samples are withdrawn when it ends."""
        try:
            async with in_background(self.run()):
                yield
        finally:
            with contextlib.suppress(Exception):  # a row left behind goes stale in a few seconds anyway
                await self.services.store.forget_rates(self.owner)
