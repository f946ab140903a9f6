"""Once a second, read what the dispatch core's harvest needs: each engine's /metrics, the proxy's interactive
TTFT, and the other workers' batch-token counters (through the store, where this worker publishes its own). No
decisions here: the readings go to the core as one `EngineRead` (core/harvest.py says what they become)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence

import httpx
import structlog

from backfill.backends.engine_metrics import EngineMetrics
from backfill.config import Settings
from backfill.core.dispatch import DispatchCore
from backfill.core.events import Action, EngineRead
from backfill.domain.proxy_ttft import SampleReader
from backfill.interactive import InteractiveMeter
from backfill.metrics import Metrics
from backfill.ports import WorkerBoard

log = structlog.get_logger(__name__)


class EngineWatcher:
    def __init__(
        self,
        settings: Settings,
        core: DispatchCore,
        board: WorkerBoard,
        owner: str,
        clock: Callable[[], float],
        interactive: InteractiveMeter | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        """`transport`: how /metrics are fetched (tests script it); plain HTTP by default."""
        self.settings = settings
        self.core = core
        self.board = board
        self.owner = owner
        self.clock = clock
        self.interactive = interactive
        self.transport = transport
        self.metrics = metrics
        self._watched = [cfg for cfg in settings.backends if cfg.name in core.limits and EngineMetrics.supports(cfg)]
        self.harvested = set(core.harvest.harvested)
        # A worker of a split deployment publishes its load every round, harvested or not: API replicas elsewhere
        # route interactive requests by its lines in flight and draw the rest on the dashboard (batch_load.py).
        self.publish = settings.role == "worker"
        self.ttft_reader = SampleReader()  # what the API replicas' proxies measured, when they are elsewhere
        # Endpoints whose /metrics cannot be scraped: (since, why), logged once when it starts and when it ends.
        self.unreadable: dict[str, tuple[float, str]] = {}

    @property
    def active(self) -> bool:
        return bool(self._watched or self.harvested or self.publish)

    async def run(self, perform: Callable[[list[Action]], None]) -> None:
        """Read, hand the reading to the core, perform what it decides; every `engine_metrics_interval_s`."""
        if not self.active:
            return
        async with httpx.AsyncClient(transport=self.transport) as client:
            probes = [EngineMetrics(cfg, client) for cfg in self._watched]
            while True:
                perform(self.core.handle(await self.read(probes), self.clock()))
                await asyncio.sleep(self.settings.engine_metrics_interval_s)

    async def read(self, probes: Sequence[EngineMetrics] = ()) -> EngineRead:
        """One round of readings (this worker's counters published on the way)."""
        readings = await asyncio.gather(*(probe.load() for probe in probes))
        others = await self._share()
        ttft = {name: self.interactive.drain_ttft(name) for name in self.harvested} if self.interactive else {}
        for name, samples in (await self._proxy_ttft()).items():
            if name in self.harvested:
                ttft[name] = [*ttft.get(name, []), *samples]
        loads = {probe.name: load for probe, load in zip(probes, readings, strict=True)}
        self._note_unreadable(probes, loads)
        return EngineRead(loads, ttft, others)

    def _note_unreadable(self, probes: Sequence[EngineMetrics], loads: Mapping[str, object]) -> None:
        for probe in probes:
            load = loads.get(probe.name)
            if self.metrics is not None:
                self.metrics.engine_metrics_readable.labels(probe.name).set(load is not None)
                waiting = getattr(load, "waiting", None)
                if waiting is not None:
                    self.metrics.engine_waiting.labels(probe.name).set(waiting)
            if loads.get(probe.name) is not None:
                if self.unreadable.pop(probe.name, None) is not None:
                    log.info("backend.metrics_readable", backend=probe.name)
            elif probe.name not in self.unreadable:
                error = probe.error or "unreadable"
                self.unreadable[probe.name] = (self.clock(), error)
                log.warning("backend.metrics_unreadable", backend=probe.name, error=error)

    async def _proxy_ttft(self) -> dict[str, list[float]]:
        """A worker of a split deployment: the TTFT samples the API replicas' proxies measured since the last round
        (domain/proxy_ttft.py); nothing with the proxy in this process."""
        if not (self.publish and self.harvested):
            return {}
        try:
            published = await self.board.proxy_ttft(self.clock(), 5 * self.settings.engine_metrics_interval_s)
        except Exception:
            log.exception("watcher.proxy_ttft_failed")  # harvest on the engine's metrics until the database answers
            return {}
        return self.ttft_reader.take(published)

    async def _share(self) -> Mapping[str, Mapping[str, int]]:
        """The other live workers' batch-token counters per harvested backend; ours published for them."""
        if not (self.harvested or self.publish):
            return {}
        stale_after_s = 5 * self.settings.engine_metrics_interval_s
        reports = self.core.endpoint_reports() if self.publish else {}
        try:
            shared = await self.board.share_batch_tokens(
                self.owner, self.core.batch_token_counters(), self.clock(), stale_after_s, reports
            )
        except Exception:
            log.exception("watcher.share_failed")  # harvest as if alone until the database answers again
            return {}
        return {backend: {w: n for w, n in by.items() if w != self.owner} for backend, by in shared.items()}
