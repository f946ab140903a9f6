"""Wiring: build the store, blob store, backends and dispatcher from Settings (no hidden globals)."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
import structlog

from backfill.backends.openai_http import OpenAIHttpBackend
from backfill.batch_load import BatchLoad, LocalBatchLoad, SharedBatchLoad
from backfill.blobs import OwnedBlobStore, open_blob_store
from backfill.config import Settings
from backfill.dispatch.dispatcher import Dispatcher
from backfill.dispatch.webhooks import WebhookSender
from backfill.domain.webhooks import RetrySchedule
from backfill.interactive import InteractiveMeter
from backfill.interactive_usage import InteractiveUsage
from backfill.metrics import Metrics
from backfill.ports import Backend, Store
from backfill.store.engine import create_engine, create_read_engine, migrate
from backfill.store.sql import SqlStore
from backfill.usecases import webhooks

T = TypeVar("T")
log = structlog.get_logger(__name__)


def build_backends(settings: Settings) -> list[Backend]:
    """The configured backends; with none configured, the embedded CPU engine when backfill[local] is installed."""
    if settings.backends:
        return [OpenAIHttpBackend(backend) for backend in settings.backends]
    from backfill.backends.embedded.backend import is_available

    if not is_available():
        log.warning("no backends configured and backfill[local] is not installed: no model is served")
        return []
    from backfill.backends.embedded.backend import EmbeddedChatBackend, EmbeddedEmbeddingBackend

    return [
        EmbeddedChatBackend(
            slots=settings.embedded_chat_slots,
            context_per_slot=settings.embedded_context_per_slot,
            threads=settings.embedded_threads,
            weights=settings.embedded_chat_weights,
            cache_dir=settings.embedded_cache_dir,
        ),
        EmbeddedEmbeddingBackend(threads=settings.embedded_threads),
    ]


@dataclass
class Services:
    """What one process runs, built from Settings: the store, blob store and backends every role uses, and the
    dispatcher only where batch lines are dispatched (`--role api` has none)."""

    settings: Settings
    store: Store
    blobs: OwnedBlobStore
    backends: Sequence[Backend]
    dispatcher: Dispatcher | None
    metrics: Metrics
    clock: Callable[[], float] = time.time
    # The event loop the services were opened on: signal handlers reach the dispatcher through it.
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _run: asyncio.Task[None] | None = None
    _webhooks: asyncio.Task[None] | None = None
    # Interactive requests through the proxy, by backend: what the harvest controller reads.
    interactive: InteractiveMeter = field(init=False)
    # Their tokens, for the usage report: written every second or so by `run_usage_flusher`.
    interactive_usage: InteractiveUsage = field(init=False)
    _usage_stop: asyncio.Event = field(default_factory=asyncio.Event)
    _usage_flusher: asyncio.Task[None] | None = None
    # Batch lines in flight per backend, for the proxy's routing: this process's dispatcher's, or every worker's.
    batch_load: BatchLoad = field(init=False)
    # One worker process for CPU-bound use-case work (`offload`), started at its first use.
    _workers: ProcessPoolExecutor | None = None

    def __post_init__(self) -> None:
        self.interactive = InteractiveMeter(self.metrics)
        self.interactive_usage = InteractiveUsage(self.clock)
        self._served = frozenset(model for backend in self.backends for model in backend.models)
        if self.dispatcher is not None:
            self.dispatcher.interactive = self.interactive
            self.batch_load = LocalBatchLoad(self.dispatcher.core)
        else:
            stale_after_s = 5 * self.settings.engine_metrics_interval_s
            self.batch_load = SharedBatchLoad(self.store, self.clock, stale_after_s=stale_after_s)

    @classmethod
    async def open(
        cls,
        settings: Settings,
        *,
        backends: Sequence[Backend] | None = None,
        clock: Callable[[], float] = time.time,
        run_migrations: bool = True,
        dispatching: bool = True,
    ) -> Services:
        url = settings.effective_database_url
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        if run_migrations:
            await asyncio.to_thread(migrate, url)
        blobs = await open_blob_store(settings)  # first: a bucket that cannot be reached leaves nothing open
        store = SqlStore(create_engine(url, pool_size=settings.database_pool_size), create_read_engine(url))
        chosen = list(backends) if backends is not None else build_backends(settings)
        metrics = Metrics()
        metrics.observe_database(store.engine)
        dispatcher = Dispatcher(store, blobs, chosen, settings, clock=clock, metrics=metrics) if dispatching else None
        services = cls(settings, store, blobs, chosen, dispatcher, metrics, clock)
        try:
            await webhooks.sync_config_endpoints(services)
        except BaseException:
            await services.close()
            raise
        return services

    def now(self) -> int:
        return int(self.clock())

    def is_served(self, model: str) -> bool:
        """Some backend serves `model` (every role reads the same backends from the same config)."""
        return model in self._served

    def work_changed(self) -> None:
        """A batch was created or cancelled: the dispatcher in this process, if any, looks now (workers elsewhere
        see it at their next poll)."""
        if self.dispatcher is not None:
            self.dispatcher.wake()

    def start_dispatcher(self) -> None:
        if self.dispatcher is None:
            raise RuntimeError("this process was opened without a dispatcher")
        self._run = asyncio.create_task(self.dispatcher.run(self._stop))
        self._webhooks = asyncio.create_task(self._send_webhooks(self.dispatcher.owner))

    async def _send_webhooks(self, owner: str) -> None:
        """The outbox's sender, beside the dispatcher (never inside it: a slow receiver holds up no line)."""
        settings = self.settings
        timeout = httpx.Timeout(settings.webhook_timeout_s)
        schedule = RetrySchedule(
            settings.webhook_retry_base_s, settings.webhook_retry_max_s, settings.webhook_retry_for_s
        )
        async with httpx.AsyncClient(timeout=timeout, follow_redirects=False) as client:
            sender = WebhookSender(
                self.store, client, schedule, owner, self.clock,
                poll_interval_s=settings.webhook_poll_interval_s, timeout_s=settings.webhook_timeout_s,
                metrics=self.metrics,
            )  # fmt: skip
            await sender.run(self._stop)

    async def offload(self, fn: Callable[..., T], /, *args: Any) -> T:
        """`fn(*args)` in this process's worker process (spawned, not forked: this process runs threads). One
        worker: work offloaded at once queues, which bounds its memory and leaves a core to the event loop; it is
        replaced after each task, which gives back what the task's peak took."""
        if self._workers is None:
            self._workers = ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1
            )
        # Submitted from a thread: the first submit spawns the worker, which would hold up the event loop.
        return await asyncio.wrap_future(await asyncio.to_thread(self._workers.submit, fn, *args))

    def start_usage_flusher(self) -> None:
        """Write the proxy's usage counts in the background (API roles), until `close`."""
        self._usage_flusher = asyncio.create_task(self.interactive_usage.run(self.store, self._usage_stop))

    def stop_dispatcher(self) -> None:
        """Stop leasing now (SIGTERM); lines in flight get `shutdown_grace_s` while `close` waits for them."""
        self._stop.set()
        self.work_changed()

    async def close(self) -> None:
        if self._run is not None:
            self.stop_dispatcher()
            await self._run
        if self._webhooks is not None:
            await self._webhooks
        if self._usage_flusher is not None:
            self._usage_stop.set()
            await self._usage_flusher
        for backend in self.backends:
            await backend.close()
        if self._workers is not None:
            await asyncio.to_thread(self._workers.shutdown, wait=True, cancel_futures=True)
        self.blobs.close()
        await self.store.close()
