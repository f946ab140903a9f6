"""Blob stores: where file bytes live (input, output and error files)."""

from __future__ import annotations

from typing import Protocol

from backfill.blobs.local import LocalBlobStore
from backfill.config import Settings
from backfill.errors import ConfigError
from backfill.ports import BlobStore


class OwnedBlobStore(BlobStore, Protocol):
    """A blob store the process opened, and closes when it stops."""

    def close(self) -> None: ...


async def open_blob_store(settings: Settings) -> OwnedBlobStore:
    """The configured store: a directory under data_dir, or a bucket checked to be reachable before anything starts."""
    if settings.blob_store == "local":
        return LocalBlobStore(settings.blob_dir)
    try:
        from backfill.blobs.s3 import S3BlobStore
    except ModuleNotFoundError as exc:  # boto3 comes with the extra
        raise ConfigError(f"blob_store = 's3' needs backfill[s3] (pip install 'backfill[s3]'): {exc}") from exc
    assert settings.s3_bucket is not None  # Settings refuses s3 without a bucket
    store = S3BlobStore(
        settings.s3_bucket,
        settings.s3_prefix,
        endpoint_url=settings.s3_endpoint_url,
        region=settings.s3_region,
        part_bytes=settings.s3_part_bytes,
        spool_dir=settings.data_dir / "spool",
    )
    try:
        await store.check()
    except BaseException:
        store.close()
        raise
    return store
