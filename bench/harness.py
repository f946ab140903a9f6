"""What every benchmark needs: child processes on free ports (the fake upstream, `backfill serve`), cleaned up on
exit, Ctrl-C or SIGTERM; the server's memory from /proc; a description of the machine; a plain-text table."""

from __future__ import annotations

import datetime
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from backfill.testing.processes import free_port, wait_http, write_config

REPO = Path(__file__).resolve().parent.parent
MODEL = "bench-model"
KiB = 1024
MB = 1_000_000


# --- child processes ---------------------------------------------------------------------------------------------


class Children:
    """Every process a benchmark starts; all of them are stopped when the `running()` block ends, however."""

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, argv: Sequence[str], log_path: Path | None = None) -> subprocess.Popen[bytes]:
        env = {key: value for key, value in os.environ.items() if not key.startswith("BACKFILL_")}
        with open(log_path or os.devnull, "ab") as log:
            # Own session: a Ctrl-C reaches the benchmark only, which then stops its children in order.
            process = subprocess.Popen(
                list(argv), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.processes.append(process)
        return process

    def stop(self, process: subprocess.Popen[bytes], timeout_s: float = 20.0) -> None:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process in self.processes:
            self.processes.remove(process)

    def stop_all(self) -> None:
        for process in reversed(list(self.processes)):
            self.stop(process, timeout_s=5.0)


def _raise_on_sigterm(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


@contextmanager
def running() -> Iterator[Children]:
    """A `Children` registry whose processes are stopped on exit, on Ctrl-C and on SIGTERM."""
    children = Children()
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        yield children
    finally:
        children.stop_all()
        signal.signal(signal.SIGTERM, previous)


@dataclass
class Upstream:
    """The instant fake inference server, `python -m backfill.testing.upstream`."""

    process: subprocess.Popen[bytes]
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def start(cls, children: Children, delay_ms: float = 0.0, log_path: Path | None = None) -> Upstream:
        port = free_port()
        argv = [sys.executable, "-m", "backfill.testing.upstream", "--port", str(port), "--delay-ms", str(delay_ms)]
        process = children.start(argv, log_path)
        wait_http(f"http://127.0.0.1:{port}/_stats?log=0", process)
        return cls(process, port)

    def total(self) -> int:
        return int(httpx.get(f"{self.url}/_stats?log=0", timeout=30).json()["total"])

    def reset(self) -> None:
        httpx.post(f"{self.url}/_reset", timeout=30).raise_for_status()


@dataclass
class Server:
    """A real `backfill serve` (SQLite in its own data dir) whose one backend serves MODEL."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    client: httpx.Client = field(repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    @classmethod
    def start(
        cls, children: Children, workdir: Path, backend: dict[str, Any], settings: dict[str, Any] | None = None
    ) -> Server:
        return cls.start_with(children, workdir, [{"name": "bench", "models": [MODEL], **backend}], settings)

    @classmethod
    def start_with(
        cls,
        children: Children,
        workdir: Path,
        backends: list[dict[str, Any]],
        settings: dict[str, Any] | None = None,
        data_dir: Path | None = None,
    ) -> Server:
        """`backfill serve` with these `[[backends]]` entries, as given (its data in `workdir/data` unless
        `data_dir` names another: processes of one split deployment share it for their local blobs)."""
        workdir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        config = write_config(workdir / "backfill.toml", settings or {}, backends)
        log_path = workdir / "serve.log"
        argv = [
            sys.executable, "-m", "backfill", "serve", "--port", str(port),
            "--config", str(config), "--data-dir", str(data_dir or workdir / "data"),
        ]  # fmt: skip
        process = children.start(argv, log_path)
        wait_http(f"http://127.0.0.1:{port}/healthz", process)
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}/v1", timeout=600)
        return cls(process, port, log_path, client)

    def upload(self, path: Path) -> dict[str, Any]:
        """POST /v1/files as a streaming multipart body (httpx reads the file object in 64 KiB chunks)."""
        with path.open("rb") as fh:
            response = self.client.post(
                "/files", data={"purpose": "batch"}, files={"file": (path.name, fh, "application/jsonl")}
            )
        return _json(response)

    def create_batch(self, file_id: str, endpoint: str = "/v1/chat/completions") -> dict[str, Any]:
        payload = {"input_file_id": file_id, "endpoint": endpoint, "completion_window": "24h"}
        return _json(self.client.post("/batches", json=payload))

    def batch(self, batch_id: str) -> dict[str, Any]:
        return _json(self.client.get(f"/batches/{batch_id}"))

    def content(self, file_id: str) -> bytes:
        response = self.client.get(f"/files/{file_id}/content")
        response.raise_for_status()
        return response.content

    def log_tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, children: Children) -> None:
        self.client.close()
        children.stop(self.process)


def _json(response: httpx.Response) -> dict[str, Any]:
    if response.is_error:
        raise RuntimeError(
            f"{response.request.method} {response.request.url} -> {response.status_code}: {response.text}"
        )
    result: dict[str, Any] = response.json()
    return result


# --- profiles, CPU time and memory ---


@contextmanager
def profiled(children: Children, pid: int, path: Path | None, rate_hz: int = 100) -> Iterator[None]:
    """Sample `pid` with py-spy while the block runs (nothing when `path` is None).

    The format follows the suffix: .svg a flame graph, .json speedscope, anything else py-spy's collapsed stacks.
    --nonblocking: the target is never paused, so it runs at full speed while sampled.
    """
    if path is None:
        yield
        return
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    fmt = {".svg": "flamegraph", ".json": "speedscope"}.get(path.suffix, "raw")
    path.parent.mkdir(parents=True, exist_ok=True)
    argv = [py_spy, "record", "--pid", str(pid), "--output", str(path), "--format", fmt]
    argv += ["--rate", str(rate_hz), "--nonblocking", "--threads"]
    process = children.start(argv, path.with_suffix(path.suffix + ".log"))
    time.sleep(1.0)  # py-spy attaches
    try:
        yield
    finally:
        process.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
        with suppress(subprocess.TimeoutExpired):
            process.wait(60)
        children.stop(process)


def _stat_cpu_s(path: Path) -> float:
    fields = path.read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a live process (all its threads) has used."""
    return _stat_cpu_s(Path(f"/proc/{pid}/stat"))


def thread_cpu_s(pid: int) -> dict[int, float]:
    """User + system CPU seconds of each live thread of a process, by thread id (the main thread's is `pid`)."""
    seconds = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with suppress(OSError):  # a thread that ended meanwhile
            seconds[int(task.name)] = _stat_cpu_s(task / "stat")
    return seconds


def children_cpu_s() -> float:
    """User + system CPU seconds of this process's children that have been waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# --- memory -------------------------------------------------------------------------------------------------------


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in KiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values


def reset_peak_rss(pid: int) -> bool:
    """Start VmHWM afresh from the current RSS (Linux `clear_refs` 5); False where the kernel refuses."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


# --- reporting ----------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.decode().strip() + (" (+ uncommitted changes)" if dirty.stdout.strip() else "")


def machine_line() -> str:
    cores = len(os.sched_getaffinity(0))
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"{now} | {cores} cores (nproc) | {cpu_model()} | Python {platform.python_version()} | backfill {git_commit()}"
    )


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned first column, right-aligned numbers, a rule under the headers."""

    def line(cells: Sequence[str]) -> str:
        first, *rest = (str(cell) for cell in cells)
        return "  ".join([first.ljust(widths[0]), *(cell.rjust(w) for cell, w in zip(rest, widths[1:], strict=True))])

    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]
    return "\n".join([line(headers), "  ".join("-" * width for width in widths), *(line(row) for row in rows)])


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
