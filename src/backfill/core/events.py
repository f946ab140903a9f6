"""What the dispatch core is told (events) and what it asks for (actions). Plain values, no I/O.

A driver — the asyncio dispatcher in production, the simulator in virtual time, a test — feeds events to
`DispatchCore.handle(event, now)` and performs the actions it gets back, feeding their results back as events:

    Fill            -> Lease ...             (the driver leases, then)   Leased(grants) -> Start / Abort / WakeAt
    Changed                                  -> (the next Fill reads the batches again)
    BatchesRead     -> ShareRates?           (the driver shares rates)   RatesShared    -> ShowOutlooks
    Answered / Unsent                        -> Record
    EngineRead                               -> SetCeiling / Abort
    Fill (an endpoint down, its probe due)   -> Probe      (the driver probes)   Probed -> EndpointChanged / Start
    ModelLoading                             -> (the next outlooks say `loading_model`, or stop saying it)
    Answered (an outage)                     -> Record (handed back uncharged) / EndpointChanged / Abort
    BatchStates                              -> Record (buffered lines closed) / Abort (after the grace)
    Stop                                     -> Record (buffered lines handed back)
    GraceOver                                -> Abort (everything still in flight)

An `Abort` is answered by `Unsent(line_id, aborted=True)` once the line's request has stopped; the reason the
line was aborted (handed back, cancelled, expired) is kept with the line in flight, so the `Record` that follows
says what it became.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import msgspec

from backfill.core.pool import Start
from backfill.domain.batches import BatchStatus, RequestState
from backfill.domain.engine_load import EngineLoad
from backfill.domain.leases import DispatchBatch, LeasedLine, LineUpdate
from backfill.domain.outcomes import Outcome
from backfill.policy.circuit import CircuitState

# --- events ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BatchesRead:
    """The in-progress batches lines may be leased from, as the store has them now."""

    batches: Sequence[DispatchBatch]


@dataclass(frozen=True, slots=True)
class Fill:
    """Look for work: which batches need more lines leased."""


@dataclass(frozen=True, slots=True)
class Changed:
    """A batch was created or cancelled: read the batches at the next `Fill` rather than at the next poll."""


@dataclass(frozen=True, slots=True)
class Grant:
    """The answer to one `Lease`: the lines the store leased (maybe fewer than asked for)."""

    batch: DispatchBatch
    lines: Sequence[LeasedLine]
    wanted: int


@dataclass(frozen=True, slots=True)
class Leased:
    """The answers to the `Lease` actions of the last `Fill`; then whatever may start, starts."""

    grants: Sequence[Grant] = ()


@dataclass(frozen=True, slots=True)
class RatesShared:
    """Line cost per second served per model by every worker together (this one's own rate where unknown)."""

    rates: Mapping[str, float]


class Answered(msgspec.Struct, frozen=True):
    """The endpoint answered a line that was started (whatever it said), after `latency_s`."""

    line_id: int
    outcome: Outcome
    latency_s: float


class Unanswered(StrEnum):
    ABORTED = "aborted"  # stopped on an `Abort` (or the driver is going away)
    UNREADABLE = "unreadable"  # its body could not be read (a blob store outage): nothing was sent
    CRASHED = "crashed"  # running it raised: treated as an unavailable backend, so it never strands


@dataclass(frozen=True, slots=True)
class Unsent:
    """A line that was started got no answer."""

    line_id: int
    why: Unanswered
    message: str = ""


@dataclass(frozen=True, slots=True)
class EngineRead:
    """One round of engine readings (about once a second).

    `loads`: each scraped endpoint's /metrics (None: the scrape failed). `ttft`: interactive times to first token
    measured by the proxy since the last round, by endpoint. `others`: the other live workers' batch-token
    counters, by endpoint then worker (`DispatchCore.batch_token_counters` is this worker's, to publish).
    """

    loads: Mapping[str, EngineLoad | None] = field(default_factory=dict)
    ttft: Mapping[str, Sequence[float]] = field(default_factory=dict)
    others: Mapping[str, Mapping[str, int]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class BatchStates:
    """Status and `expires_at` of the batches this worker holds lines of (`DispatchCore.held_batches`)."""

    states: Mapping[str, tuple[BatchStatus, int]]


@dataclass(frozen=True, slots=True)
class Probed:
    """The answer to a `Probe` (or the check of every endpoint at start): `error` is None when it answered."""

    endpoint: str
    error: str | None = None


@dataclass(frozen=True, slots=True)
class ModelLoading:
    """An in-process engine started loading its model (`since`, unix seconds), or finished (`since` None). While
    every endpoint of a pool is loading, its batches show `loading_model`."""

    endpoint: str
    since: float | None


@dataclass(frozen=True, slots=True)
class Stop:
    """The process is stopping: lease and start nothing more, hand back what is buffered."""


@dataclass(frozen=True, slots=True)
class GraceOver:
    """The shutdown grace has run out: abort what is still in flight."""


Event = (
    BatchesRead
    | Changed
    | Fill
    | Leased
    | RatesShared
    | Answered
    | Unsent
    | EngineRead
    | Probed
    | ModelLoading
    | BatchStates
    | Stop
    | GraceOver
)

# --- actions -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Lease:
    """Lease up to `count` more lines of `batch` from the store; answer with a `Grant` in `Leased`."""

    batch: DispatchBatch
    count: int


class AbortReason(StrEnum):
    PREEMPTED = "preempted"  # handed back so a tenant short of its fair share gets the slot
    SHED = "shed"  # handed back because the harvest controller cut the endpoint's ceiling
    CANCELLED = "cancelled"  # the batch is cancelling and its grace is over
    EXPIRED = "expired"  # the batch's window closed and its grace is over
    SHUTDOWN = "shutdown"  # the process is stopping and its grace is over
    OUTAGE = "outage"  # its endpoint went down: handed back uncharged, for another endpoint or for later

    @property
    def state(self) -> RequestState:
        """What the line becomes: back to the queue uncharged, or ended."""
        if self is AbortReason.CANCELLED:
            return RequestState.CANCELLED
        if self is AbortReason.EXPIRED:
            return RequestState.EXPIRED
        return RequestState.QUEUED


@dataclass(frozen=True, slots=True)
class Abort:
    """Stop the request of a line in flight (closing its connection makes the engine drop it)."""

    line_id: int
    endpoint: str
    reason: AbortReason


class Record(msgspec.Struct, frozen=True):
    """Write a line's new state (group-committed, fenced on its lease)."""

    update: LineUpdate


@dataclass(frozen=True, slots=True)
class WakeAt:
    """Nothing may start before `when` (a rate limit, a Retry-After): `Fill` again then."""

    when: float


@dataclass(frozen=True, slots=True)
class SetCeiling:
    """The harvest controller set an endpoint's ceiling (this worker's part of it); with the interactive TTFT it
    holds batch work to (its learned baseline, None until learned), for operators to see."""

    endpoint: str
    ceiling: int
    ttft_baseline_s: float | None = None


@dataclass(frozen=True, slots=True)
class ShareRates:
    """Publish this worker's rate per model and read every worker's; answer with `RatesShared`."""

    mine: Mapping[str, float]


@dataclass(frozen=True, slots=True)
class ShowOutlooks:
    """Store each batch's completion estimate and schedule state: (batch id, eta, state); `waiting` says, by batch
    id, what a batch waits for when no endpoint of its pool is up ("backend X unreachable since …")."""

    rows: Sequence[tuple[str, int | None, str | None]]
    waiting: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Probe:
    """Check whether an endpoint that is down answers again; answer with `Probed`."""

    endpoint: str


@dataclass(frozen=True, slots=True)
class EndpointChanged:
    """An endpoint's circuit changed state (up, down, recovering): `since` is when it went down, `error` the last
    backend-wide failure. Drivers log it and show it."""

    endpoint: str
    state: CircuitState
    since: float | None
    error: str


Action = Lease | Start | Abort | Record | WakeAt | SetCeiling | ShareRates | ShowOutlooks | Probe | EndpointChanged
