"""The interfaces the core depends on; adapters implement them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection, Iterator, Mapping, Sequence
from typing import Protocol, runtime_checkable

from backfill.domain.batches import Batch, BatchApi, BatchStatus, LineError, RequestState
from backfill.domain.endpoint_report import EndpointReport
from backfill.domain.features import Feature
from backfill.domain.files import FileRecord
from backfill.domain.idempotency import IdempotencyRecord
from backfill.domain.keys import NewKey
from backfill.domain.leases import DispatchBatch, LeasedLine, LineUpdate
from backfill.domain.message_batches import RefusedRequest, UnrunCounts
from backfill.domain.outcomes import Outcome
from backfill.domain.proxy_ttft import Published
from backfill.domain.result_cache import CachedResult
from backfill.domain.results import StoredResult
from backfill.domain.tenants import KeyInfo, KeyMatch, Tenant, TenantChange
from backfill.domain.usage_report import EndedBatch, UsageCounts, UsageKey, UsageRows
from backfill.domain.valid_lines import ValidLine
from backfill.domain.webhooks import Delivery, DeliveryRecord, DeliveryState, WebhookEndpoint


class Clock(Protocol):
    def __call__(self) -> float:
        """Seconds since the epoch."""
        ...


class BlobWriter(Protocol):
    """An upload in progress: nothing is visible under the key until `commit`."""

    @property
    def size(self) -> int: ...

    def write(self, data: bytes) -> None: ...

    async def commit(self) -> None: ...

    async def abort(self) -> None: ...


class BlobStore(Protocol):
    def open_writer(self, key: str) -> BlobWriter: ...

    def iter_chunks(self, key: str, chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
        """Blocking read, for worker threads (validation)."""
        ...

    def stream(self, key: str, chunk_bytes: int = 1 << 16) -> AsyncIterator[bytes]: ...

    async def read_range(self, key: str, offset: int, length: int) -> bytes: ...

    async def delete(self, key: str) -> None: ...

    async def exists(self, key: str) -> bool: ...


class Backend(Protocol):
    """Something that runs one request body on one endpoint path and says what happened."""

    name: str
    models: frozenset[str]
    max_concurrency: int

    async def send(self, endpoint: str, body: bytes, timeout_s: float) -> Outcome: ...

    async def close(self) -> None: ...


@runtime_checkable
class Probes(Protocol):
    """A backend that can say whether its server answers at all (the circuit breaker's probe). One that cannot is
    taken to be up: an in-process engine."""

    async def probe(self) -> str | None:
        """None when the server answers; else why it does not."""
        ...


@runtime_checkable
class LoadsModel(Protocol):
    """A backend that loads its model in-process before it can answer (the embedded engine). The dispatcher has it
    load at start, not at its first line, and its batches show `loading_model` meanwhile."""

    async def load(self) -> None:
        """Load the model (once: later calls return when it is loaded); raises if it cannot be loaded."""
        ...


@runtime_checkable
class IdentifiesModel(Protocol):
    """A backend that can say which weights serve a model (domain.result_cache.model_identity): the result cache
    keeps answers per identity. A backend that cannot never answers from the cache."""

    async def model_identity(self, model: str) -> str | None:
        """The model's identity now; None when it cannot be known at the moment."""
        ...


@runtime_checkable
class DeclaresFeatures(Protocol):
    """A backend that says which optional request features it accepts. One that does not is taken to accept them
    all: it refuses what it cannot do with an HTTP error, which fails that request."""

    features: frozenset[Feature]


# --- the store, split by role -----------------------------------------------------------------------------------
# Each use case and each part of the dispatcher asks for the roles it uses; `Store` is all of them. Adapters:
# `store.sql.SqlStore` (SQLite, PostgreSQL) and `testing.InMemoryStore`. One contract suite runs on all three
# (tests/integration/test_store_*.py). Time is always an argument.


class TenantStore(Protocol):
    """Tenants and their API keys: what authentication and the admin API need."""

    async def ensure_tenant(self, name: str, now: int, enqueued_token_limit: int | None = None) -> str:
        """The id of the tenant called `name`, created if it does not exist."""
        ...

    async def tenant_token_limit(self, tenant_id: str) -> int | None: ...

    async def create_tenant(self, tenant: Tenant) -> None:
        """Insert the tenant; Conflict if one has its name."""
        ...

    async def get_tenant(self, name_or_id: str) -> Tenant | None: ...

    async def list_tenants(self) -> list[Tenant]: ...

    async def update_tenant(self, tenant_id: str, change: TenantChange) -> Tenant:
        """Set its weight and quotas; NotFound if there is no such tenant."""
        ...

    async def move_tenant_data(self, from_tenant_id: str, to_tenant_id: str) -> tuple[int, int]:
        """Give every file and batch of one tenant to another, at once; (files, batches) moved."""
        ...

    async def add_api_key(self, tenant_id: str, key: NewKey, now: int, *, admin: bool = False) -> str:
        """Store the key (its prefix and salted hash); its id."""
        ...

    async def key_candidates(self, prefix: str) -> list[KeyMatch]:
        """Live keys with this prefix."""
        ...

    async def count_api_keys(self) -> int: ...

    async def revoked_among(self, key_ids: Collection[str]) -> set[str]:
        """Which of these keys are revoked (or gone)."""
        ...

    async def record_key_use(self, last_used: Mapping[str, int]) -> None:
        """Set each key's `last_used_at` (never back in time)."""
        ...

    async def list_keys(self, tenant_id: str | None = None) -> list[KeyInfo]: ...

    async def find_key(self, key_id: str) -> KeyInfo | None:
        """The key with this id, or this prefix (`bf-` and the 12 characters after it)."""
        ...

    async def revoke_key(self, key_id: str, now: int) -> bool:
        """Revoke the key; False if it was revoked already."""
        ...


class FileStore(Protocol):
    """File metadata (the bytes are in the blob store). A file of another tenant is not found."""

    async def add_file(self, record: FileRecord) -> None: ...

    async def get_file(self, tenant_id: str | None, file_id: str) -> FileRecord | None: ...

    async def list_files(
        self, tenant_id: str, *, purpose: str | None, limit: int, descending: bool, after: str | None
    ) -> tuple[list[FileRecord], bool] | None:
        """A page of files and whether more follow; None if the `after` cursor is not one of the tenant's."""
        ...

    async def delete_file(self, tenant_id: str, file_id: str) -> FileRecord:
        """Remove the file's row: NotFound, or Conflict while an unfinished batch reads it."""
        ...

    async def expired_files(self, now: int, limit: int = 100) -> list[FileRecord]:
        """Files past `expires_at` that no unfinished batch reads."""
        ...


class BatchStore(Protocol):
    """Batches through their life: create, read, cancel; housekeeping claims; validate, finalize, finish."""

    async def create_batch(self, batch: Batch) -> None: ...

    async def get_batch(self, tenant_id: str | None, batch_id: str, api: BatchApi | None = None) -> Batch | None:
        """The batch; with `api`, only if it was created through that API."""
        ...

    async def list_batches(self, tenant_id: str, *, limit: int, after: str | None) -> tuple[list[Batch], bool] | None:
        """Newest first, OpenAI batches only; None if `after` is not one of the tenant's batches."""
        ...

    async def request_cancel(self, tenant_id: str, batch_id: str, now: int, api: BatchApi | None = None) -> Batch:
        """validating or in_progress -> cancelling (again: unchanged); NotFound, or Conflict once it ended."""
        ...

    async def batches_to_tend(self, now: float, limit: int = 50) -> list[Batch]:
        """Batches with housekeeping due, not claimed by a live worker."""
        ...

    async def claim_batch(self, batch_id: str, owner: str, now: float, ttl_s: float) -> bool: ...

    async def release_batch(self, batch_id: str, owner: str) -> None: ...

    async def start_batch(
        self,
        batch_id: str,
        owner: str,
        model: str | None,
        lines: Sequence[ValidLine],
        now: int,
        *,
        token_limit: int | None = None,
    ) -> bool:
        """validating -> in_progress with all its lines, at once; False if the batch moved on. Over `token_limit`
        raises TokenLimitExceeded and changes nothing."""
        ...

    async def fail_batch(self, batch_id: str, owner: str, model: str | None, errors: list[LineError], now: int) -> bool:
        """validating -> failed with line-numbered errors."""
        ...

    async def mark_finalizing(self, batch_id: str, owner: str, now: int) -> bool:
        """in_progress -> finalizing; False if the batch moved on."""
        ...

    async def finish_batch(
        self, batch_id: str, owner: str, status: BatchStatus, outputs: Sequence[FileRecord | None], now: int
    ) -> bool:
        """Register the output and error files and set the terminal status, at once; only from a status that may
        legally move to it."""
        ...

    async def enqueued_tokens(self, tenant_id: str, model: str) -> int:
        """Estimated prompt tokens of the tenant's unfinished lines for `model`."""
        ...


class LineQueue(Protocol):
    """The lines of running batches: lease (fenced on owner and lease_seq), record, renew, reclaim, read back."""

    async def dispatchable_batches(self, now: float) -> list[DispatchBatch]:
        """In-progress batches inside their window with lines not yet finished, earliest deadline first."""
        ...

    async def set_outlooks(
        self, outlooks: Sequence[tuple[str, int | None, str | None]], waiting: Mapping[str, str] | None = None
    ) -> None:
        """Write the scheduler's (batch id, estimated completion, schedule state) onto in-progress batches, and what
        each waits for (`waiting`, by batch id; cleared for the others)."""
        ...

    async def batch_statuses(self, batch_ids: Sequence[str]) -> dict[str, tuple[BatchStatus, int]]:
        """Status and expires_at of each batch."""
        ...

    async def lease_lines(self, batch_id: str, owner: str, limit: int, now: float, ttl_s: float) -> list[LeasedLine]:
        """Claim up to `limit` queued lines whose retry time has come, in (prefix group, line number) order."""
        ...

    async def renew_leases(self, owner: str, now: float, ttl_s: float) -> None:
        """Push back the expiry of every lease and batch claim this owner holds."""
        ...

    async def reclaim_lapsed_leases(self, now: float) -> int:
        """Lines whose holder stopped renewing go back to the queue (uncharged)."""
        ...

    async def release_all_leases(self) -> int:
        """Every leased line back to the queue and every batch claim dropped, whoever holds them."""
        ...

    async def record(self, owner: str, updates: Sequence[LineUpdate]) -> int:
        """Write line results and the batch counters at once, each fenced on its lease; returns lines written."""
        ...

    async def close_queued_lines(self, batch_id: str, state: RequestState, note: str | None = None) -> int:
        """Queued lines of an expiring or cancelling batch end as `state` and count as failed; `note` becomes the
        error message of those without one (the last backend error each met is kept)."""
        ...

    def iter_results(self, batch_id: str, page_size: int = 2000) -> AsyncIterator[StoredResult]:
        """Every line of a batch in input order."""
        ...

    async def settled_successes(self, batch_id: str) -> int:
        """Succeeded lines before the batch's first line still open: the part of its output that cannot change
        any more (partial output while it runs)."""
        ...

    async def line_state_counts(self, batch_id: str) -> dict[str, int]: ...


class WorkerBoard(Protocol):
    """What dispatcher processes tell each other: their rate per model pool and batch tokens per backend."""

    async def share_rates(
        self, owner: str, rates: Mapping[str, float], now: float, stale_after_s: float
    ) -> dict[str, float]:
        """Publish this process's rate per model; return every live process's rates summed per model."""
        ...

    async def share_batch_tokens(
        self,
        owner: str,
        tokens: Mapping[str, int],
        now: float,
        stale_after_s: float,
        reports: Mapping[str, EndpointReport] | None = None,
    ) -> dict[str, dict[str, int]]:
        """Publish this process's batch-token counter per harvested backend (and what it knows of each backend: its
        lines in flight there, its part of the harvest ceiling, …); return every live process's counters, by
        backend."""
        ...

    async def endpoint_reports(self, now: float, stale_after_s: float) -> dict[str, EndpointReport]:
        """What every live dispatcher process reports of each backend, combined (domain/endpoint_report.py)."""
        ...

    async def share_ttft(
        self, owner: str, published: Mapping[str, Published], now: float, stale_after_s: float
    ) -> None:
        """Publish this API replica's interactive TTFT samples per backend (domain/proxy_ttft.py)."""
        ...

    async def proxy_ttft(self, now: float, stale_after_s: float) -> dict[str, dict[str, Published]]:
        """Every live API replica's published TTFT samples: backend -> replica -> what it published."""
        ...

    async def forget_rates(self, owner: str) -> None:
        """A process that stops takes its rates, counters and samples with it."""
        ...


class MessageBatchStore(Protocol):
    """What only message batches (SPEC §4) need; the rest is shared with OpenAI batches."""

    async def add_message_batch(
        self, batch: Batch, refused: Sequence[RefusedRequest], owner: str, claim_until: float
    ) -> None:
        """Insert a message batch still `validating`, claimed by `owner`, with its refused requests as failed lines."""
        ...

    async def discard_batch(self, batch_id: str) -> None:
        """Remove a batch that never started, with its lines."""
        ...

    async def list_message_batches(
        self,
        tenant_id: str,
        *,
        limit: int,
        before_id: str | None,
        after_id: str | None,
        api: BatchApi = BatchApi.ANTHROPIC,
    ) -> tuple[list[Batch], bool] | None:
        """Newest first, a page next to one cursor; None if the cursor is not one of the tenant's batches of `api`
        (message batches, or Gemini batches)."""
        ...

    async def unrun_counts(self, batch_ids: Sequence[str]) -> dict[str, UnrunCounts]:
        """Per batch, its lines that ended expired or cancelled without running."""
        ...

    async def archive_batch(self, batch_id: str, archived_at: int) -> None:
        """Record that a batch's results are no longer kept (once)."""
        ...

    async def delete_message_batch(self, tenant_id: str, batch_id: str, api: BatchApi = BatchApi.ANTHROPIC) -> Batch:
        """Remove an ended message batch (or Gemini batch) and its lines: NotFound, or Conflict while it runs."""
        ...


class WebhookStore(Protocol):
    """Webhook endpoints per tenant and the outbox of deliveries (docs/webhooks.md). A batch's terminal status
    queues its event in the same transaction (`finish_batch`, `fail_batch`)."""

    async def add_webhook_endpoint(self, endpoint: WebhookEndpoint) -> None: ...

    async def list_webhook_endpoints(self, tenant_id: str | None = None) -> list[WebhookEndpoint]: ...

    async def delete_webhook_endpoint(self, tenant_id: str, endpoint_id: str) -> bool:
        """Remove the endpoint and its deliveries; False if the tenant has no such endpoint."""
        ...

    async def sync_config_endpoints(self, endpoints: Sequence[WebhookEndpoint]) -> None:
        """Make the endpoints that came from the config file exactly these (admin-made ones are untouched)."""
        ...

    async def announce_at_risk(self, batch_ids: Sequence[str], now: int) -> int:
        """Queue the at-risk event of each in-progress batch that never had one; how many deliveries were queued."""
        ...

    async def lease_deliveries(self, owner: str, now: float, limit: int, ttl_s: float) -> list[Delivery]:
        """Claim due pending deliveries that no live sender holds."""
        ...

    async def settle_delivery(
        self, seq: int, owner: str, now: float, *, delivered: bool, retry_at: float | None, error: str | None
    ) -> bool:
        """Delivered; or try again at `retry_at`; or dead-letter (None). False if `owner` lost the lease."""
        ...

    async def list_deliveries(
        self, state: DeliveryState, tenant_id: str | None = None, limit: int = 100
    ) -> list[DeliveryRecord]: ...

    async def redeliver(self, seq: int, now: float) -> bool:
        """A dead letter goes back to pending for one more try; False if it is not dead."""
        ...


class ResultCache(Protocol):
    """Answers of deterministic lines kept across batches, per tenant (domain.result_cache). They are written with
    the lines they come from: a `LineUpdate` with a `cache_key` that `record` lands keeps its answer, or, for a line
    answered from the cache (`cached_from`), marks the entry used at its `finished_at` (the LRU order)."""

    async def cached_result(self, tenant_id: str, key: str) -> CachedResult | None:
        """The answer kept under `key` for the tenant; None if there is none."""
        ...

    async def trim_result_cache(self, max_entries: int) -> int:
        """Drop each tenant's least recently used entries beyond `max_entries`; returns how many went."""
        ...


class WorkerStore(TenantStore, FileStore, BatchStore, LineQueue, WorkerBoard, WebhookStore, ResultCache, Protocol):
    """What a dispatcher worker uses: validation and finalize (lifecycle), leasing and recording, housekeeping."""


class IdempotencyStore(Protocol):
    """Idempotency keys of creates, per tenant: claimed by the first request, then holding its answer."""

    async def claim_idempotency_key(
        self, tenant_id: str, key: str, now: int, ttl_s: int, abandoned_after_s: int
    ) -> IdempotencyRecord | None:
        """Claim `key` for a request starting now: None if this request got it, else the record of the one that
        did. Expired keys, and claims whose request never finished (its process died), are dropped first."""
        ...

    async def record_idempotent_response(
        self, tenant_id: str, key: str, fingerprint: str, status: int, body: bytes
    ) -> None: ...

    async def release_idempotency_key(self, tenant_id: str, key: str) -> None:
        """Forget a claim whose request failed: a retry with the same key runs afresh."""
        ...


class UsageStore(Protocol):
    """Usage per tenant, model, minute and kind (docs/usage.md). Batch lines add theirs in `record`."""

    async def add_usage(self, rows: Mapping[UsageKey, UsageCounts]) -> None:
        """Add to the rows (interactive requests through the proxy)."""
        ...

    async def usage_rows(self, start: int, end: int, tenant_id: str | None = None) -> UsageRows:
        """Rows whose minute is in [start, end), of one tenant or all."""
        ...

    async def ended_batches(self, start: int, end: int, tenant_id: str | None = None) -> list[EndedBatch]:
        """Batches that reached a terminal status in [start, end), for the SLA report."""
        ...


class Store(WorkerStore, MessageBatchStore, IdempotencyStore, UsageStore, Protocol):
    """Everything backfill keeps."""

    async def close(self) -> None: ...
