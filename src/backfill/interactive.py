"""Interactive traffic through the proxy: its latency per backend, the backend it goes to, its first token.

The proxy (`backfill.http.routes.proxy`) feeds an `InteractiveMeter`; the harvest controller reads it about once
a second (`in_flight`, `drain_ttft`). Nothing here does I/O or reads a clock: the caller measures the times.

What counts as the time to first token (TTFT):
- a streamed answer (`"stream": true`): from the request's arrival to the first SSE `data:` event that carries
  generated content (a chat delta with content, reasoning or tool calls, a completion's text, a Responses API
  `*.delta` event); the chat stream's opening chunk that only names the role does not count;
- an answer that is not streamed: from the request's arrival until the whole answer has arrived, which is when
  the client sees its first token;
- an error answer (status 4xx/5xx, timeout, unreachable backend) records no TTFT sample, only a total time.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import orjson

from backfill.metrics import Metrics

MAX_TTFT_SAMPLES = 10_000
_MAX_UNSCANNED_BYTES = 1 << 20


class InteractiveMeter:
    """Interactive requests in flight and their latency, by backend name.

    Each request calls `record_start`, then `record_first_token` at most once (see the module docstring for
    what that is), then `record_end` exactly once. Outcomes are the labels of
    `backfill_interactive_requests_total`: `2xx`, `4xx`, `429`, `5xx` (the backend's status), `timeout`,
    `unavailable` (no usable answer) and `cancelled` (the client went away first).
    """

    def __init__(self, metrics: Metrics | None = None, *, max_samples: int = MAX_TTFT_SAMPLES) -> None:
        self.metrics = metrics or Metrics()
        self.max_samples = max_samples
        self._in_flight: dict[str, int] = {}
        self._ttft: dict[str, deque[float]] = {}

    def record_start(self, backend: str) -> None:
        self._in_flight[backend] = self._in_flight.get(backend, 0) + 1
        self.metrics.interactive_in_flight.labels(backend).inc()

    def record_first_token(self, backend: str, ttft_s: float) -> None:
        samples = self._ttft.get(backend)
        if samples is None:
            samples = self._ttft[backend] = deque(maxlen=self.max_samples)
        samples.append(ttft_s)
        self.metrics.interactive_ttft_seconds.labels(backend).observe(ttft_s)

    def record_end(self, backend: str, total_s: float, outcome: str) -> None:
        self._in_flight[backend] = max(0, self._in_flight.get(backend, 0) - 1)
        self.metrics.interactive_in_flight.labels(backend).dec()
        self.metrics.interactive_request_seconds.labels(backend).observe(total_s)
        self.metrics.interactive_requests.labels(backend, outcome).inc()

    def in_flight(self, backend: str) -> int:
        """Interactive requests sent to `backend` and not finished yet."""
        return self._in_flight.get(backend, 0)

    def drain_ttft(self, backend: str) -> list[float]:
        """The TTFT samples (seconds) recorded for `backend` since the previous drain, oldest first.

        At most `max_samples` are kept between drains: when more arrive, the oldest are dropped.
        """
        samples = self._ttft.get(backend)
        if not samples:
            return []
        drained = list(samples)
        samples.clear()
        return drained


@dataclass(frozen=True, slots=True)
class Candidate:
    """A backend that serves the requested model, with what it is running now."""

    name: str
    max_concurrency: int
    batch_in_flight: int
    interactive_in_flight: int


def least_loaded(candidates: Iterable[Candidate]) -> str:
    """The backend with the lowest load: (interactive + batch lines in flight) / max_concurrency.

    Ties go to the one with fewer interactive requests in flight, then to the first given (the config's order).
    Batch lines count because they hold engine slots; interactive requests go ahead of them anyway (they never
    wait for a batch limit), so this only spreads them over the endpoints. Raises ValueError if there are none.
    """
    best = min(
        enumerate(candidates),
        key=lambda item: (
            (item[1].interactive_in_flight + item[1].batch_in_flight) / max(1, item[1].max_concurrency),
            item[1].interactive_in_flight,
            item[0],
        ),
    )
    return best[1].name


class FirstTokenScanner:
    """Reads a Server-Sent Events byte stream as it passes and says when the first content-carrying event went by.

    Only the bytes up to that event are looked at; after it, `feed` returns True at once.
    """

    def __init__(self) -> None:
        self.seen = False
        self._pending = b""

    def feed(self, chunk: bytes) -> bool:
        """True once an event with generated content has been fed (in this chunk or an earlier one)."""
        if self.seen:
            return True
        self._pending += chunk
        *lines, self._pending = self._pending.split(b"\n")
        for line in lines:
            if line.startswith(b"data:") and carries_content(line[5:].strip()):
                self.seen = True
                self._pending = b""
                return True
        if len(self._pending) > _MAX_UNSCANNED_BYTES:  # one huge line: whatever it is, something arrived
            self.seen = True
            self._pending = b""
        return self.seen


def carries_content(data: bytes) -> bool:
    """Whether one SSE `data:` payload holds generated output (not a role header, usage or `[DONE]`)."""
    try:
        event = orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    if not isinstance(event, dict):
        return False
    kind = event.get("type")
    if isinstance(kind, str):  # the Responses API: response.output_text.delta, ….function_call_arguments.delta
        return kind.endswith(".delta") and bool(event.get("delta"))
    choices = event.get("choices")
    if not isinstance(choices, list):
        return False
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        if choice.get("text"):  # a completion chunk
            return True
        delta = choice.get("delta")
        if isinstance(delta, dict) and any(
            delta.get(key) for key in ("content", "reasoning_content", "reasoning", "tool_calls", "refusal")
        ):
            return True
    return False
