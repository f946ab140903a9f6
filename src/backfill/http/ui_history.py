"""The endpoints page's history: per backend, batch versus interactive load sampled in the API process into two
bounded rings (the last hour every `HOUR_STEP_S`, the last day every `DAY_STEP_S`).

What batch work does comes from `Services.batch_load`: lines in flight, the harvest ceiling and the TTFT baseline it
holds batch work to, the engine's queue and up/down, from this process's dispatcher (`--role all`) or from every
worker's reports through the database (`--role api`). Interactive load (requests in flight, TTFT) comes from this
process's metrics: the proxy runs here."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import structlog
from prometheus_client import CollectorRegistry

from backfill.domain.endpoint_report import EndpointReport
from backfill.http.background import in_background
from backfill.services import Services

log = structlog.get_logger(__name__)
HOUR_STEP_S = 2.0
DAY_STEP_S = 60.0


@dataclass(frozen=True)
class Sample:
    at: float
    backend: str
    batch_in_flight: int
    interactive_in_flight: int | None
    harvest_ceiling: float | None
    up: bool | None
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    engine_waiting: float | None = None  # requests in the engine's own queue
    ttft_baseline_s: float | None = None  # what the harvest controller holds interactive TTFT to


def quantile(bounds: Sequence[float], counts: Sequence[float], q: float) -> float | None:
    """The `q` quantile of observations counted per histogram bucket (upper `bounds`, not cumulative): the upper
    bound of the bucket it falls in; None with no observation."""
    total = sum(counts)
    if total <= 0:
        return None
    seen = 0.0
    for bound, count in zip(bounds, counts, strict=True):
        seen += count
        if seen >= q * total:
            return bound
    return bounds[-1]


class Ring:
    """The last `size` samples of each backend."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._samples: dict[str, deque[Sample]] = {}

    def add(self, sample: Sample) -> None:
        self._samples.setdefault(sample.backend, deque(maxlen=self.size)).append(sample)

    def since(self, start: float) -> dict[str, list[dict[str, object]]]:
        return {name: [asdict(s) for s in samples if s.at >= start] for name, samples in self._samples.items()}


class EndpointHistory:
    """Samples every backend every `step_s`; keeps an hour at that step and a day at `DAY_STEP_S`."""

    def __init__(self, services: Services, step_s: float = HOUR_STEP_S) -> None:
        self.services = services
        self.step_s = step_s
        self.hour = Ring(int(3600 / step_s) + 1)
        self.day = Ring(int(86400 / DAY_STEP_S) + 1)
        self._buckets: dict[str, list[float]] = {}  # backend -> cumulative TTFT bucket counts at the last sample
        self._day_at = 0.0

    def _value(self, registry: CollectorRegistry, name: str, backend: str) -> float | None:
        return registry.get_sample_value(name, {"backend": backend})

    def _ttft(self, registry: CollectorRegistry, backend: str) -> tuple[float | None, float | None]:
        bounds: list[float] = []
        cumulative: list[float] = []
        for metric in registry.collect():
            if metric.name != "backfill_interactive_ttft_seconds":
                continue
            for s in metric.samples:
                if s.name.endswith("_bucket") and s.labels.get("backend") == backend:
                    bounds.append(float(s.labels["le"]))
                    cumulative.append(s.value)
        if not bounds:
            return None, None
        previous = self._buckets.get(backend, [0.0] * len(cumulative))
        self._buckets[backend] = cumulative
        now_counts = [b - a for a, b in zip([0.0, *cumulative[:-1]], cumulative, strict=True)]
        then_counts = [b - a for a, b in zip([0.0, *previous[:-1]], previous, strict=True)]
        window = [now - then for now, then in zip(now_counts, then_counts, strict=True)]
        return quantile(bounds, window, 0.5), quantile(bounds, window, 0.99)

    async def sample(self) -> None:
        now = self.services.clock()
        registry = self.services.metrics.registry
        reports = await self.services.batch_load.reports()
        take_day = now - self._day_at >= DAY_STEP_S
        for backend in self.services.backends:
            name = backend.name
            report = reports.get(name, EndpointReport())
            up = self._value(registry, "backfill_backend_up", name)  # the proxy's view, where no worker reports
            interactive = self._value(registry, "backfill_interactive_in_flight", name)
            p50, p99 = self._ttft(registry, name)
            sample = Sample(
                at=now,
                backend=name,
                batch_in_flight=report.in_flight,
                interactive_in_flight=None if interactive is None else int(interactive),
                harvest_ceiling=report.ceiling,
                up=report.up if report.up is not None else None if up is None else up >= 1,
                ttft_p50_s=p50,
                ttft_p99_s=p99,
                engine_waiting=report.engine_waiting,
                ttft_baseline_s=report.ttft_baseline_s,
            )
            self.hour.add(sample)
            if take_day:
                self.day.add(sample)
        if take_day:
            self._day_at = now

    async def run(self) -> None:
        while True:
            try:
                await self.sample()
            except Exception as exc:  # the database is away: the next sample tries again
                log.warning("ui.sample_failed", error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(self.step_s)

    def running(self) -> contextlib.AbstractAsyncContextManager[None]:
        """`run` in the background while the block runs."""
        return in_background(self.run())
