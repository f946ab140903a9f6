"""Batch work per backend as an API process sees it: from the dispatcher in this process, or, in an API replica with
the dispatchers elsewhere, from what the workers publish in the database. Lines in flight choose the proxy's
backend; the whole report (ceiling, engine queue, up, TTFT baseline) feeds the dashboard's endpoints page."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

from backfill.core.dispatch import DispatchCore
from backfill.domain.endpoint_report import EndpointReport
from backfill.ports import WorkerBoard


class BatchLoad(Protocol):
    async def in_flight(self) -> Mapping[str, int]:
        """Batch lines in flight per backend name (a backend with none may be missing)."""
        ...

    async def reports(self) -> Mapping[str, EndpointReport]:
        """What the dispatchers know of each backend (a backend none reports on is missing)."""
        ...


class LocalBatchLoad:
    """The dispatcher runs in this process: its own count, exact at every moment."""

    def __init__(self, core: DispatchCore) -> None:
        self.core = core

    async def in_flight(self) -> Mapping[str, int]:
        return self.core.batch_in_flight()

    async def reports(self) -> Mapping[str, EndpointReport]:
        return self.core.endpoint_reports()


class SharedBatchLoad:
    """Every live worker's figures, as they publish them about once a second; read at most once per `max_age_s`."""

    def __init__(
        self, board: WorkerBoard, clock: Callable[[], float], *, max_age_s: float = 1.0, stale_after_s: float = 5.0
    ) -> None:
        self.board = board
        self.clock = clock
        self.max_age_s = max_age_s
        self.stale_after_s = stale_after_s
        self._read_at = -float("inf")
        self._reports: Mapping[str, EndpointReport] = {}
        self._counts: Mapping[str, int] = {}

    async def in_flight(self) -> Mapping[str, int]:
        await self.reports()
        return self._counts

    async def reports(self) -> Mapping[str, EndpointReport]:
        now = self.clock()
        if now - self._read_at >= self.max_age_s:
            self._reports = await self.board.endpoint_reports(now, self.stale_after_s)
            self._counts = {backend: report.in_flight for backend, report in self._reports.items()}
            self._read_at = now
        return self._reports
