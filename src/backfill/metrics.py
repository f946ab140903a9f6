"""Prometheus metrics, on a registry owned by the process's Services (no global default registry)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from backfill.domain.outcomes import Outcome, OutcomeKind

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# Batch turnaround, from a minute to past the longest default window (7 d).
_TURNAROUND_BUCKETS = (60, 300, 900, 1800, 3600, 7200, 14400, 28800, 43200, 86400, 172800, 345600, 604800, 1209600)
_TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30)


def outcome_label(outcome: Outcome) -> str:
    if outcome.kind is OutcomeKind.TIMEOUT:
        return "timeout"
    if outcome.kind is OutcomeKind.UNAVAILABLE:
        return "unavailable"
    code = outcome.status_code or 0
    return "429" if code == 429 else f"{code // 100}xx"


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.backend_requests = Counter(
            "backfill_backend_requests",
            "Requests sent to backends, by outcome (2xx, 4xx, 429, 5xx, timeout, unavailable).",
            ["backend", "outcome"],
            registry=self.registry,
        )
        self.backend_seconds = Histogram(
            "backfill_backend_request_seconds",
            "Time from sending a line to its backend's answer.",
            ["backend"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "backfill_backend_in_flight", "Lines in flight to each backend.", ["backend"], registry=self.registry
        )
        self.lines_finished = Counter(
            "backfill_lines_finished",
            "Lines that reached a final state (succeeded, failed, expired, cancelled).",
            ["state"],
            registry=self.registry,
        )
        self.line_retries = Counter(
            "backfill_line_retries", "Attempts that will be retried later.", ["backend"], registry=self.registry
        )
        self.lines_preempted = Counter(
            "backfill_lines_preempted",
            "Lines handed back uncharged so that a tenant short of its fair share got the slot.",
            ["backend"],
            registry=self.registry,
        )
        self.engine_waiting = Gauge(
            "backfill_engine_waiting",
            "Requests waiting in each engine's own queue, as its /metrics said at the last reading (what the harvest "
            "controller watches; absent for an engine whose queue is not read).",
            ["backend"],
            registry=self.registry,
        )
        self.harvest_ttft_baseline = Gauge(
            "backfill_harvest_ttft_baseline_seconds",
            "The interactive time to first token the harvest controller holds batch work to: its learned baseline "
            "(absent until learned).",
            ["backend"],
            registry=self.registry,
        )
        self.result_cache_lookups = Counter(
            "backfill_result_cache_lookups",
            "Lines of batches with the result cache on, looked up before sending: `hit` (answered from it, no "
            "backend request) or `miss`; `error` when the store could not answer (the line is sent).",
            ["outcome"],
            registry=self.registry,
        )
        self.lines_shed = Counter(
            "backfill_lines_shed",
            "Lines aborted and handed back uncharged because interactive traffic needed the endpoint (harvest).",
            ["backend"],
            registry=self.registry,
        )
        self.backend_up = Gauge(
            "backfill_backend_up",
            "1 while a backend is up, 0 while its circuit is open or recovering (down: its lines wait, uncharged).",
            ["backend"],
            registry=self.registry,
        )
        self.engine_metrics_readable = Gauge(
            "backfill_engine_metrics_readable",
            "1 while a backend's /metrics (flavours vllm, sglang, llamacpp) is read, 0 while it cannot be: its "
            "harvest controller then runs blind, at half the endpoint at most.",
            ["backend"],
            registry=self.registry,
        )
        self.harvest_limit = Gauge(
            "backfill_harvest_limit",
            "Batch lines the harvest controller allows on an endpoint shared with interactive traffic.",
            ["backend"],
            registry=self.registry,
        )
        self.commit_seconds = Histogram(
            "backfill_commit_seconds",
            "Duration of one group-commit transaction of line results.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=self.registry,
        )
        self.commit_lines = Counter(
            "backfill_committed_line_updates", "Line updates written by group commits.", registry=self.registry
        )
        self.batches_finished = Counter(
            "backfill_batches_finished", "Batches that reached a terminal status.", ["status"], registry=self.registry
        )
        # Batch SLAs (docs/usage.md), by tenant name and completion window, counted by the worker that ended them.
        self.batch_sla = Counter(
            "backfill_batch_sla_batches",
            "Batches that ended, by outcome: in_window (completed by expires_at), late, expired, cancelled, failed.",
            ["tenant", "window", "outcome"],
            registry=self.registry,
        )
        self.batch_turnaround_seconds = Histogram(
            "backfill_batch_turnaround_seconds",
            "From a batch's creation to its completion (completed batches only): p50 / p95 via histogram_quantile.",
            ["tenant", "window"],
            buckets=_TURNAROUND_BUCKETS,
            registry=self.registry,
        )
        self.batch_lines_expired = Counter(
            "backfill_batch_lines_expired",
            "Lines that never ran because their batch's window ended.",
            ["tenant", "window"],
            registry=self.registry,
        )
        # Webhook tries by this process's sender (docs/webhooks.md): delivered, failed (to be retried) or dead.
        self.webhook_tries = Counter(
            "backfill_webhook_tries", "Webhook delivery tries, by outcome.", ["outcome"], registry=self.registry
        )
        # Interactive traffic through the proxy (backfill.interactive): what the harvest controller protects.
        self.interactive_ttft_seconds = Histogram(
            "backfill_interactive_ttft_seconds",
            "Time to first token of interactive requests through the proxy (a whole answer when not streamed).",
            ["backend"],
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )
        self.interactive_request_seconds = Histogram(
            "backfill_interactive_request_seconds",
            "Time from an interactive request's arrival to the end of its answer.",
            ["backend"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.interactive_requests = Counter(
            "backfill_interactive_requests",
            "Interactive requests through the proxy, by outcome (2xx, 4xx, 429, 5xx, timeout, unavailable, cancelled).",
            ["backend", "outcome"],
            registry=self.registry,
        )
        self.interactive_in_flight = Gauge(
            "backfill_interactive_in_flight",
            "Interactive requests in flight to each backend through the proxy.",
            ["backend"],
            registry=self.registry,
        )
        # Database load: what the statements of this process cost PostgreSQL or SQLite (docs/deploy.md sizing).
        self.db_statements = Counter(
            "backfill_db_statements",
            "SQL statements sent to the database (an executemany counts once).",
            registry=self.registry,
        )
        self.db_rows = Counter(
            "backfill_db_rows",
            "Rows the database reported for those statements: returned by a SELECT, written by INSERT/UPDATE/DELETE.",
            registry=self.registry,
        )
        self.db_commits = Counter("backfill_db_commits", "Transactions committed.", registry=self.registry)

    def observe_database(self, engine: AsyncEngine) -> None:
        """Count the statements, rows and commits of every connection `engine` hands out."""

        @event.listens_for(engine.sync_engine, "after_cursor_execute")
        def _after_execute(conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> None:
            self.db_statements.inc()
            if cursor.rowcount > 0:
                self.db_rows.inc(cursor.rowcount)

        @event.listens_for(engine.sync_engine, "commit")
        def _on_commit(conn: Any) -> None:
            self.db_commits.inc()
