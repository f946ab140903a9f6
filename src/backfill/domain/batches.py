"""Batch, its statuses and legal transitions, and the OpenAI batch object (SPEC §3)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from backfill.domain.usage import Usage

# OpenAI's batch endpoints, and vLLM's pooling APIs as vLLM serves them (docs/embeddings.md): `/classify` has no
# `/v1` spelling; score and rerank have both, and vLLM's own batch runner accepts either.
OPENAI_ENDPOINTS = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/moderations"}
)
POOLING_ENDPOINTS = frozenset({"/classify", "/v1/score", "/score", "/v1/rerank", "/rerank"})
ENDPOINTS = OPENAI_ENDPOINTS | POOLING_ENDPOINTS


class BatchApi(StrEnum):
    """Which API a batch was created through: it decides how the batch and its results are shown."""

    OPENAI = "openai"
    ANTHROPIC = "anthropic"
    GEMINI = "gemini"
    RESPONSES = "responses"  # a `background: true` Responses call: a one-line batch, read at /v1/responses/{id}
    FLEX = "flex"  # a `service_tier: "flex"` call the proxy waits for: a one-line batch nobody lists


class BatchStatus(StrEnum):
    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL


# The metadata key that links a retry batch (POST /v1/batches/{id}/retry) to the batch it retries.
RETRY_OF = "backfill_retry_of"

TERMINAL = frozenset({BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.EXPIRED, BatchStatus.CANCELLED})
CANCELLABLE = frozenset({BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS})

# Which status a batch may move to from which. Files are written while the batch still shows `finalizing`,
# `cancelling` or `in_progress` (expiry); the terminal status is set together with the file ids.
TRANSITIONS: dict[BatchStatus, frozenset[BatchStatus]] = {
    BatchStatus.VALIDATING: frozenset(
        {BatchStatus.IN_PROGRESS, BatchStatus.FAILED, BatchStatus.CANCELLING, BatchStatus.EXPIRED}
    ),
    BatchStatus.IN_PROGRESS: frozenset({BatchStatus.FINALIZING, BatchStatus.CANCELLING, BatchStatus.EXPIRED}),
    BatchStatus.CANCELLING: frozenset({BatchStatus.CANCELLED}),
    BatchStatus.FINALIZING: frozenset({BatchStatus.COMPLETED}),
}


def sources_of(new: BatchStatus) -> frozenset[BatchStatus]:
    """Every status a batch may legally be in just before moving to `new`."""
    return frozenset(old for old, targets in TRANSITIONS.items() if new in targets)


class RequestState(StrEnum):
    """State of one input line. `queued` and `leased` are open; the rest are final."""

    QUEUED = "queued"
    LEASED = "leased"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"


OPEN_STATES = (RequestState.QUEUED, RequestState.LEASED)


class ScheduleState(StrEnum):
    """How the scheduler sees an in-progress batch."""

    ON_TRACK = "on_track"  # expected to finish inside its window at its fair share
    PROMOTED = "promoted"  # laxity ran low: its lines go ahead of other work
    AT_RISK = "at_risk"  # expected to miss its window even when promoted
    # On endpoints shared with interactive traffic (`harvest = true`):
    HARVESTING = "harvesting"  # running in the capacity interactive traffic leaves
    THROTTLED = "throttled"  # held back: interactive traffic needs the endpoints now
    OFF_PEAK = "off_peak"  # held to the share its pool's off-peak windows allow at this hour
    # Running, but an engine's /metrics cannot be read: batch is held to a conservative share of that endpoint.
    HARVESTING_BLIND = "harvesting_blind"
    WAITING = "waiting"  # no endpoint of its pool is up: it waits for one to come back (`Batch.waiting` says which)
    LOADING = "loading_model"  # every endpoint of its pool is an embedded engine still loading its model


def output_file_id_of(batch_id: str) -> str:
    """The id an OpenAI batch's output file is registered under when the batch ends, known from the start: its
    content can be read while the batch runs (partial output, docs/partial-results.md)."""
    return "file-" + batch_id.removeprefix("batch_")


def batch_id_of_output(file_id: str) -> str | None:
    """The batch whose output file `file_id` would be, if it is shaped like one."""
    return "batch_" + file_id.removeprefix("file-") if file_id.startswith("file-") else None


@dataclass(frozen=True)
class LineError:
    """One content problem of an input file, reported in `batch.errors` with its 1-based line."""

    code: str
    message: str
    line: int | None = None
    param: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "param": self.param, "line": self.line}


@dataclass
class Batch:
    id: str
    tenant_id: str
    endpoint: str
    input_file_id: str
    completion_window: str
    status: BatchStatus
    created_at: int
    expires_at: int
    metadata: dict[str, str] | None = None
    model: str | None = None
    errors: list[LineError] | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    output_expires_after_s: int | None = None
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    total: int = 0
    completed: int = 0
    failed: int = 0
    usage: Usage = field(default_factory=Usage)
    api: BatchApi = BatchApi.OPENAI
    archived_at: int | None = None  # message batches only: when their results stopped being kept
    eta_at: int | None = None  # the scheduler's estimated completion (unix seconds)
    schedule_state: str | None = None  # see ScheduleState
    waiting: str | None = None  # while no endpoint is up: "backend X unreachable since …: why"

    @property
    def is_waiting(self) -> bool:
        """In progress, with no endpoint up to run its lines, or every one still loading its model (the
        dispatcher's last outlook said so)."""
        return self.status is BatchStatus.IN_PROGRESS and self.schedule_state in _WAITING_STATES

    def extension(self) -> dict[str, Any]:
        """backfill's own view of the batch, shown beside the API's keys (`backfill`). An ended batch has no
        schedule and no estimate any more."""
        return {
            "estimated_completion_at": None if self.status.is_terminal else self.eta_at,
            "schedule": None if self.status.is_terminal else self.schedule_state,
            "waiting": self.waiting if self.is_waiting else None,
        }

    def to_openai(self, *, expired: int = 0, cancelled: int = 0, output_id_at_start: bool = False) -> dict[str, Any]:
        """The batch object exactly as SPEC §3 lists it: every key, null where unset. `expired` and `cancelled`:
        its lines that ended so without running, which `request_counts.failed` counts among the failed.
        `output_id_at_start`: `output_file_id` while the batch runs too (`output_file_id_at_start`)."""
        announced = self.output_file_id or (output_file_id_of(self.id) if not self.status.is_terminal else None)
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "model": self.model,
            "errors": ({"object": "list", "data": [error.to_dict() for error in self.errors]} if self.errors else None),
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status.value,
            "output_file_id": announced if output_id_at_start else self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "in_progress_at": self.in_progress_at,
            "expires_at": self.expires_at,
            "finalizing_at": self.finalizing_at,
            "completed_at": self.completed_at,
            "failed_at": self.failed_at,
            "expired_at": self.expired_at,
            "cancelling_at": self.cancelling_at,
            "cancelled_at": self.cancelled_at,
            "request_counts": {"total": self.total, "completed": self.completed, "failed": self.failed},
            "usage": self.usage.to_openai(),
            "metadata": self.metadata,
            # Ours, beside SPEC's keys (the SDKs keep unknown fields: `batch.model_extra["backfill"]`). The output
            # file's id is there from the start: readable while the batch runs (a growing prefix, `X-Incomplete:
            # true`); `output_file_id` itself stays null until the batch ends, as OpenAI's clients expect.
            "backfill": self.extension()
            | {
                "request_counts": {"expired": expired, "cancelled": cancelled},
                "output_file_id": announced,
            },
        }


_WAITING_STATES = frozenset({ScheduleState.WAITING.value, ScheduleState.LOADING.value})
