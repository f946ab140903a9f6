"""The rows InMemoryStore keeps: the SQL schema's tables as plain dataclasses, with the constraints that matter."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from backfill.domain.batches import Batch, RequestState
from backfill.domain.endpoint_report import EndpointReport
from backfill.domain.files import FileRecord
from backfill.domain.proxy_ttft import Published
from backfill.domain.result_cache import CachedResult
from backfill.domain.tenants import Tenant
from backfill.domain.usage import Usage
from backfill.domain.usage_report import UsageCounts, UsageKey

_Row = TypeVar("_Row")


class ConstraintViolation(ValueError):
    """What a database would refuse: a second row with a unique key, or a reference to a row that is not there.
    (SqlStore raises SQLAlchemy's IntegrityError there; neither happens unless a caller has a bug.)"""


@dataclass(frozen=True, slots=True)
class StoredLine:
    """One line of a batch as the store keeps it: the `requests` table's row. Replaced, never changed in place,
    so `InMemoryStore.lines` can hand rows out."""

    id: int
    batch_id: str
    line_no: int
    custom_id: str
    offset: int
    length: int
    est_prompt_tokens: int
    state: RequestState
    max_output_tokens: int | None = None
    prefix_group: int = 0
    attempts: int = 0
    next_attempt_at: float = 0.0
    lease_owner: str | None = None
    lease_seq: int = 0
    lease_expires_at: float | None = None
    result_id: str | None = None
    status_code: int | None = None
    request_id: str | None = None
    body: bytes | None = None
    error_code: str | None = None
    error_message: str | None = None
    usage: Usage = field(default_factory=Usage)
    cached_from: str | None = None


@dataclass(frozen=True)
class KeyRow:
    id: str
    tenant_id: str
    prefix: str
    salt: str
    key_hash: str
    created_at: int
    admin: bool = False
    revoked_at: int | None = None
    last_used_at: int | None = None


@dataclass(frozen=True)
class FileRow:
    seq: int
    record: FileRecord


@dataclass
class BatchRow:
    """A batch with the columns the domain object does not show. `batch` is the store's own copy: callers only
    ever get copies of it."""

    seq: int
    batch: Batch
    est_prompt_tokens: int = 0
    est_output_tokens: int = 0
    claimed_by: str | None = None
    claim_expires_at: float | None = None

    def is_claimable_by(self, owner: str, now: float) -> bool:
        lapsed = self.claim_expires_at is not None and self.claim_expires_at < now
        return self.claimed_by is None or lapsed or self.claimed_by == owner


@dataclass
class MemoryTables:
    """Every table, keyed as the schema's unique constraints are. Sequences start at 1, like the databases'."""

    tenants: dict[str, Tenant] = field(default_factory=dict)
    api_keys: dict[str, KeyRow] = field(default_factory=dict)  # by prefix (unique)
    files: dict[str, FileRow] = field(default_factory=dict)
    batches: dict[str, BatchRow] = field(default_factory=dict)
    lines: dict[int, StoredLine] = field(default_factory=dict)
    lines_of: dict[str, dict[int, int]] = field(default_factory=dict)  # batch id -> line number -> line id
    # (owner, model) -> (rate, updated_at) and (owner, backend) -> (batch tokens, updated_at)
    worker_rates: dict[tuple[str, str], tuple[float, float]] = field(default_factory=dict)
    worker_backends: dict[tuple[str, str], tuple[int, float]] = field(default_factory=dict)
    worker_reports: dict[tuple[str, str], tuple[EndpointReport, float]] = field(default_factory=dict)
    proxy_ttft: dict[tuple[str, str], tuple[Published, float]] = field(default_factory=dict)
    usage: dict[UsageKey, UsageCounts] = field(default_factory=dict)
    # The result cache: (tenant id, key) -> (answer, created_at, used_at).
    result_cache: dict[tuple[str, str], tuple[CachedResult, int, int]] = field(default_factory=dict)
    file_seq: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    batch_seq: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    line_ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def require_tenant(self, tenant_id: str) -> None:
        if tenant_id not in self.tenants:
            raise ConstraintViolation(f"no tenant {tenant_id!r}")

    def insert_files(self, records: Sequence[FileRecord]) -> None:
        """All or none: a file id that exists already (or twice here) or an unknown tenant refuses them all."""
        new_ids = [record.id for record in records]
        if len(set(new_ids)) != len(new_ids) or any(file_id in self.files for file_id in new_ids):
            raise ConstraintViolation(f"a file id of {new_ids} exists")
        for record in records:
            self.require_tenant(record.tenant_id)
        for record in records:
            self.files[record.id] = FileRow(next(self.file_seq), record)

    def insert_batch(self, batch: Batch) -> BatchRow:
        if batch.id in self.batches:
            raise ConstraintViolation(f"batch {batch.id} exists")
        self.require_tenant(batch.tenant_id)
        row = self.batches[batch.id] = BatchRow(next(self.batch_seq), batch)
        return row

    def insert_lines(self, lines: Sequence[StoredLine]) -> None:
        """Add lines, each given a fresh id; all or none: a line number taken in its batch refuses them all."""
        taken: set[tuple[str, int]] = set()
        for line in lines:
            key = (line.batch_id, line.line_no)
            if (
                line.batch_id not in self.batches
                or key in taken
                or line.line_no in self.lines_of.get(line.batch_id, {})
            ):
                raise ConstraintViolation(f"line {line.line_no} of batch {line.batch_id} cannot be added")
            taken.add(key)
        for line in lines:
            row = dataclasses.replace(line, id=next(self.line_ids))
            self.lines[row.id] = row
            self.lines_of.setdefault(row.batch_id, {})[row.line_no] = row.id

    def lines_in(self, batch_id: str) -> list[StoredLine]:
        """The batch's lines in line-number order."""
        numbered = self.lines_of.get(batch_id, {})
        return [self.lines[numbered[number]] for number in sorted(numbered)]

    def delete_batch(self, batch_id: str) -> None:
        """The batch row and its lines (the schema's ON DELETE CASCADE)."""
        for line_id in self.lines_of.pop(batch_id, {}).values():
            del self.lines[line_id]
        self.batches.pop(batch_id, None)


def copy_batch(batch: Batch) -> Batch:
    """A copy a caller may change without changing the store (Batch is mutable, and so are its lists)."""
    metadata = dict(batch.metadata) if batch.metadata is not None else None
    errors = list(batch.errors) if batch.errors is not None else None
    return dataclasses.replace(batch, metadata=metadata, errors=errors)


def page(rows: list[_Row], limit: int, key: Callable[[_Row], int], *, descending: bool) -> tuple[list[_Row], bool]:
    """The first `limit` rows in `key` order, and whether more follow (the SQL stores read `limit + 1` rows)."""
    ordered = sorted(rows, key=key, reverse=descending)
    return ordered[: max(limit, 0)], len(ordered) > limit
