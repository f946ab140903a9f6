"""The schema. Change it only together with an Alembic migration (a test compares the two)."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
    false,
    text,
)

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL gets a BIGINT identity.
Serial = BigInteger().with_variant(Integer(), "sqlite")

tenants = Table(
    "tenants",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(128), nullable=False, unique=True),
    Column("weight", Float, nullable=False, default=1.0),
    Column("enqueued_token_limit", BigInteger, nullable=True),
    Column("created_at", BigInteger, nullable=False),
    # Quotas (domain.tenants.QUOTAS); null: no limit.
    Column("max_batches_in_progress", BigInteger, nullable=True),
    Column("batch_creates_per_minute", BigInteger, nullable=True),
    Column("batch_tokens_per_minute", BigInteger, nullable=True),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("tenant_id", String(64), ForeignKey("tenants.id"), nullable=False, index=True),
    Column("prefix", String(32), nullable=False, unique=True),
    Column("salt", String(64), nullable=False),
    Column("key_hash", String(128), nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("revoked_at", BigInteger, nullable=True),
    Column("is_admin", Boolean, nullable=False, default=False, server_default=false()),
    # Written by the API processes in the background, a few seconds late at most (http.auth).
    Column("last_used_at", BigInteger, nullable=True),
)

files = Table(
    "files",
    metadata,
    Column("seq", Serial, primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False, unique=True),
    Column("tenant_id", String(64), ForeignKey("tenants.id"), nullable=False),
    Column("filename", Text, nullable=False),
    Column("purpose", String(32), nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("blob_key", Text, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=True),
    Index(None, "tenant_id", "seq"),
    Index(None, "expires_at"),
)

batches = Table(
    "batches",
    metadata,
    Column("seq", Serial, primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False, unique=True),
    Column("tenant_id", String(64), ForeignKey("tenants.id"), nullable=False),
    Column("endpoint", String(64), nullable=False),
    Column("input_file_id", String(64), nullable=False, index=True),
    Column("completion_window", String(16), nullable=False),
    Column("status", String(16), nullable=False, index=True),
    Column("model", Text, nullable=True),
    Column("metadata", Text, nullable=True),  # JSON object
    Column("errors", Text, nullable=True),  # JSON list of line errors
    Column("output_file_id", String(64), nullable=True),
    Column("error_file_id", String(64), nullable=True),
    Column("output_expires_after_s", BigInteger, nullable=True),
    Column("created_at", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=False),
    Column("in_progress_at", BigInteger, nullable=True),
    Column("finalizing_at", BigInteger, nullable=True),
    Column("completed_at", BigInteger, nullable=True),
    Column("failed_at", BigInteger, nullable=True),
    Column("expired_at", BigInteger, nullable=True),
    Column("cancelling_at", BigInteger, nullable=True),
    Column("cancelled_at", BigInteger, nullable=True),
    Column("total", Integer, nullable=False, default=0),
    Column("completed", Integer, nullable=False, default=0),
    Column("failed", Integer, nullable=False, default=0),
    Column("input_tokens", BigInteger, nullable=False, default=0),
    Column("cached_tokens", BigInteger, nullable=False, default=0),
    Column("output_tokens", BigInteger, nullable=False, default=0),
    Column("reasoning_tokens", BigInteger, nullable=False, default=0),
    Column("est_prompt_tokens", BigInteger, nullable=False, default=0),
    Column("est_output_tokens", BigInteger, nullable=False, default=0, server_default="0"),
    # The scheduler's outlook, written by the dispatcher: estimated completion and on_track/promoted/at_risk.
    Column("eta_at", BigInteger, nullable=True),
    Column("schedule_state", String(16), nullable=True),
    # While no endpoint of its pool is up: "backend X unreachable since …: why" (DESIGN.md section 6).
    Column("waiting", Text, nullable=True),
    # Housekeeping (validate, expire, cancel, finalize) is claimed like lines are, so it happens once.
    Column("claimed_by", String(64), nullable=True),
    Column("claim_expires_at", Float, nullable=True),
    # Message batches (SPEC §4) are batches too; `api` says which API shows them, and their results are dropped
    # from view once `archived_at` is set.
    Column("api", String(16), nullable=False, default="openai", server_default="openai"),
    Column("archived_at", BigInteger, nullable=True),
    Index(None, "tenant_id", "seq"),
)

# The predicates of the partial indexes over `requests` (states as literals; see the indexes below).
QUEUED_ONLY = text("state = 'queued'")
OPEN_ONLY = text("state IN ('queued', 'leased')")
LEASED_ONLY = text("state = 'leased'")

requests = Table(
    "requests",
    metadata,
    Column("id", Serial, primary_key=True, autoincrement=True),
    Column("batch_id", String(64), ForeignKey("batches.id", ondelete="CASCADE"), nullable=False),
    Column("line_no", Integer, nullable=False),
    Column("custom_id", Text, nullable=False),
    Column("body_offset", BigInteger, nullable=False),
    Column("body_length", Integer, nullable=False),
    Column("est_prompt_tokens", Integer, nullable=False),
    # What the scheduler prices a line at before it runs: the requested output cap (None: the model default).
    Column("max_output_tokens", Integer, nullable=True),
    # Lease rank from domain.lines.group_by_prefix: (rank, line) order keeps the engine's prefix cache hot.
    Column("prefix_group", BigInteger, nullable=False, default=0, server_default="0"),
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", Float, nullable=False, default=0.0),
    Column("lease_owner", String(64), nullable=True),
    Column("lease_seq", Integer, nullable=False, default=0),
    Column("lease_expires_at", Float, nullable=True),
    Column("result_id", String(64), nullable=True),
    Column("status_code", Integer, nullable=True),
    Column("request_id", Text, nullable=True),
    Column("body", LargeBinary, nullable=True),
    Column("error_code", String(64), nullable=True),
    Column("error_message", Text, nullable=True),
    Column("input_tokens", BigInteger, nullable=False, default=0),
    Column("cached_tokens", BigInteger, nullable=False, default=0),
    Column("output_tokens", BigInteger, nullable=False, default=0),
    Column("reasoning_tokens", BigInteger, nullable=False, default=0),
    # The line whose answer this one reuses from the result cache (its result_id); NULL if a backend answered.
    Column("cached_from", String(64), nullable=True),
    UniqueConstraint("batch_id", "line_no"),
    # Partial indexes, each over the lines in the states its queries ask for, so that a line changing state
    # rewrites as few index entries as can be: the lease picks from the queued lines in (prefix group, line) order,
    # and "how far has this batch got" asks for the first line still open. A finished line is in neither, so
    # finishing one (the group commit) only removes it from the open lines. Queries that use them say the states
    # as literals (`store.lines.IS_QUEUED`, `IS_OPEN`): a bound parameter cannot match a partial index.
    Index(None, "batch_id", "prefix_group", "line_no", sqlite_where=QUEUED_ONLY, postgresql_where=QUEUED_ONLY),
    Index(None, "batch_id", "line_no", sqlite_where=OPEN_ONLY, postgresql_where=OPEN_ONLY),
    # Leased lines only (the heartbeat renews them by owner, the sweep reclaims lapsed ones): a queued or finished
    # line is in no entry of it, so ingest, results and the many finished rows cost it nothing. Queries that use it
    # say `state = 'leased'` as a literal (`store.lines.IS_LEASED`): a bound parameter cannot match a partial index.
    Index(None, "lease_expires_at", sqlite_where=LEASED_ONLY, postgresql_where=LEASED_ONLY),
)

# What each dispatcher process serves per model pool (line cost per second), so that completion estimates use
# the rate of every worker together. A row not refreshed for a while belongs to a process that died.
worker_rates = Table(
    "worker_rates",
    metadata,
    Column("owner", String(64), primary_key=True),
    Column("model", Text, primary_key=True),
    Column("rate", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)

# What each dispatcher process has sent to each harvested backend (prompt + output tokens of its batch lines, a
# counter since it started), so that every worker's harvest controller counts all batch work as batch, not the
# other workers' as interactive, and knows how many workers share the endpoint; and its batch lines in flight at each
# backend, which API replicas route interactive requests by.
worker_backends = Table(
    "worker_backends",
    metadata,
    Column("owner", String(64), primary_key=True),
    Column("backend", Text, primary_key=True),
    Column("batch_tokens", BigInteger, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("in_flight", Integer, nullable=False, server_default="0"),  # its batch lines in flight there now
    # What it knows of the endpoint, for the dashboard (domain/endpoint_report.py); null where not known.
    Column("ceiling", Float, nullable=True),
    Column("engine_waiting", Integer, nullable=True),
    Column("up", Boolean, nullable=True),
    Column("ttft_baseline_s", Float, nullable=True),
)

# The interactive TTFT samples each API replica's proxy measured per backend (the last few hundred, oldest first, as
# orjson floats), with `seq` the count of samples it has measured there since it started: a worker takes the
# samples past the `seq` it saw last. A row not refreshed for a while belongs to a replica that stopped.
proxy_ttft = Table(
    "proxy_ttft",
    metadata,
    Column("owner", String(64), primary_key=True),
    Column("backend", Text, primary_key=True),
    Column("seq", BigInteger, nullable=False),
    Column("samples", LargeBinary, nullable=False),
    Column("updated_at", Float, nullable=False),
)

# Idempotency-Key of a create (POST /v1/files, POST /v1/batches), per tenant: the request's fingerprint and, once
# served, the answer to replay for 24 hours. `response_status` null: the first request is still being served.
idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("tenant_id", String(64), primary_key=True),
    Column("key", String(255), primary_key=True),
    Column("fingerprint", String(64), nullable=True),
    Column("response_status", Integer, nullable=True),
    Column("response_body", LargeBinary, nullable=True),
    Column("created_at", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=False),
    Index(None, "expires_at"),
)

# Webhook endpoints of a tenant (docs/webhooks.md). The secret is kept as given: signing needs it.
webhook_endpoints = Table(
    "webhook_endpoints",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("tenant_id", String(64), ForeignKey("tenants.id"), nullable=False, index=True),
    Column("url", Text, nullable=False),
    Column("secret", Text, nullable=False),
    Column("created_at", BigInteger, nullable=False),
)

# The outbox: one row per event and endpoint, written in the transaction that sets the batch's terminal status,
# leased by a worker's webhook sender while it sends. `event_id` is the `webhook-id`, the same on every retry.
webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("seq", Serial, primary_key=True, autoincrement=True),
    Column("event_id", String(64), nullable=False),
    Column("type", String(64), nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("batch_id", String(64), nullable=False),
    Column("tenant_id", String(64), nullable=False),
    Column("endpoint_id", String(64), ForeignKey("webhook_endpoints.id", ondelete="CASCADE"), nullable=False),
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", Float, nullable=False),
    Column("lease_owner", String(64), nullable=True),
    Column("lease_expires_at", Float, nullable=True),
    Column("last_error", Text, nullable=True),
    Column("finished_at", BigInteger, nullable=True),  # delivered, or dead-lettered
    UniqueConstraint("endpoint_id", "batch_id", "type"),  # an event happens once per batch
    Index(None, "state", "next_attempt_at"),
    Index(None, "tenant_id", "state"),
)

# Usage per tenant, model, minute and kind (batch / interactive): docs/usage.md. Batch rows move in the group
# commit that writes the lines they count; interactive ones are flushed by the API process every second or so.
usage_minutes = Table(
    "usage_minutes",
    metadata,
    Column("start_time", BigInteger, nullable=False),
    Column("tenant_id", String(64), nullable=False),
    Column("model", String(256), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("requests", BigInteger, nullable=False, default=0),
    Column("input_tokens", BigInteger, nullable=False, default=0),
    Column("cached_tokens", BigInteger, nullable=False, default=0),
    Column("output_tokens", BigInteger, nullable=False, default=0),
    # Batch tokens (input + output) by the capacity their lines ran in (domain.usage_report.Capacity).
    Column("harvested_tokens", BigInteger, nullable=False, default=0),
    Column("off_peak_tokens", BigInteger, nullable=False, default=0),
    Column("promoted_tokens", BigInteger, nullable=False, default=0),
    Column("dedicated_tokens", BigInteger, nullable=False, default=0),
    Column("result_cache_hits", BigInteger, nullable=False, default=0, server_default="0"),
    Column("result_cache_tokens", BigInteger, nullable=False, default=0, server_default="0"),
    PrimaryKeyConstraint("start_time", "tenant_id", "model", "kind"),
)

# The result cache across batches (domain.result_cache): a deterministic line's answer, per tenant, by the hash of
# endpoint, model, model identity and canonical body. `used_at` orders the LRU eviction.
result_cache = Table(
    "result_cache",
    metadata,
    Column("tenant_id", String(64), nullable=False),
    Column("key", String(64), nullable=False),
    Column("result_id", String(64), nullable=False),
    Column("status_code", Integer, nullable=False),
    Column("request_id", Text, nullable=True),
    Column("body", LargeBinary, nullable=False),
    Column("input_tokens", BigInteger, nullable=False, default=0),
    Column("cached_tokens", BigInteger, nullable=False, default=0),
    Column("output_tokens", BigInteger, nullable=False, default=0),
    Column("reasoning_tokens", BigInteger, nullable=False, default=0),
    Column("created_at", BigInteger, nullable=False),
    Column("used_at", BigInteger, nullable=False),
    PrimaryKeyConstraint("tenant_id", "key"),
    Index(None, "tenant_id", "used_at"),
)
