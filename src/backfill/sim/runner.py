"""Runs the engine model in real time: one asyncio task steps it and sleeps each iteration's modelled duration."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from backfill.sim.engine import EngineModel, SimRequest, TokenEvent
from backfill.sim.metrics import SimMetrics
from backfill.sim.profile import EngineProfile

# Timers overshoot by a fraction of a millisecond each step; carrying up to this much lag into the next sleep
# keeps the served throughput at the modelled one, while a longer stall (a busy CPU) is forgotten, not repaid.
_MAX_CARRIED_LAG_S = 0.05

# What a request's queue yields: an engine event, or None once the request was aborted.
EventQueue = asyncio.Queue[TokenEvent | None]


@dataclass(slots=True)
class _Listener:
    queue: EventQueue
    every_token: bool
    arrived_at: float


class EngineRunner:
    """The model, the task that drives it, and each request's queue of events."""

    def __init__(self, profile: EngineProfile) -> None:
        self.model = EngineModel(profile)
        self.metrics = SimMetrics(self.model, profile.model)
        self._time_scale = profile.time_scale
        self._listeners: dict[str, _Listener] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="backfill-sim-engine")
        self._task.add_done_callback(_report_crash)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def submit(self, request: SimRequest, every_token: bool) -> EventQueue:
        """Queue ``request``; its events arrive on the returned queue (only the last one unless ``every_token``)."""
        self.model.submit(request)
        queue: EventQueue = asyncio.Queue()
        self._listeners[request.id] = _Listener(queue, every_token, time.monotonic())
        self._wake.set()
        return queue

    def abort(self, request_id: str) -> None:
        """Drop the request from the engine and wake its reader with None; nothing happens once it finished."""
        listener = self._listeners.pop(request_id, None)
        if listener is not None:
            listener.queue.put_nowait(None)
        self.model.abort(request_id)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time()
        while True:
            result = self.model.step()
            if result is None:
                self._wake.clear()
                await self._wake.wait()
                deadline = loop.time()
                continue
            now = loop.time()
            if self._time_scale and now - deadline > _MAX_CARRIED_LAG_S:
                self.metrics.lost_seconds.inc(now - deadline - _MAX_CARRIED_LAG_S)
            # Requests that arrive during the sleep join the next iteration, as they would on a real engine.
            deadline = max(deadline, now - _MAX_CARRIED_LAG_S) + result.duration_s * self._time_scale
            await asyncio.sleep(deadline - now)
            self._deliver(result.events)

    def _deliver(self, events: tuple[TokenEvent, ...]) -> None:
        now = time.monotonic()
        scale = self._time_scale or 1.0  # latencies in modelled seconds; with no sleeping, wall seconds
        for event in events:
            listener = self._listeners.get(event.request_id)
            if listener is None:  # aborted while this iteration ran
                continue
            if event.is_first_token:
                self.metrics.time_to_first_token.observe((now - listener.arrived_at) / scale)
            if event.finish_reason is not None:
                del self._listeners[event.request_id]
                self.metrics.e2e_latency.observe((now - listener.arrived_at) / scale)
                listener.queue.put_nowait(event)
            elif listener.every_token:
                listener.queue.put_nowait(event)


def _report_crash(task: asyncio.Task[None]) -> None:
    # Without the engine task every request would wait forever: say why at once, not when the task is collected.
    if not task.cancelled() and task.exception() is not None:
        logging.getLogger(__name__).error("the simulated engine stopped", exc_info=task.exception())
