"""A batch's progress as a person sees it: counts, rates, ETA, the exit code it ends with, and a live rich bar.

Shared by `backfill run` (reading its own store) and the client commands `submit --wait` / `wait` (polling a
server). The arithmetic is pure and takes time as an argument; only `ProgressDisplay` draws.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

from backfill.domain.batches import Batch, BatchStatus


class ExitCode(IntEnum):
    """What `backfill run`, `submit --wait` and `wait` exit with."""

    OK = 0  # the batch completed and every line succeeded
    LINES_FAILED = 1  # it ended, but some lines failed, or it expired or was cancelled
    INVALID_INPUT = 2  # the input file was invalid (the batch failed validation); also click's usage errors
    ERROR = 3  # anything else: config, state directory, server unreachable or refusing, …
    INTERRUPTED = 130  # Ctrl-C


@dataclass(frozen=True)
class Snapshot:
    """One look at a batch."""

    status: BatchStatus
    total: int = 0
    completed: int = 0
    failed: int = 0  # every line that did not succeed, `expired` and `cancelled` included
    output_tokens: int = 0
    expired: int = 0  # lines that expired before they ran
    cancelled: int = 0  # lines cancelled before they ran
    schedule: str | None = None  # the scheduler's state for it (`backfill.schedule`), while in progress

    @property
    def done(self) -> int:
        return self.completed + self.failed

    @property
    def errored(self) -> int:
        """Lines that ran and failed."""
        return max(0, self.failed - self.expired - self.cancelled)

    @property
    def is_terminal(self) -> bool:
        return self.status.is_terminal

    @property
    def exit_code(self) -> ExitCode:
        if self.status is BatchStatus.FAILED:
            return ExitCode.INVALID_INPUT
        if self.status is BatchStatus.COMPLETED and self.failed == 0:
            return ExitCode.OK
        if self.status.is_terminal:
            return ExitCode.LINES_FAILED
        return ExitCode.ERROR

    @classmethod
    def of(cls, batch: Batch) -> Snapshot:
        return cls(batch.status, batch.total, batch.completed, batch.failed, batch.usage.output_tokens)

    @classmethod
    def from_openai(cls, batch: dict[str, Any]) -> Snapshot:
        """From a batch object as the API sends it (SPEC §3)."""
        counts = batch.get("request_counts") or {}
        usage = batch.get("usage") or {}
        extension = batch.get("backfill") or {}
        unrun = extension.get("request_counts") or {}
        return cls(
            BatchStatus(batch["status"]),
            int(counts.get("total", 0)),
            int(counts.get("completed", 0)),
            int(counts.get("failed", 0)),
            int(usage.get("output_tokens", 0)),
            int(unrun.get("expired", 0)),
            int(unrun.get("cancelled", 0)),
            extension.get("schedule"),
        )


@dataclass(frozen=True)
class _Sample:
    at: float
    done: int
    output_tokens: int


class RateMeter:
    """Lines/s and output tokens/s over a sliding window, from samples of cumulative counts.

    The first sample is the baseline: after a resume only what this process saw finish counts.
    """

    def __init__(self, window_s: float = 20.0, min_span_s: float = 1.0) -> None:
        self.window_s = window_s
        self.min_span_s = min_span_s
        self._samples: deque[_Sample] = deque()

    def add(self, now: float, done: int, output_tokens: int) -> None:
        self._samples.append(_Sample(now, done, output_tokens))
        # Keep one sample at or before the window's start, so the rate always spans the whole window.
        while len(self._samples) > 2 and self._samples[1].at <= now - self.window_s:
            self._samples.popleft()

    def _span(self) -> tuple[_Sample, _Sample, float] | None:
        if len(self._samples) < 2:
            return None
        first, last = self._samples[0], self._samples[-1]
        span = last.at - first.at
        return (first, last, span) if span >= self.min_span_s else None

    def lines_per_s(self) -> float | None:
        """None until samples span `min_span_s`."""
        span = self._span()
        return None if span is None else max(0, span[1].done - span[0].done) / span[2]

    def tokens_per_s(self) -> float | None:
        span = self._span()
        return None if span is None else max(0, span[1].output_tokens - span[0].output_tokens) / span[2]

    def eta_s(self, remaining: int) -> float | None:
        """Seconds until `remaining` more lines are done at the current rate; None when there is no rate."""
        if remaining <= 0:
            return 0.0
        rate = self.lines_per_s()
        return remaining / rate if rate else None


def format_duration(seconds: float | None) -> str:
    """`3725` -> `1h02m`; None -> `--`."""
    if seconds is None:
        return "--"
    whole = round(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def format_rate(rate: float | None) -> str:
    if rate is None:
        return "--"
    return f"{rate:.1f}" if rate < 100 else f"{rate:,.0f}"


# Schedule states in which nothing runs yet, said in place of a rate and an estimate that would read 0 and --.
_HELD = {"loading_model": "loading model", "waiting": "waiting: no backend up"}


def count_lines(failed: int, expired: int, cancelled: int) -> str:
    """`3 failed`, `3 failed · 7 cancelled`: lines that did not run said apart from those that failed."""
    parts = [f"{failed} failed"]
    parts += [f"{count} {word}" for count, word in ((expired, "expired"), (cancelled, "cancelled")) if count]
    return " · ".join(parts)


def describe(snapshot: Snapshot, meter: RateMeter) -> str:
    """The text beside the bar: `120/400 done · 3 failed · 12.5 req/s · 830 tok/s · ETA 22s`; while the model
    loads, `0/400 done · 0 failed · loading model`."""
    lines = count_lines(snapshot.errored, snapshot.expired, snapshot.cancelled)
    counts = f"{snapshot.done}/{snapshot.total} done · {lines}"
    held = _HELD.get(snapshot.schedule or "") if snapshot.status is BatchStatus.IN_PROGRESS else None
    if held is not None:
        return f"{counts} · {held}"
    eta: float | None = None  # unknown while validating: there is no total yet
    if snapshot.is_terminal:
        eta = 0.0
    elif snapshot.total:
        eta = meter.eta_s(snapshot.total - snapshot.done)
    return (
        f"{counts} · {format_rate(meter.lines_per_s())} req/s · {format_rate(meter.tokens_per_s())} tok/s · "
        f"ETA {format_duration(eta)}"
    )


def make_console(*, stderr: bool = True) -> Console:
    """A console whose messages are never wrapped: paths and ids stay whole, to copy or to grep."""
    return Console(stderr=stderr, highlight=False, soft_wrap=True)


class ProgressDisplay:
    """A live progress bar on stderr for one batch. Use as a context manager; feed it `update(snapshot)`."""

    def __init__(self, console: Console | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.console = console or make_console()
        self.meter = RateMeter()
        self.clock = clock
        self._progress = Progress(
            TextColumn("[bold]{task.description:<11}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[stats]}"),
            console=self.console,
        )
        self._task = self._progress.add_task("starting", total=None, stats="")

    def __enter__(self) -> ProgressDisplay:
        self._progress.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._progress.stop()

    def update(self, snapshot: Snapshot) -> None:
        self.meter.add(self.clock(), snapshot.done, snapshot.output_tokens)
        self._progress.update(
            self._task,
            description=snapshot.status.value,
            total=snapshot.total or None,
            completed=snapshot.done,
            stats=describe(snapshot, self.meter),
        )
