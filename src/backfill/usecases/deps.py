"""What each family of use cases depends on — ports, settings and a clock, and nothing else. `Services`
(services.py) provides all of them in every role; a test may pass anything that does (an `InMemoryStore`, a fixed
clock), and no use case can reach the dispatcher, the metrics or the event loop."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from backfill.config import Settings
from backfill.ports import Backend, BlobStore, Store

T = TypeVar("T")


class BatchDeps(Protocol):
    """Batches and idempotency keys: the store, the settings, the time."""

    @property
    def store(self) -> Store: ...

    @property
    def settings(self) -> Settings: ...

    def now(self) -> int:
        """Unix seconds."""
        ...


class FileDeps(BatchDeps, Protocol):
    """Files, and batches built from files (retries): the blob store too."""

    @property
    def blobs(self) -> BlobStore: ...


class MessageBatchDeps(FileDeps, Protocol):
    """Message batches: also which models are served, by which backends (what each accepts), and a fine clock."""

    @property
    def backends(self) -> Sequence[Backend]: ...

    @property
    def clock(self) -> Callable[[], float]: ...

    def is_served(self, model: str) -> bool: ...

    async def offload(self, fn: Callable[..., T], /, *args: Any) -> T:
        """`fn(*args)` in a worker process, for CPU-bound work that would hold the event loop's GIL for long;
        `fn`, its arguments and its result (or exception) must pickle."""
        ...
