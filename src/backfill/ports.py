"""The interfaces the core depends on; adapters implement them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Protocol, runtime_checkable

from backfill.domain.features import Feature
from backfill.domain.outcomes import Outcome


class Clock(Protocol):
    def __call__(self) -> float:
        """Seconds since the epoch."""
        ...


class BlobWriter(Protocol):
    """An upload in progress: nothing is visible under the key until `commit`."""

    @property
    def size(self) -> int: ...

    def write(self, data: bytes) -> None: ...

    async def commit(self) -> None: ...

    async def abort(self) -> None: ...


class BlobStore(Protocol):
    def open_writer(self, key: str) -> BlobWriter: ...

    def iter_chunks(self, key: str, chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
        """Blocking read, for worker threads (validation)."""
        ...

    def stream(self, key: str, chunk_bytes: int = 1 << 16) -> AsyncIterator[bytes]: ...

    async def read_range(self, key: str, offset: int, length: int) -> bytes: ...

    async def delete(self, key: str) -> None: ...

    async def exists(self, key: str) -> bool: ...


class Backend(Protocol):
    """Something that runs one request body on one endpoint path and says what happened."""

    name: str
    models: frozenset[str]
    max_concurrency: int

    async def send(self, endpoint: str, body: bytes, timeout_s: float) -> Outcome: ...

    async def close(self) -> None: ...


@runtime_checkable
class DeclaresFeatures(Protocol):
    """A backend that says which optional request features it accepts. One that does not is taken to accept them
    all: it refuses what it cannot do with an HTTP error, which fails that request."""

    features: frozenset[Feature]
