"""Helpers for running backfill and its test upstream as real processes: free ports, readiness, config files.

Shared by the test suites (`tests/support/processes.py`) and the benchmarks (`bench/harness.py`).
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, process: subprocess.Popen[bytes], timeout_s: float = 60.0) -> None:
    """Wait until `url` answers 200; fail early if `process` exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout_s}s")


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, dict):  # an inline table
        return "{" + ", ".join(f"{key} = {toml_value(item)}" for key, item in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def write_config(path: Path, settings: dict[str, Any], backends: list[dict[str, Any]]) -> Path:
    """A backfill TOML config: top-level settings, then one `[[backends]]` table each."""
    lines = [f"{key} = {toml_value(value)}" for key, value in settings.items()]
    for backend in backends:
        lines.append("\n[[backends]]")
        lines += [f"{key} = {toml_value(value)}" for key, value in backend.items()]
    path.write_text("\n".join(lines) + "\n")
    return path
