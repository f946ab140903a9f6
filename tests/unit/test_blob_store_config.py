"""Choosing the blob store in settings: local by default, S3 only with a bucket; `backfill run` stays local."""

from __future__ import annotations

from pathlib import Path

import pytest

from backfill.blobs import open_blob_store
from backfill.blobs.local import LocalBlobStore
from backfill.blobs.s3 import S3BlobStore
from backfill.config import load_settings
from backfill.errors import ConfigError
from backfill.offline import _offline_settings


@pytest.fixture(autouse=True)
def _no_aws_lookups(monkeypatch: pytest.MonkeyPatch) -> None:
    """Credentials in the environment: building a client then never asks an instance metadata service."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "unit-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "unit-test")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def test_the_local_directory_is_the_default_store(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path)

    assert "local" == settings.blob_store


async def test_the_default_store_lives_under_the_data_dir(tmp_path: Path) -> None:
    store = await open_blob_store(load_settings(data_dir=tmp_path))

    assert isinstance(store, LocalBlobStore)
    assert tmp_path / "blobs" == store.root
    store.close()


def test_s3_settings_come_from_the_config_file_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "backfill.toml"
    config.write_text('blob_store = "s3"\ns3_bucket = "batches"\ns3_endpoint_url = "http://127.0.0.1:8333"\n')
    monkeypatch.setenv("BACKFILL_S3_PREFIX", "prod/backfill")

    settings = load_settings(config)

    expected = ("s3", "batches", "prod/backfill", "http://127.0.0.1:8333", None, 8 << 20)
    actual = (settings.blob_store, settings.s3_bucket, settings.s3_prefix, settings.s3_endpoint_url)
    assert expected == (*actual, settings.s3_region, settings.s3_part_bytes)


def test_s3_without_a_bucket_is_refused() -> None:
    with pytest.raises(ConfigError, match="needs s3_bucket"):
        load_settings(blob_store="s3")


@pytest.mark.parametrize("part_bytes", [1 << 20, 6 << 30])
def test_parts_outside_what_s3_accepts_are_refused(part_bytes: int) -> None:
    with pytest.raises(ConfigError, match="s3_part_bytes"):
        load_settings(blob_store="s3", s3_bucket="batches", s3_part_bytes=part_bytes)


def test_a_store_refuses_parts_smaller_than_s3_allows() -> None:
    with pytest.raises(ValueError, match="part_bytes"):
        S3BlobStore("batches", part_bytes=1 << 20)


@pytest.mark.parametrize(("prefix", "expected"), [("", "files/f"), ("a/b", "a/b/files/f"), ("/a/", "a/files/f")])
def test_object_keys_are_the_prefix_then_the_local_name(prefix: str, expected: str) -> None:
    store = S3BlobStore("batches", prefix, region="us-east-1")

    assert expected == store.object_key("files/f")
    store.close()


def test_backfill_run_keeps_its_blobs_in_the_state_directory(tmp_path: Path) -> None:
    server = load_settings(blob_store="s3", s3_bucket="batches")

    offline = _offline_settings(server, tmp_path, "24h")

    assert ("local", tmp_path / "blobs") == (offline.blob_store, offline.blob_dir)
