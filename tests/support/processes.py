"""Real processes for acceptance tests: the fake upstream and `backfill serve`, on free loopback ports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from backfill.testing.processes import free_port, wait_http, write_config
from tests.support.databases import PG_URL, REQUIRE_PG


def child_env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("BACKFILL_")}
    env.update(extra)
    return env


@dataclass
class Upstream:
    """`python -m backfill.testing.upstream` on a free port."""

    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def start(cls, delay_ms: int = 0) -> Upstream:
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, "-m", "backfill.testing.upstream", "--port", str(port), "--delay-ms", str(delay_ms)],
            env=child_env(),
        )
        wait_http(f"http://127.0.0.1:{port}/_stats?log=0", process)
        return cls(port, process)

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = httpx.get(f"{self.url}/_stats", timeout=10).json()
        return result

    def open_gate(self, name: str) -> None:
        """Let the requests held at `#gate:NAME` go, and any that come later."""
        httpx.post(f"{self.url}/_gates/{name}", timeout=10).raise_for_status()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:  # still sleeping on a hung request nobody waits for
            self.process.kill()
            self.process.wait()


@dataclass
class Server:
    """A real `backfill serve` process with its own data dir and config file."""

    data_dir: Path
    config_path: Path
    database_url: str
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    role: str = "all"
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self, *args: str) -> list[str]:
        return [
            sys.executable, "-m", "backfill", *args, "--data-dir", str(self.data_dir),
            "--config", str(self.config_path), "--database-url", self.database_url,
        ]  # fmt: skip

    def start(self) -> Server:
        self.log_path = self.data_dir.parent / f"serve-{self.port}.log"
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.process = subprocess.Popen(
            self.command("serve", "--port", str(self.port), "--role", self.role),
            env=child_env(**self.extra_env),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        wait_http(f"{self.base_url}/healthz", self.process)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill9(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def create_key(self, tenant: str) -> str:
        out = subprocess.run(
            self.command("keys", "create", "--tenant", tenant), env=child_env(), check=True, capture_output=True
        )
        return out.stdout.decode().strip().splitlines()[-1]

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""


DB_KINDS = ["sqlite", "postgres"]
__all__ = [
    "DB_KINDS",
    "PG_URL",
    "REQUIRE_PG",
    "Server",
    "Upstream",
    "child_env",
    "free_port",
    "wait_http",
    "write_config",
]


@contextmanager
def sim_serve(profile: Path, *options: str) -> Iterator[str]:
    """`backfill sim serve --profile PROFILE [options]` on a free port until the block ends; yields its URL."""
    port = free_port()
    command = [sys.executable, "-m", "backfill", "sim", "serve", "--port", str(port), "--profile", str(profile)]
    process = subprocess.Popen([*command, *options], env=child_env())
    try:
        wait_http(f"http://127.0.0.1:{port}/health", process)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


@contextmanager
def sim_serving(profile: str, directory: Path, *options: str) -> Iterator[str]:
    """`sim_serve` of a profile given as TOML text, written to `directory`/sim.toml."""
    path = directory / "sim.toml"
    path.write_text(profile)
    with sim_serve(path, *options) as url:
        yield url


@dataclass
class EngineProcess:
    """An inference server in its own process on a fixed port, so that it can be killed and started again there:
    `backfill sim serve`, or llama-cpp-python's OpenAI-compatible server."""

    command: list[str]
    port: int
    ready_path: str
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def sim(cls, profile: Path) -> EngineProcess:
        port = free_port()
        command = [sys.executable, "-m", "backfill", "sim", "serve", "--port", str(port), "--profile", str(profile)]
        return cls(command, port, "/health")

    @classmethod
    def llama_cpp(cls, gguf: Path, model: str) -> EngineProcess:
        port = free_port()
        command = [
            sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", model,
            "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads", "1", "--verbose", "false",
        ]  # fmt: skip
        return cls(command, port, "/v1/models")

    def start(self, timeout_s: float = 120.0) -> EngineProcess:
        self.process = subprocess.Popen(self.command, env=child_env(), stdout=subprocess.DEVNULL)
        wait_http(f"{self.url}{self.ready_path}", self.process, timeout_s)
        return self

    def kill9(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
