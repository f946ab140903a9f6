"""BackfillClient: a small typed client for a backfill server's Files and Batches APIs, for the client commands.

Synchronous httpx (the commands are one request at a time); uploads and downloads are streamed, never held in
memory. httpx's exceptions and the server's error envelope become `errors.ServerUnreachable` /
`errors.ServerRejected` here, with a one-line message.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import orjson

from backfill import __version__
from backfill.domain.batches import RETRY_OF, BatchStatus
from backfill.errors import ServerRejected, ServerUnreachable
from backfill.result_files import write_atomically

BATCH_TIMES = (
    "created_at", "in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at",
    "cancelled_at", "expires_at",
)  # fmt: skip


MESSAGE_BATCH_PREFIX = "msgbatch_"
MESSAGES_ENDPOINT = "/v1/messages"


GEMINI_BATCH_PREFIX = "genbatch_"
GEMINI_API = "/gemini/v1beta"
_GEMINI_STATES = {
    "BATCH_STATE_PENDING": BatchStatus.VALIDATING,
    "BATCH_STATE_RUNNING": BatchStatus.IN_PROGRESS,
    "BATCH_STATE_SUCCEEDED": BatchStatus.COMPLETED,
    "BATCH_STATE_FAILED": BatchStatus.FAILED,
    "BATCH_STATE_CANCELLED": BatchStatus.CANCELLED,
    "BATCH_STATE_EXPIRED": BatchStatus.EXPIRED,
}


def is_gemini_batch(batch_id: str) -> bool:
    """A Gemini batch (`genbatch_…`, or its resource name `batches/genbatch_…`), served under /gemini."""
    return batch_id.removeprefix("batches/").startswith(GEMINI_BATCH_PREFIX)


def is_message_batch(batch_id: str) -> bool:
    """An Anthropic message batch (`msgbatch_…`, served under /v1/messages/batches) rather than a batch."""
    return batch_id.startswith(MESSAGE_BATCH_PREFIX)


@dataclass(frozen=True)
class RemoteBatch:
    """The fields of a batch object (SPEC §3), or of a message batch (SPEC §4), the commands show."""

    id: str
    status: BatchStatus
    endpoint: str
    model: str | None
    completion_window: str
    input_file_id: str
    output_file_id: str | None
    error_file_id: str | None
    total: int
    completed: int
    failed: int  # every line that did not succeed: errors, and the lines that expired or were cancelled unrun
    input_tokens: int
    output_tokens: int
    times: dict[str, int]
    errors: list[dict[str, Any]]
    metadata: dict[str, str]
    estimated_completion_at: int | None = None  # backfill's extra field: the scheduler's outlook
    schedule: str | None = None
    waiting: str | None = None  # while no backend can run its lines: "backend X unreachable since …: why"
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)  # the object as the server sent it
    expired: int = 0  # of `failed`, lines that expired before they ran
    cancelled: int = 0  # of `failed`, lines cancelled before they ran
    results_url: str | None = None  # a message batch's results, once it has ended
    partial_output_file_id: str | None = None  # readable while the batch runs (docs/partial-results.md)

    @property
    def is_message_batch(self) -> bool:
        return is_message_batch(self.id)

    @property
    def errored(self) -> int:
        """Lines that ran and failed."""
        return max(0, self.failed - self.expired - self.cancelled)

    @property
    def is_gemini_batch(self) -> bool:
        return is_gemini_batch(self.id)

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> RemoteBatch:
        """From a batch object, a message batch object (`type: message_batch`) or a Gemini batch Operation."""
        if payload.get("type") == "message_batch":
            return cls.from_message_batch(payload)
        if isinstance(payload.get("name"), str) and isinstance(payload.get("metadata"), dict):
            return cls.from_gemini(payload)
        counts = payload.get("request_counts") or {}
        usage = payload.get("usage") or {}
        extension = payload.get("backfill") or {}
        unrun = extension.get("request_counts") or {}
        return cls(
            id=payload["id"],
            status=BatchStatus(payload["status"]),
            endpoint=payload.get("endpoint") or "",
            model=payload.get("model"),
            completion_window=payload.get("completion_window") or "",
            input_file_id=payload.get("input_file_id") or "",
            output_file_id=payload.get("output_file_id"),
            error_file_id=payload.get("error_file_id"),
            total=int(counts.get("total", 0)),
            completed=int(counts.get("completed", 0)),
            failed=int(counts.get("failed", 0)),
            input_tokens=int(usage.get("input_tokens", 0)),
            output_tokens=int(usage.get("output_tokens", 0)),
            times={name: int(payload[name]) for name in BATCH_TIMES if payload.get(name) is not None},
            errors=list((payload.get("errors") or {}).get("data") or []),
            metadata=dict(payload.get("metadata") or {}),
            estimated_completion_at=extension.get("estimated_completion_at"),
            schedule=extension.get("schedule"),
            raw=payload,
            waiting=extension.get("waiting"),
            expired=int(unrun.get("expired", 0)),
            cancelled=int(unrun.get("cancelled", 0)),
            partial_output_file_id=extension.get("output_file_id"),
        )

    @classmethod
    def from_message_batch(cls, payload: dict[str, Any]) -> RemoteBatch:
        """A MessageBatch in the terms of a batch: `ended` becomes completed, or cancelled when a cancel was asked,
        or expired when lines expired; its times become unix seconds."""
        counts = {name: int(value) for name, value in (payload.get("request_counts") or {}).items()}
        extension = payload.get("backfill") or {}
        times = {
            name: _unix(payload[key])
            for name, key in (("created_at", "created_at"), ("expires_at", "expires_at"))
            if payload.get(key)
        }
        if payload.get("cancel_initiated_at"):
            times["cancelling_at"] = _unix(payload["cancel_initiated_at"])
        status = {"canceling": BatchStatus.CANCELLING, "ended": BatchStatus.COMPLETED}.get(
            payload.get("processing_status") or "", BatchStatus.IN_PROGRESS
        )
        if status is BatchStatus.COMPLETED and payload.get("cancel_initiated_at"):
            status = BatchStatus.CANCELLED
        elif status is BatchStatus.COMPLETED and counts.get("expired", 0) and counts.get("processing", 0) == 0:
            status = BatchStatus.EXPIRED
        if status.is_terminal and payload.get("ended_at"):
            times[f"{status.value}_at"] = _unix(payload["ended_at"])
        unrun = counts.get("expired", 0) + counts.get("canceled", 0)
        return cls(
            id=payload["id"],
            status=status,
            endpoint=MESSAGES_ENDPOINT,
            model=None,
            completion_window="24h",
            input_file_id="",
            output_file_id=None,
            error_file_id=None,
            total=sum(counts.values()),
            completed=counts.get("succeeded", 0),
            failed=counts.get("errored", 0) + unrun,
            input_tokens=0,
            output_tokens=0,
            times=times,
            errors=[],
            metadata={},
            estimated_completion_at=extension.get("estimated_completion_at"),
            schedule=extension.get("schedule"),
            raw=payload,
            waiting=extension.get("waiting"),
            expired=counts.get("expired", 0),
            cancelled=counts.get("canceled", 0),
            results_url=payload.get("results_url"),
        )

    @classmethod
    def from_gemini(cls, payload: dict[str, Any]) -> RemoteBatch:
        """A Gemini batch Operation in the terms of a batch: Google's states, counts and times."""
        metadata = payload["metadata"]
        stats = {name: int(value) for name, value in (metadata.get("batchStats") or {}).items()}
        status = _GEMINI_STATES.get(metadata.get("state") or "", BatchStatus.IN_PROGRESS)
        times = {"created_at": _unix(metadata["createTime"])} if metadata.get("createTime") else {}
        if status.is_terminal and metadata.get("endTime"):
            times[f"{status.value}_at"] = _unix(metadata["endTime"])
        output = metadata.get("output") or {}
        extension = payload.get("backfill") or {}
        model = metadata.get("model")
        return cls(
            id=str(payload["name"]).removeprefix("batches/"),
            status=status,
            endpoint="embedContent" if metadata.get("@type", "").endswith("EmbedContentBatch") else "generateContent",
            model=model.removeprefix("models/") if isinstance(model, str) else None,
            completion_window="24h",
            input_file_id="",
            output_file_id=output.get("responsesFile"),
            error_file_id=None,
            total=stats.get("requestCount", 0),
            completed=stats.get("successfulRequestCount", 0),
            failed=stats.get("failedRequestCount", 0),
            input_tokens=0,
            output_tokens=0,
            times=times,
            errors=[],
            metadata={"display_name": metadata["displayName"]} if metadata.get("displayName") else {},
            estimated_completion_at=extension.get("estimated_completion_at"),
            schedule=extension.get("schedule"),
            raw=payload,
            waiting=extension.get("waiting"),
        )


def _unix(rfc3339: str) -> int:
    return int(datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp())


class BackfillClient:
    """One server, one key. Use as a context manager so the connection pool is closed."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout_s: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url
        headers = {"user-agent": f"backfill-cli/{__version__}"}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        self._http = httpx.Client(
            base_url=base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=10.0),
            transport=transport,
        )

    def __enter__(self) -> BackfillClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # --- API --------------------------------------------------------------------------------------------------

    def upload(self, path: Path) -> str:
        """Upload a JSONL file with purpose `batch`, streamed from disk; its file id."""
        with open(path, "rb") as fh:
            payload = self._json(
                "POST", "/v1/files", files={"file": (path.name, fh, "application/jsonl")}, data={"purpose": "batch"}
            )
        return str(payload["id"])

    def create_batch(
        self, input_file_id: str, endpoint: str, window: str, metadata: dict[str, str] | None = None
    ) -> RemoteBatch:
        body: dict[str, Any] = {"input_file_id": input_file_id, "endpoint": endpoint, "completion_window": window}
        if metadata:
            body["metadata"] = metadata
        return RemoteBatch.from_json(self._json("POST", "/v1/batches", json=body))

    def get_batch(self, batch_id: str) -> RemoteBatch:
        """A batch, or a message batch (by its id's prefix)."""
        return RemoteBatch.from_json(self._json("GET", _path_of(batch_id)))

    def cancel_batch(self, batch_id: str) -> RemoteBatch:
        if is_gemini_batch(batch_id):
            self._json("POST", f"{_path_of(batch_id)}:cancel")  # answers an empty object
            return self.get_batch(batch_id)
        return RemoteBatch.from_json(self._json("POST", f"{_path_of(batch_id)}/cancel"))

    def retry_batch(self, batch_id: str, only: Sequence[str] | None = None) -> RemoteBatch:
        """A new batch of a finished batch's failed / expired / cancelled lines (`only`: some of those)."""
        body = {"only": list(only)} if only else {}
        return RemoteBatch.from_json(self._json("POST", f"/v1/batches/{batch_id}/retry", json=body))

    def retries_of(self, batch: RemoteBatch, scan: int = 10_000) -> list[RemoteBatch]:
        """The retries of `batch`, and their retries, oldest first (among the newest `scan` batches)."""
        chain, found = {batch.id}, []
        for candidate in reversed(self.list_batches(scan)):  # oldest first: a retry comes after what it retries
            if candidate.metadata.get(RETRY_OF) in chain:
                chain.add(candidate.id)
                found.append(candidate)
        return found

    def read_lines(self, file_id: str) -> list[bytes]:
        """A JSONL file's lines (without their newlines), in memory: for merging results."""
        with self._transport_errors(), self._http.stream("GET", f"/v1/files/{file_id}/content") as response:
            if response.is_error:
                response.read()
                _raise_for(response)
            return [line for line in response.read().splitlines() if line.strip()]

    def list_batches(self, limit: int = 20) -> list[RemoteBatch]:
        """The newest `limit` batches, newest first (following pages as needed)."""
        found: list[RemoteBatch] = []
        after: str | None = None
        while len(found) < limit:
            params: dict[str, Any] = {"limit": min(100, limit - len(found))}
            if after is not None:
                params["after"] = after
            page = self._json("GET", "/v1/batches", params=params)
            found += [RemoteBatch.from_json(item) for item in page.get("data") or []]
            if not page.get("has_more") or not page.get("last_id"):
                break
            after = str(page["last_id"])
        return found[:limit]

    def list_message_batches(self, limit: int = 20) -> list[RemoteBatch]:
        """The newest `limit` message batches, newest first (following pages as needed)."""
        found: list[RemoteBatch] = []
        after: str | None = None
        while len(found) < limit:
            params: dict[str, Any] = {"limit": min(1000, limit - len(found))}
            if after is not None:
                params["after_id"] = after
            page = self._json("GET", "/v1/messages/batches", params=params)
            found += [RemoteBatch.from_message_batch(item) for item in page.get("data") or []]
            if not page.get("has_more") or not page.get("last_id"):
                break
            after = str(page["last_id"])
        return found[:limit]

    def list_gemini_batches(self, limit: int = 20) -> list[RemoteBatch]:
        """The newest `limit` Gemini batches, newest first (following pages as needed)."""
        found: list[RemoteBatch] = []
        token: str | None = None
        while len(found) < limit:
            params: dict[str, Any] = {"pageSize": min(1000, limit - len(found))}
            if token is not None:
                params["pageToken"] = token
            page = self._json("GET", f"{GEMINI_API}/batches", params=params)
            found += [RemoteBatch.from_gemini(item) for item in page.get("operations") or []]
            if not page.get("nextPageToken"):
                break
            token = str(page["nextPageToken"])
        return found[:limit]

    def list_all(self, limit: int = 20) -> list[RemoteBatch]:
        """The newest `limit` batches, message batches and Gemini batches together, newest first."""
        both = self.list_batches(limit) + self.list_message_batches(limit) + self.list_gemini_batches(limit)
        both.sort(key=lambda batch: batch.times.get("created_at", 0), reverse=True)  # stable: ties keep their order
        return both[:limit]

    def download_gemini_results(self, batch: RemoteBatch, dest: Path) -> int:
        """A Gemini batch's results to `dest`, one JSON line per request in request order: its responses file
        (`{"key", "response" | "error"}`), or its inline responses (`{"response" | "error", "metadata"}`)."""
        if batch.output_file_id is not None:
            name = batch.output_file_id.removeprefix("files/")
            with self._transport_errors(), self._http.stream("GET", f"{GEMINI_API}/files/{name}:download") as response:
                if response.is_error:
                    response.read()
                    _raise_for(response)
                return write_atomically(dest, response.iter_bytes())
        output = (batch.raw.get("metadata") or {}).get("output") or {}
        inline = output.get("inlinedResponses") or output.get("inlinedEmbedContentResponses") or {}
        answers = inline.get("inlinedResponses") or []
        return write_atomically(dest, [orjson.dumps(answer, option=orjson.OPT_APPEND_NEWLINE) for answer in answers])

    def download_results(self, batch_id: str, dest: Path) -> int:
        """Stream a message batch's results (JSONL, one line per request in request order) to `dest`."""
        with (
            self._transport_errors(),
            self._http.stream("GET", f"{_path_of(batch_id)}/results") as response,
        ):
            if response.is_error:
                response.read()
                _raise_for(response)
            return write_atomically(dest, response.iter_bytes())

    def read_from(self, file_id: str, offset: int) -> tuple[bytes, int, bool]:
        """A file's lines after the first `offset`: the bytes, the offset to ask for next (`X-Last-Line`), and
        whether more may come (`X-Incomplete`: a running batch's output, docs/partial-results.md)."""
        with self._transport_errors():
            response = self._http.get(f"/v1/files/{file_id}/content", params={"offset": offset})
        _raise_for(response)
        last = response.headers.get("x-last-line", "")
        return response.content, int(last) if last.isdigit() else offset, response.headers.get("x-incomplete") == "true"

    def download(self, file_id: str, dest: Path) -> int:
        """Stream a file's content to `dest` (replaced only once complete); the number of bytes written."""
        with self._transport_errors(), self._http.stream("GET", f"/v1/files/{file_id}/content") as response:
            if response.is_error:
                response.read()
                _raise_for(response)
            return write_atomically(dest, response.iter_bytes())

    # --- plumbing ---------------------------------------------------------------------------------------------

    def _json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        with self._transport_errors():
            response = self._http.request(method, path, **kwargs)
        _raise_for(response)
        try:
            payload = response.json()
        except ValueError:
            raise ServerRejected(
                f"the server at {self.base_url} answered {method} {path} with something that is not JSON",
                status_code=response.status_code,
            ) from None
        if not isinstance(payload, dict):
            raise ServerRejected(f"unexpected answer to {method} {path}", status_code=response.status_code)
        return payload

    @contextlib.contextmanager
    def _transport_errors(self) -> Iterator[None]:
        try:
            yield
        except httpx.ConnectError as exc:
            raise ServerUnreachable(
                f"cannot connect to the backfill server at {self.base_url} ({_reason(exc)}). Is `backfill serve` "
                "running there? Point --base-url or BACKFILL_BASE_URL at it."
            ) from None
        except httpx.TimeoutException:
            raise ServerUnreachable(f"the backfill server at {self.base_url} did not answer in time") from None
        except httpx.TransportError as exc:
            raise ServerUnreachable(
                f"talking to the backfill server at {self.base_url} failed: {_reason(exc)}"
            ) from None


def _path_of(batch_id: str) -> str:
    if is_gemini_batch(batch_id):
        return f"{GEMINI_API}/batches/{batch_id.removeprefix('batches/')}"
    return f"/v1/messages/batches/{batch_id}" if is_message_batch(batch_id) else f"/v1/batches/{batch_id}"


def _reason(exc: Exception) -> str:
    text = str(exc)
    if "refused" in text.lower():
        return "connection refused"
    return text or type(exc).__name__


def _raise_for(response: httpx.Response) -> None:
    """The server's error envelope as one line: `No such Batch object: batch_x (HTTP 404)`."""
    if not response.is_error:
        return
    message: str | None = None
    try:
        error = response.json().get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            message = error["message"]
    except (ValueError, AttributeError):
        pass
    if message is None:
        message = " ".join(response.text.split())[:200] or response.reason_phrase
    raise ServerRejected(f"{message} (HTTP {response.status_code})", status_code=response.status_code)
