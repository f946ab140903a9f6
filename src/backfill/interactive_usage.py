"""Usage of interactive requests through the proxy (docs/usage.md): counted in memory as answers end, added to
the store's usage rows about once a second (`run`), and once more when the process stops. A process killed
meanwhile loses at most that second of interactive counts; batch usage is written with its lines instead."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import orjson
import structlog

from backfill.domain.usage import Usage
from backfill.domain.usage_report import UsageCounts, UsageKey, UsageKind, row_start
from backfill.ports import UsageStore

log = structlog.get_logger(__name__)
FLUSH_INTERVAL_S = 1.0
_MAX_LINE_BYTES = 1 << 20


class StreamUsage:
    """Finds the usage an SSE stream reports (chat's final chunk with `stream_options.include_usage`, the
    Responses API's `response.completed`); the last one seen wins. Only lines that mention usage are parsed."""

    def __init__(self) -> None:
        self.usage: Usage | None = None
        self._partial = b""

    def feed(self, chunk: bytes) -> None:
        data = self._partial + chunk
        lines = data.split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > _MAX_LINE_BYTES:
            self._partial = b""
        for line in lines:
            if line.startswith(b"data:") and b'"usage"' in line:
                self._read(line[5:].strip())

    def _read(self, payload: bytes) -> None:
        try:
            event: Any = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        if not isinstance(event, dict):
            return
        if isinstance(event.get("usage"), dict):
            self.usage = Usage.from_response(event)
        elif isinstance(event.get("response"), dict) and isinstance(event["response"].get("usage"), dict):
            self.usage = Usage.from_response(event["response"])


def usage_in_body(content: bytes) -> Usage | None:
    """The `usage` object of a JSON answer, read without parsing the rest (an embeddings answer is mostly
    floats): the last `"usage"` key, up to its object's closing brace."""
    at = content.rfind(b'"usage"')
    start = content.find(b"{", at)
    if at < 0 or start < 0:
        return None
    depth = 0
    for end in range(start, min(len(content), start + 4096)):
        depth += {123: 1, 125: -1}.get(content[end], 0)  # { and }
        if depth == 0:
            try:
                usage = orjson.loads(content[start : end + 1])
            except orjson.JSONDecodeError:
                return None
            return Usage.from_response({"usage": usage}) if isinstance(usage, dict) else None
    return None


class InteractiveUsage:
    """Interactive requests' counts not yet written, by tenant, model and minute."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._pending: dict[UsageKey, UsageCounts] = {}

    def add(self, tenant_id: str, model: str, usage: Usage) -> None:
        key = UsageKey(tenant_id, model, row_start(self.clock()), UsageKind.INTERACTIVE)
        self._pending[key] = self._pending.get(key, UsageCounts()) + UsageCounts.of_request(usage)

    async def flush(self, store: UsageStore) -> None:
        if not self._pending:
            return
        rows, self._pending = self._pending, {}
        try:
            await store.add_usage(rows)
        except Exception:
            log.exception("usage.flush_failed", rows=len(rows))
            for key, counts in rows.items():  # kept for the next flush
                self._pending[key] = self._pending.get(key, UsageCounts()) + counts

    async def run(self, store: UsageStore, stop: asyncio.Event, interval_s: float = FLUSH_INTERVAL_S) -> None:
        """Flush every `interval_s` until `stop` is set, then once more."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)
            await self.flush(store)
