"""What the dispatcher and the store exchange about lines: leases out, results back."""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from backfill.domain.batches import RequestState
from backfill.domain.usage import Usage
from backfill.domain.usage_report import Capacity


class LeasedLine(msgspec.Struct, frozen=True):
    """A line this worker may run until `lease_expires_at`; writes are fenced on (owner, lease_seq)."""

    id: int
    batch_id: str
    line_no: int
    custom_id: str
    offset: int
    length: int
    attempts: int
    lease_seq: int
    est_prompt_tokens: int
    max_output_tokens: int | None = None
    prefix_group: int = 0


class LineUpdate(msgspec.Struct, frozen=True):
    """The new state of a leased line. `QUEUED` hands it back (retry later, or released uncharged)."""

    id: int
    batch_id: str
    lease_seq: int
    state: RequestState
    attempts: int
    next_attempt_at: float = 0.0
    result_id: str | None = None
    status_code: int | None = None
    request_id: str | None = None
    body: bytes | None = None
    error_code: str | None = None
    error_message: str | None = None
    usage: Usage = Usage()
    # For the usage report (domain.usage_report): why the line ran where it did, and when its answer came.
    capacity: Capacity = Capacity.DEDICATED
    finished_at: float = 0.0
    # The result cache (domain.result_cache): the line whose answer this one reuses, or the key to keep it under.
    cached_from: str | None = None
    cache_key: str | None = None

    @property
    def is_final(self) -> bool:
        return self.state is not RequestState.QUEUED


@dataclass(frozen=True, slots=True)
class DispatchBatch:
    """An in-progress batch the dispatcher may lease lines from."""

    id: str
    tenant_id: str
    model: str
    endpoint: str
    expires_at: int
    input_blob_key: str
    created_at: int = 0
    seq: int = 0
    weight: float = 1.0  # its tenant's fair-share weight
    open_lines: int = 0  # lines not yet finished when it was read
    est_prompt_tokens: int = 0  # over all its lines
    est_output_tokens: int = 0
    total: int = 0
    result_cache: bool | None = None  # its own choice (domain.result_cache); None: the `result_cache` setting

    @property
    def window_s(self) -> float:
        return float(self.expires_at - self.created_at)
