"""The baseline: a client-side parallel request processor in the style of the OpenAI cookbook's
``api_request_parallel_processor.py``, written afresh.

It reads OpenAI batch lines (``{"custom_id", "method", "url", "body"}``) one at a time, spends a
requests-per-minute and a tokens-per-minute budget (tokens estimated as body bytes / 4), keeps at most
``--max-concurrency`` requests in flight, retries 429s, 5xx, unparseable bodies and transport failures after
a short pause (a 429 pauses every new request, as the cookbook does), and appends one result line per
request to the results file as it finishes::

    python bench/cookbook_client.py --requests IN.jsonl --results OUT.jsonl --base-url http://127.0.0.1:P \
        --max-concurrency 64 --max-requests-per-minute 1e9 --max-tokens-per-minute 1e12 --max-attempts 5
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import httpx
import orjson

RETRY_PAUSE_S = 1.0
MAX_RETRY_AFTER_S = 60.0
BYTES_PER_TOKEN = 4


@dataclass(slots=True)
class Request:
    custom_id: str
    url: str
    body: bytes
    tokens: int
    attempts_left: int


@dataclass(slots=True)
class Outcome:
    """What one attempt produced; ``pause_s`` is set when the attempt should be retried."""

    status_code: int | None = None
    body: Any = None
    error: str | None = None
    pause_s: float | None = None


class TokenBucket:
    """A budget of ``per_minute`` units that refills continuously, one minute's worth at most."""

    def __init__(self, per_minute: float, now: float) -> None:
        self.capacity = per_minute
        self.available = per_minute
        self.updated_at = now

    def refill(self, now: float) -> None:
        self.available = min(self.capacity, self.available + (now - self.updated_at) * self.capacity / 60)
        self.updated_at = now

    def wait_s(self, amount: float) -> float:
        """How long until ``amount`` is available, after a refill."""
        missing = min(amount, self.capacity) - self.available
        return max(0.0, missing * 60 / self.capacity)

    def take(self, amount: float) -> None:
        self.available -= min(amount, self.capacity)


def read_requests(path: Path, max_attempts: int) -> Iterator[Request]:
    with path.open("rb") as lines:
        for line in lines:
            if not line.strip():
                continue
            item = orjson.loads(line)
            body = orjson.dumps(item["body"])
            yield Request(item["custom_id"], item["url"], body, len(body) // BYTES_PER_TOKEN, max_attempts)


def parse_retry_after(value: str | None) -> float:
    try:
        return min(float(value), MAX_RETRY_AFTER_S) if value is not None else RETRY_PAUSE_S
    except ValueError:
        return RETRY_PAUSE_S


class Processor:
    """Sends every request, honouring the rate budgets and the concurrency bound, and records results."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        results: BinaryIO,
        max_concurrency: int,
        rpm: float,
        tpm: float,
    ) -> None:
        now = time.monotonic()
        self.client = client
        self.results = results
        self.slots = asyncio.Semaphore(max_concurrency)
        self.requests_budget = TokenBucket(rpm, now)
        self.tokens_budget = TokenBucket(tpm, now)
        self.retries: deque[Request] = deque()
        self.changed = asyncio.Event()
        self.unfinished = 0
        self.cooldown_until = 0.0
        self.tasks: set[asyncio.Task[None]] = set()
        self.ok = 0
        self.failed = 0

    async def run(self, requests: Iterator[Request]) -> None:
        while True:
            request = self._next(requests)
            if request is None:
                if self.unfinished == 0:
                    return
                self.changed.clear()
                await self.changed.wait()
                continue
            await self._wait_for_budget(request)
            await self.slots.acquire()
            task = asyncio.create_task(self._attempt(request))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    def _next(self, requests: Iterator[Request]) -> Request | None:
        if self.retries:
            return self.retries.popleft()
        request = next(requests, None)
        if request is not None:
            self.unfinished += 1
        return request

    async def _wait_for_budget(self, request: Request) -> None:
        while True:
            now = time.monotonic()
            if now < self.cooldown_until:
                await asyncio.sleep(self.cooldown_until - now)
                continue
            self.requests_budget.refill(now)
            self.tokens_budget.refill(now)
            wait_s = max(self.requests_budget.wait_s(1), self.tokens_budget.wait_s(request.tokens))
            if wait_s == 0:
                self.requests_budget.take(1)
                self.tokens_budget.take(request.tokens)
                return
            await asyncio.sleep(max(wait_s, 0.001))

    async def _attempt(self, request: Request) -> None:
        try:
            outcome = await self._send(request)
        finally:
            self.slots.release()
        request.attempts_left -= 1
        if outcome.pause_s is not None and request.attempts_left > 0:
            asyncio.get_running_loop().call_later(outcome.pause_s, self._retry, request)
            return
        self._record(request, outcome)

    async def _send(self, request: Request) -> Outcome:
        try:
            response = await self.client.post(
                request.url, content=request.body, headers={"content-type": "application/json"}
            )
        except httpx.TimeoutException:
            return Outcome(error="timeout", pause_s=RETRY_PAUSE_S)
        except httpx.TransportError as exc:
            return Outcome(error=f"{type(exc).__name__}: {exc}", pause_s=RETRY_PAUSE_S)
        try:
            body = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            error = "response body is not JSON"
            return Outcome(response.status_code, response.text, error, pause_s=RETRY_PAUSE_S)
        if response.status_code == 429:
            pause_s = parse_retry_after(response.headers.get("retry-after"))
            self.cooldown_until = max(self.cooldown_until, time.monotonic() + pause_s)
            return Outcome(response.status_code, body, "rate limited", pause_s=pause_s)
        if response.status_code >= 500:
            return Outcome(response.status_code, body, f"HTTP {response.status_code}", pause_s=RETRY_PAUSE_S)
        if response.status_code >= 400:
            return Outcome(response.status_code, body, f"HTTP {response.status_code}")
        return Outcome(response.status_code, body)

    def _retry(self, request: Request) -> None:
        self.retries.append(request)
        self.changed.set()

    def _record(self, request: Request, outcome: Outcome) -> None:
        if outcome.error is None:
            self.ok += 1
        else:
            self.failed += 1
        response = None if outcome.status_code is None else {"status_code": outcome.status_code, "body": outcome.body}
        error = None if outcome.error is None else {"message": outcome.error}
        line = {"custom_id": request.custom_id, "response": response, "error": error}
        self.results.write(orjson.dumps(line) + b"\n")
        self.unfinished -= 1
        self.changed.set()


async def run(
    requests_path: str | Path,
    results_path: str | Path,
    base_url: str,
    max_concurrency: int,
    rpm: float,
    tpm: float,
    max_attempts: int,
    *,
    timeout_s: float = 60.0,
) -> dict[str, Any]:
    """Process every request in ``requests_path``; returns ``{"ok": n, "failed": n, "seconds": s}``."""
    started = time.monotonic()
    limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=timeout_s) as client:
        # Blocking and unbuffered on purpose: like the cookbook's open-append-close, each result line
        # reaches the OS (not the disk: no fsync) as it finishes, and the event loop pays for the write.
        with Path(results_path).open("ab", buffering=0) as results:  # noqa: ASYNC230
            processor = Processor(client, results, max_concurrency, rpm, tpm)
            await processor.run(read_requests(Path(requests_path), max_attempts))
    return {"ok": processor.ok, "failed": processor.failed, "seconds": time.monotonic() - started}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", required=True, help="OpenAI batch input JSONL")
    parser.add_argument("--results", required=True, help="JSONL file to append results to")
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--max-concurrency", type=int, default=64)
    parser.add_argument("--max-requests-per-minute", type=float, default=3_000)
    parser.add_argument("--max-tokens-per-minute", type=float, default=250_000)
    parser.add_argument("--max-attempts", type=int, default=5)
    parser.add_argument("--timeout-s", type=float, default=60.0)
    args = parser.parse_args(argv)
    summary = asyncio.run(
        run(
            args.requests,
            args.results,
            args.base_url,
            args.max_concurrency,
            args.max_requests_per_minute,
            args.max_tokens_per_minute,
            args.max_attempts,
            timeout_s=args.timeout_s,
        )
    )
    sys.stdout.write(orjson.dumps(summary).decode() + "\n")


if __name__ == "__main__":
    main()
