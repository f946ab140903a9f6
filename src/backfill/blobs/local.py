"""LocalBlobStore: one file per blob under a directory; writes land atomically (temp file, fsync, rename)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio

_KEEP_OPEN = 64
# Output files are written a line at a time: an embeddings result (~15 KB at 768 floats) is larger than the default
# buffer, so each went to the kernel in a write of its own.
_WRITE_BUFFER_BYTES = 1 << 20


class LocalBlobWriter:
    def __init__(self, final: Path, tmp: Path) -> None:
        self._final = final
        self._tmp = tmp
        self._fh = open(tmp, "wb", buffering=_WRITE_BUFFER_BYTES)  # noqa: SIM115 - closed in commit/abort
        self._size = 0

    @property
    def size(self) -> int:
        return self._size

    def write(self, data: bytes) -> None:
        self._fh.write(data)
        self._size += len(data)

    async def commit(self) -> None:
        def finish() -> None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            os.replace(self._tmp, self._final)

        await asyncio.to_thread(finish)

    async def abort(self) -> None:
        self._fh.close()
        with contextlib.suppress(FileNotFoundError):
            self._tmp.unlink()


class LocalBlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._tmp = root / "tmp"
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._readers: OrderedDict[str, int] = OrderedDict()
        for stale in self._tmp.iterdir():  # uploads cut short by a crash
            stale.unlink(missing_ok=True)

    def _path(self, key: str) -> Path:
        if not key or ".." in key.split("/") or key.startswith("/"):
            raise ValueError(f"bad blob key {key!r}")
        return self.root / key

    def open_writer(self, key: str) -> LocalBlobWriter:
        final = self._path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        return LocalBlobWriter(final, self._tmp / secrets.token_hex(8))

    def iter_chunks(self, key: str, chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
        with open(self._path(key), "rb") as fh:
            while chunk := fh.read(chunk_bytes):
                yield chunk

    async def stream(self, key: str, chunk_bytes: int = 1 << 16) -> AsyncIterator[bytes]:
        async with await anyio.open_file(self._path(key), "rb") as fh:
            while chunk := await fh.read(chunk_bytes):
                yield chunk

    async def read_range(self, key: str, offset: int, length: int) -> bytes:
        # Small reads from the page cache: cheaper inline than a thread hop.
        fd = self._readers.get(key)
        if fd is None:
            fd = os.open(self._path(key), os.O_RDONLY)
            self._readers[key] = fd
            if len(self._readers) > _KEEP_OPEN:
                os.close(self._readers.popitem(last=False)[1])
        else:
            self._readers.move_to_end(key)
        return os.pread(fd, length, offset)

    async def delete(self, key: str) -> None:
        fd = self._readers.pop(key, None)
        if fd is not None:
            os.close(fd)
        self._path(key).unlink(missing_ok=True)

    async def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def close(self) -> None:
        while self._readers:
            os.close(self._readers.popitem()[1])
