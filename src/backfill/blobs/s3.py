"""S3BlobStore: one object per blob under a bucket and prefix, on AWS S3 or any S3-compatible server.

The client is boto3 (the AWS SDK), its blocking calls run in worker threads. The BlobStore protocol is partly
blocking by design: validation and `backfill run` call `iter_chunks` and `BlobWriter.write` from worker threads,
which an asyncio-only client (aiobotocore, aioboto3) cannot serve without a second event loop; boto3 serves both
sides, and the async methods hop to a thread. Weight: boto3 with botocore, s3transfer, jmespath and
python-dateutil, about 35 MB installed (botocore's service models are most of it); aioboto3 would add aiohttp and
aiobotocore on top of the same botocore. Hence the `backfill[s3]` extra, not a core dependency.

Writes go to a local spool file, one per part (bounded memory whatever the upload's size): a blob smaller than one
part is a single PUT at `commit`; a larger one is a multipart upload whose parts go up in background threads while
the rest is still being written, completed at `commit` and aborted on `abort` or any failure, so nothing is ever
visible under a key until its commit. Buckets should still carry a lifecycle rule that aborts incomplete multipart
uploads after a day, for processes killed mid-upload.

Reads stream. `read_range` (one request line at a time, for the dispatcher) reads whole aligned blocks and keeps a
few: lines are read roughly in order, so one GET serves hundreds of them. Blobs are written once under fresh keys,
so a cached block never goes stale.

Credentials come from boto3's standard chain: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE and the
shared config files, or the instance's role. They need s3:ListBucket on the bucket (without it S3 answers 403, not
404, for a missing object) and s3:GetObject, s3:PutObject, s3:DeleteObject and s3:AbortMultipartUpload under the
prefix. A missing object raises FileNotFoundError, as LocalBlobStore does; every other failure, once boto3's retries
are spent (timeouts, refused connections, 5xx, throttling), raises errors.BlobStoreUnavailable: callers retry
later rather than take the file for unreadable.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from backfill.errors import BlobStoreUnavailable, ConfigError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef

MiB = 1 << 20
MIN_PART_BYTES = 5 * MiB  # S3's smallest part but the last
_MISSING = {"NoSuchKey", "404", "NotFound"}
_PART_THREADS = 4
_BLOCK_BYTES = MiB
_KEEP_BLOCKS = 16


def _is_missing(exc: ClientError) -> bool:
    return exc.response.get("Error", {}).get("Code") in _MISSING


@contextlib.contextmanager
def _unavailable(where: str) -> Iterator[None]:
    """botocore's errors, once its own retries are spent, as BlobStoreUnavailable."""
    try:
        yield
    except (ClientError, BotoCoreError) as exc:
        raise BlobStoreUnavailable(f"{where}: {exc}") from exc


class S3BlobWriter:
    """Spools to local files, one per part; full parts are uploaded by the store's part threads meanwhile."""

    def __init__(self, store: S3BlobStore, key: str) -> None:
        self._store = store
        self._key = key
        self._part = self._new_part()
        self._part_size = 0
        self._size = 0
        self._sealed: list[Future[CompletedPartTypeDef]] = []
        self._spools: list[IO[bytes]] = [self._part]
        self._upload_id: str | None = None
        self._upload_lock = threading.Lock()
        self._done = False

    @property
    def size(self) -> int:
        return self._size

    def _new_part(self) -> IO[bytes]:
        return tempfile.TemporaryFile(dir=self._store.spool_dir)  # closed once uploaded, or on abort

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            room = self._store.part_bytes - self._part_size
            self._part.write(view[:room])
            taken = min(room, len(view))
            self._part_size += taken
            self._size += taken
            view = view[taken:]
            if self._part_size == self._store.part_bytes:
                self._seal()

    def _seal(self) -> None:
        """Hand the full part to a part thread and start the next one; a part that already failed stops the write."""
        for sealed in self._sealed:
            if sealed.done() and sealed.exception() is not None:
                with _unavailable(f"s3://{self._store.bucket}/{self._key}"):
                    sealed.result()
        number = len(self._sealed) + 1
        self._sealed.append(self._store.part_pool.submit(self._upload_part, number, self._part))
        self._part = self._new_part()
        self._spools.append(self._part)
        self._part_size = 0

    def _ensure_upload(self) -> str:
        with self._upload_lock:
            if self._upload_id is None:
                created = self._store.client.create_multipart_upload(Bucket=self._store.bucket, Key=self._key)
                self._upload_id = created["UploadId"]
            return self._upload_id

    def _upload_part(self, number: int, spool: IO[bytes]) -> CompletedPartTypeDef:
        try:
            upload_id = self._ensure_upload()
            spool.seek(0)
            answer = self._store.client.upload_part(
                Bucket=self._store.bucket, Key=self._key, UploadId=upload_id, PartNumber=number, Body=spool
            )
            return {"PartNumber": number, "ETag": answer["ETag"]}
        finally:
            spool.close()

    async def commit(self) -> None:
        with _unavailable(f"s3://{self._store.bucket}/{self._key}"):
            await asyncio.to_thread(self._commit)

    def _commit(self) -> None:
        if self._done:
            raise RuntimeError(f"the upload of {self._key} has already ended")
        client, bucket = self._store.client, self._store.bucket
        if not self._sealed:
            self._done = True
            self._part.seek(0)
            try:
                client.put_object(Bucket=bucket, Key=self._key, Body=self._part)
            finally:
                self._part.close()
            return
        try:
            if self._part_size:
                self._seal()
            parts = [sealed.result() for sealed in self._sealed]
            upload_id = self._ensure_upload()
            client.complete_multipart_upload(
                Bucket=bucket, Key=self._key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
            self._done = True
        except BaseException:
            self._abort()
            raise
        finally:
            self._close_spools()

    async def abort(self) -> None:
        if self._done:
            return
        if not self._sealed:  # nothing sent yet: no need for a thread
            self._done = True
            self._close_spools()
            return
        await asyncio.to_thread(self._abort)

    def _abort(self) -> None:
        self._done = True
        for sealed in self._sealed:
            sealed.cancel()
        wait(self._sealed)  # a part still going up would otherwise land after the abort
        self._close_spools()
        if self._upload_id is not None:
            with contextlib.suppress(ClientError, BotoCoreError):  # already gone, or S3 is down (lifecycle rule)
                self._store.client.abort_multipart_upload(
                    Bucket=self._store.bucket, Key=self._key, UploadId=self._upload_id
                )

    def _close_spools(self) -> None:
        for spool in self._spools:
            spool.close()


class S3BlobStore:
    """Blobs under `s3://bucket/prefix`; `endpoint_url` for S3-compatible servers (MinIO, SeaweedFS, Ceph, …)."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        part_bytes: int = 8 * MiB,
        spool_dir: Path | None = None,
        client: S3Client | None = None,
    ) -> None:
        if part_bytes < MIN_PART_BYTES:
            raise ValueError(f"part_bytes must be at least {MIN_PART_BYTES} (S3's smallest part)")
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.part_bytes = part_bytes
        self.spool_dir = spool_dir
        if spool_dir is not None:
            spool_dir.mkdir(parents=True, exist_ok=True)
        # A session of its own: boto3's default one caches the credentials it found first, process-wide.
        self.client: S3Client = client or boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            config=Config(
                # A custom endpoint is addressed by path: bucket subdomains need DNS that local servers lack.
                s3={"addressing_style": "path" if endpoint_url else "auto"},
                retries={"mode": "standard", "max_attempts": 5},
                max_pool_connections=32,
            ),
        )
        self.part_pool = ThreadPoolExecutor(_PART_THREADS, thread_name_prefix="s3-part")
        self._blocks: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._loading: dict[tuple[str, int], asyncio.Future[bytes]] = {}

    def __repr__(self) -> str:
        return f"S3BlobStore(s3://{self.bucket}/{self.prefix})"

    async def check(self) -> None:
        """Refuse to start on a bucket that cannot be reached with these credentials."""
        try:
            await asyncio.to_thread(self.client.head_bucket, Bucket=self.bucket)
        except (ClientError, BotoCoreError) as exc:
            raise ConfigError(f"blob store s3://{self.bucket}/{self.prefix} is not usable: {exc}") from exc

    def object_key(self, key: str) -> str:
        """The object's key in the bucket: the prefix, then the same relative name LocalBlobStore uses."""
        if not key or ".." in key.split("/") or key.startswith("/"):
            raise ValueError(f"bad blob key {key!r}")
        return self.prefix + key

    def open_writer(self, key: str) -> S3BlobWriter:
        return S3BlobWriter(self, self.object_key(key))

    def _get(self, key: str, byte_range: str | None = None) -> Any:
        """The object's streaming body; FileNotFoundError when there is no such blob."""
        name = self.object_key(key)
        with self._translated(key):
            try:
                if byte_range is None:
                    return self.client.get_object(Bucket=self.bucket, Key=name)["Body"]
                return self.client.get_object(Bucket=self.bucket, Key=name, Range=byte_range)["Body"]
            except ClientError as exc:
                if _is_missing(exc):
                    raise FileNotFoundError(f"no blob {key!r} in s3://{self.bucket}/{self.prefix}") from None
                raise

    def _translated(self, key: str) -> contextlib.AbstractContextManager[None]:
        return _unavailable(f"s3://{self.bucket}/{self.prefix}{key}")

    def iter_chunks(self, key: str, chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
        body = self._get(key)
        try:
            with self._translated(key):
                yield from body.iter_chunks(chunk_bytes)
        finally:
            body.close()

    async def stream(self, key: str, chunk_bytes: int = 1 << 16) -> AsyncIterator[bytes]:
        body = await asyncio.to_thread(self._get, key)
        try:
            while chunk := await asyncio.to_thread(self._read_body, key, body, chunk_bytes):
                yield chunk
        finally:
            body.close()

    def _read_body(self, key: str, body: Any, size: int | None = None) -> bytes:
        with self._translated(key):
            data: bytes = body.read(size)
            return data

    def _read(self, key: str, offset: int, length: int) -> bytes:
        try:
            body = self._get(key, f"bytes={offset}-{offset + length - 1}")
        except BlobStoreUnavailable as exc:
            cause = exc.__cause__
            if isinstance(cause, ClientError) and cause.response.get("Error", {}).get("Code") == "InvalidRange":
                return b""  # starts past the end
            raise
        try:
            return self._read_body(key, body)
        finally:
            body.close()

    async def read_range(self, key: str, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        first, last = offset // _BLOCK_BYTES, (offset + length - 1) // _BLOCK_BYTES
        if last - first > 1:
            return await asyncio.to_thread(self._read, key, offset, length)
        blocks = [await self._block(key, index) for index in range(first, last + 1)]
        start = offset - first * _BLOCK_BYTES
        return b"".join(blocks)[start : start + length]

    async def _block(self, key: str, index: int) -> bytes:
        """One aligned block, from the cache or one GET shared by every reader waiting for it."""
        name = (key, index)
        if (cached := self._blocks.get(name)) is not None:
            self._blocks.move_to_end(name)
            return cached
        loading = self._loading.get(name)
        if loading is None:
            loading = asyncio.ensure_future(asyncio.to_thread(self._read, key, index * _BLOCK_BYTES, _BLOCK_BYTES))
            self._loading[name] = loading
            loading.add_done_callback(lambda done: self._loaded(name, done))
        # Shielded: a reader that is cancelled must not cancel the GET the others wait for.
        return await asyncio.shield(loading)

    def _loaded(self, name: tuple[str, int], done: asyncio.Future[bytes]) -> None:
        self._loading.pop(name, None)
        if done.cancelled() or done.exception() is not None:
            return
        self._blocks[name] = done.result()
        while len(self._blocks) > _KEEP_BLOCKS:
            self._blocks.popitem(last=False)

    async def delete(self, key: str) -> None:
        name = self.object_key(key)
        for cached in [cached for cached in self._blocks if cached[0] == key]:
            del self._blocks[cached]
        await asyncio.to_thread(self.client.delete_object, Bucket=self.bucket, Key=name)

    async def exists(self, key: str) -> bool:
        name = self.object_key(key)
        try:
            await asyncio.to_thread(self.client.head_object, Bucket=self.bucket, Key=name)
        except ClientError as exc:
            if _is_missing(exc):
                return False
            raise
        return True

    def close(self) -> None:
        self.part_pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()
