"""The shapes of backfill's wire objects, for the OpenAPI document only.

Routes read raw bodies (`deps.json_body`, bounded and parsed once) and render with the domain's `to_openai()` /
`message_batch_object()`; these models describe what they read and write, so that clients can be generated and a
fuzzer can build valid requests. tests/integration/test_openapi.py holds every rendered object against them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema

from backfill.domain.files import MAX_EXPIRES_AFTER_S, MIN_EXPIRES_AFTER_S
from backfill.domain.message_batches import CUSTOM_ID

Purpose = Literal["batch", "user_data", "evals"]  # domain.files.PURPOSES (a test holds them equal)


class _Open(BaseModel):
    """An object that may carry more keys than those listed (engines' bodies, parameters passed through)."""

    model_config = ConfigDict(extra="allow")


# --- errors -------------------------------------------------------------------------------------------------


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str = Field(description="`invalid_request_error`, `authentication_error`, `rate_limit_error`, …")
    param: str | None = Field(description="The parameter at fault, if one is.")
    code: str | None = Field(description="docs/errors.md lists every code.")


class OpenAIError(BaseModel):
    """The OpenAI error envelope, on every route outside /v1/messages."""

    error: OpenAIErrorDetail


class AnthropicErrorDetail(BaseModel):
    type: str = Field(description="`invalid_request_error`, `not_found_error`, `request_too_large`, …")
    message: str


class AnthropicError(BaseModel):
    """Anthropic's error envelope, on every route under /v1/messages."""

    type: Literal["error"]
    error: AnthropicErrorDetail
    request_id: str


# --- files --------------------------------------------------------------------------------------------------


class FileObject(BaseModel):
    id: str = Field(description="`file-…`")
    object: Literal["file"]
    bytes: int
    created_at: int = Field(description="Unix seconds.")
    filename: str
    purpose: Literal["batch", "user_data", "evals", "batch_output"]
    status: Literal["processed"]
    expires_at: int | None = Field(description="Unix seconds, or null if the file never expires.")
    status_details: str | None


class FileList(BaseModel):
    object: Literal["list"]
    data: list[FileObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"]
    deleted: Literal[True]


class FileUpload(BaseModel):
    """`POST /v1/files`, multipart/form-data. A `purpose=batch` file must be JSONL (judged by content, not name)."""

    file: bytes = Field(json_schema_extra={"format": "binary", "contentMediaType": "application/octet-stream"})
    purpose: Purpose
    # Form fields are absent or a value, never null.
    expires_after_anchor: Literal["created_at"] | SkipJsonSchema[None] = Field(
        default=None, alias="expires_after[anchor]", description="With `expires_after[seconds]`."
    )
    expires_after_seconds: int | SkipJsonSchema[None] = Field(
        default=None, alias="expires_after[seconds]", ge=MIN_EXPIRES_AFTER_S, le=MAX_EXPIRES_AFTER_S
    )


# --- batches ------------------------------------------------------------------------------------------------


class BatchError(BaseModel):
    code: str
    message: str
    param: str | None
    line: int | None = Field(description="1-based line of the input file, or null for a problem of the whole file.")


class BatchErrors(BaseModel):
    object: Literal["list"]
    data: list[BatchError]


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class InputTokensDetails(BaseModel):
    cached_tokens: int


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int


class BatchUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class Outlook(BaseModel):
    """backfill's own view of a batch, beside the API's keys."""

    estimated_completion_at: int | None = Field(description="The scheduler's estimate, unix seconds.")
    schedule: str | None = Field(
        description="on_track, promoted, at_risk, harvesting, harvesting_blind, throttled, off_peak, waiting, "
        "loading_model"
    )
    waiting: str | None = Field(
        description="While no endpoint is up, or every one is loading its model: which, since when, and why."
    )


class UnrunCounts(BaseModel):
    expired: int = Field(description="Lines that expired before they ran (counted in `request_counts.failed`).")
    cancelled: int = Field(description="Lines cancelled before they ran (counted in `request_counts.failed`).")


class BatchExtension(Outlook):
    request_counts: UnrunCounts
    output_file_id: str | None = Field(
        description="The output file's id from the start: its content is readable while the batch runs (the "
        "lines settled so far, `X-Incomplete: true`, `X-Last-Line`; `?offset=` resumes)."
    )


class BatchObject(BaseModel):
    id: str = Field(description="`batch_…`")
    object: Literal["batch"]
    endpoint: str
    model: str | None
    errors: BatchErrors | None
    input_file_id: str
    completion_window: str
    status: Literal[
        "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"
    ]
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    in_progress_at: int | None
    expires_at: int
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: RequestCounts
    usage: BatchUsage
    metadata: dict[str, str] | None
    backfill: BatchExtension


class BatchList(BaseModel):
    object: Literal["list"]
    data: list[BatchObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class RetryBatch(BaseModel):
    """`POST /v1/batches/{id}/retry` (backfill's extension); the body is optional."""

    only: list[Literal["failed", "expired", "cancelled"]] = Field(
        default=["failed", "expired", "cancelled"], min_length=1, description="Which lines to run again."
    )


# --- message batches ------------------------------------------------------------------------------------------


class MessageParam(_Open):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class MessageParams(_Open):
    """Messages API parameters. A request whose parameters cannot run ends `errored`; the batch is created."""

    model: str
    max_tokens: int
    messages: list[MessageParam]


class MessageBatchRequest(BaseModel):
    custom_id: str = Field(pattern=f"^{CUSTOM_ID.pattern}$", description="Unique in the batch.")
    params: MessageParams


class CreateMessageBatch(BaseModel):
    requests: list[MessageBatchRequest] = Field(min_length=1, max_length=100_000)


class MessageBatchCounts(BaseModel):
    processing: int
    succeeded: int
    errored: int
    canceled: int
    expired: int


class MessageBatch(BaseModel):
    id: str = Field(description="`msgbatch_…`")
    type: Literal["message_batch"]
    processing_status: Literal["in_progress", "canceling", "ended"]
    request_counts: MessageBatchCounts
    created_at: datetime
    expires_at: datetime
    ended_at: datetime | None
    cancel_initiated_at: datetime | None
    archived_at: datetime | None
    results_url: str | None = Field(description="Where this server serves the results, once the batch has ended.")
    backfill: Outlook


class MessageBatchList(BaseModel):
    data: list[MessageBatch]
    has_more: bool
    first_id: str | None
    last_id: str | None


class MessageBatchDeleted(BaseModel):
    id: str
    type: Literal["message_batch_deleted"]


# --- models -------------------------------------------------------------------------------------------------


class Model(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    """OpenAI's list shape (no `anthropic-version` header)."""

    object: Literal["list"]
    data: list[Model]


class AnthropicModel(BaseModel):
    id: str
    type: Literal["model"]
    display_name: str
    created_at: datetime


class AnthropicModelList(BaseModel):
    """Anthropic's list shape (the request carries `anthropic-version`)."""

    data: list[AnthropicModel]
    first_id: str | None
    last_id: str | None
    has_more: bool


# --- the interactive proxy ----------------------------------------------------------------------------------


class ChatCompletionRequest(_Open):
    """Passed to the engine as sent; `stream: true` answers server-sent events."""

    model: str
    messages: list[dict[str, Any]]
    stream: bool = False


class CompletionRequest(_Open):
    model: str
    prompt: str | list[str]
    stream: bool = False


class EmbeddingRequest(_Open):
    model: str
    input: str | list[str]


class ResponseRequest(_Open):
    model: str
    input: str | list[dict[str, Any]]
    stream: bool = False


class EngineAnswer(_Open):
    """The engine's answer, passed back unchanged."""


# --- health -------------------------------------------------------------------------------------------------


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(_Open):
    status: Literal["ready"]
    backends: dict[str, dict[str, Any]] | None = Field(default=None, description="With the dispatcher running.")
