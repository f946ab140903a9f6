"""The dispatch core through an outage: events in, actions compared. No I/O, no sleep."""

from __future__ import annotations

import random

import msgspec

from backfill.config import Settings
from backfill.core.dispatch import DispatchCore
from backfill.core.events import (
    Abort,
    AbortReason,
    Action,
    Answered,
    BatchesRead,
    BatchStates,
    EndpointChanged,
    Fill,
    Grant,
    Leased,
    ModelLoading,
    Probe,
    Probed,
    RatesShared,
    Record,
    ShowOutlooks,
    Unanswered,
    Unsent,
    WakeAt,
)
from backfill.core.pool import Start
from backfill.domain.batches import BatchStatus, RequestState
from backfill.domain.leases import LineUpdate
from backfill.domain.outcomes import Outcome, OutcomeKind
from backfill.policy.circuit import CircuitState
from tests.unit.test_pools import Endpoint, batch, lines

OK = Outcome(OutcomeKind.SUCCESS, 200, b"{}")
REFUSED = Outcome(
    OutcomeKind.UNAVAILABLE, message="The backend a could not be reached: ConnectError.", unreachable=True
)
HTTP_500 = Outcome(OutcomeKind.HTTP_ERROR, 500, b"{}", message="The backend a answered 500.")
T0 = 1_800_000_000.0
BATCH = batch("b1", "t", expires_at=int(T0) + 3600)


def core_for(*names: str, concurrency: int = 2, max_attempts: int = 5) -> DispatchCore:
    backends = [
        {"name": name, "url": f"http://{name}", "models": ["m"], "max_concurrency": concurrency}
        | {"adaptive_concurrency": False}
        for name in names
    ]
    settings = Settings(backends=backends, max_attempts=max_attempts, retry_base_s=0.5)  # type: ignore[arg-type]
    return DispatchCore(settings, [(Endpoint(name, concurrency), ["m"]) for name in names], rng=random.Random(1))


def lease(core: DispatchCore, count: int, now: float, first: int = 1) -> list[Action]:
    core.handle(BatchesRead([BATCH]), now)
    return core.handle(Leased([Grant(BATCH, lines("b1", count, first), count)]), now)


def answer(core: DispatchCore, line_id: int, outcome: Outcome, now: float) -> list[Action]:
    """An answer, then the fill a driver runs after each (nothing new leased)."""
    return core.handle(Answered(line_id, outcome, 0.1), now) + core.handle(Leased([]), now)


def starts(actions: list[Action]) -> list[tuple[int, str]]:
    return [(a.line.id, a.endpoint) for a in actions if isinstance(a, Start)]


def test_an_outage_hands_lines_back_uncharged_and_the_pools_other_endpoint_takes_them() -> None:
    core = core_for("a", "b")
    assert [(1, "a"), (2, "b"), (3, "a"), (4, "b")] == starts(lease(core, 4, T0))

    actions = core.handle(Answered(1, REFUSED, 0.01), T0 + 1)

    handed_back = LineUpdate(1, "b1", 1, RequestState.QUEUED, 0, T0 + 1, error_message=REFUSED.message)
    assert [
        Record(handed_back),
        EndpointChanged("a", CircuitState.OPEN, T0 + 1, REFUSED.message),
        Abort(3, "a", AbortReason.OUTAGE),
    ] == actions
    assert [Record(LineUpdate(3, "b1", 1, RequestState.QUEUED, 0, error_message=REFUSED.message))] == core.handle(
        Unsent(3, Unanswered.ABORTED), T0 + 1
    )
    core.handle(Answered(2, OK, 0.5), T0 + 2)
    core.handle(Answered(4, OK, 0.5), T0 + 2)
    assert [(5, "b"), (6, "b")] == starts(lease(core, 2, T0 + 2, first=5))


def test_a_pool_with_every_endpoint_down_waits_probes_and_comes_back_slowly() -> None:
    core = core_for("a", concurrency=4)
    assert 4 == len(starts(lease(core, 4, T0)))
    core.handle(Answered(1, REFUSED, 0.01), T0)
    for line_id in (2, 3, 4):
        core.handle(Unsent(line_id, Unanswered.ABORTED), T0)
    assert [] == starts(lease(core, 4, T0, first=5))  # leased, but nothing starts on an endpoint that is down

    assert [WakeAt(T0 + 1)] == core.handle(Fill(), T0 + 0.5)
    assert Probe("a") in core.handle(Fill(), T0 + 1)
    assert [Probe("a")] != core.handle(Fill(), T0 + 1.1)[:1]  # one probe out at a time

    back = core.handle(Probed("a", None), T0 + 1.2)
    assert EndpointChanged("a", CircuitState.HALF_OPEN, T0, REFUSED.message) == back[0]
    assert [(5, "a")] == starts(back)  # half-open: one line at a time
    assert [(6, "a")] == starts(answer(core, 5, OK, T0 + 1.3))
    closed = answer(core, 6, OK, T0 + 1.4)
    assert EndpointChanged("a", CircuitState.CLOSED, None, REFUSED.message) == closed[1]
    assert [(7, "a"), (8, "a")] == starts(closed)  # back, with every slot


def test_a_failed_probe_waits_longer_before_the_next() -> None:
    core = core_for("a")
    core.handle(Probed("a", "refused"), T0)  # the check at start
    assert [Probe("a")] == core.handle(Fill(), T0 + 1)
    assert [] == core.handle(Probed("a", "refused"), T0 + 1)
    assert [WakeAt(T0 + 3)] == core.handle(Fill(), T0 + 1)


def test_batches_of_a_pool_with_no_endpoint_up_say_what_they_wait_for() -> None:
    core = core_for("a")
    core.handle(Probed("a", "The backend a could not be reached: ConnectError."), T0)

    actions = core.handle(BatchesRead([BATCH]), T0 + 10) + core.handle(RatesShared({}), T0 + 10)

    note = "backend a unreachable since 2027-01-15T08:00:00Z: The backend a could not be reached: ConnectError."
    assert ShowOutlooks([("b1", None, "waiting")], {"b1": note}) == actions[-1]
    assert note == core.waiting_for("m")


def test_batches_of_a_pool_whose_every_endpoint_loads_its_model_say_so_until_one_has_loaded() -> None:
    core = core_for("a", "b")
    core.handle(ModelLoading("a", T0), T0)
    core.handle(ModelLoading("b", T0 + 1), T0 + 1)

    loading = core.handle(BatchesRead([BATCH]), T0 + 2) + core.handle(RatesShared({}), T0 + 2)
    core.handle(ModelLoading("b", None), T0 + 3)
    loaded = core.handle(BatchesRead([BATCH]), T0 + 3) + core.handle(RatesShared({}), T0 + 3)

    note = "loading model m since 2027-01-15T08:00:00Z"
    assert ShowOutlooks([("b1", None, "loading_model")], {"b1": note}) == loading[-1]
    shown = loaded[-1]
    assert isinstance(shown, ShowOutlooks)
    assert {} == shown.waiting
    assert "loading_model" != shown.rows[0][2]
    assert core.waiting_for("m") is None


def test_lines_buffered_when_the_window_closes_in_an_outage_end_expired_with_the_backend_error() -> None:
    core = core_for("a")
    core.handle(Probed("a", "refused"), T0)
    lease(core, 2, T0)

    actions = core.handle(BatchStates({"b1": (BatchStatus.IN_PROGRESS, int(T0))}), T0 + 1)

    expired = [a.update for a in actions if isinstance(a, Record)]
    assert [RequestState.EXPIRED] * 2 == [update.state for update in expired]
    assert [0, 0] == [update.attempts for update in expired]
    assert all(update.error_message is not None and "refused" in update.error_message for update in expired)


def test_a_line_that_always_gets_a_500_while_others_succeed_spends_its_attempts() -> None:
    core = core_for("a", max_attempts=3)
    broken = lines("b1", 1)[0]
    lease(core, 1, T0)
    updates = []
    for attempt in range(3):
        now = T0 + 10 * attempt
        core.handle(Leased([Grant(BATCH, lines("b1", 1, 100 + attempt), 1)]), now)
        core.handle(Answered(100 + attempt, OK, 0.1), now)  # the endpoint serves other lines meanwhile
        update = next(a.update for a in core.handle(Answered(1, HTTP_500, 0.1), now) if isinstance(a, Record))
        updates.append(update)
        if not update.is_final:
            core.handle(Leased([Grant(BATCH, [msgspec.structs.replace(broken, attempts=update.attempts)], 1)]), now)

    assert [(RequestState.QUEUED, 1), (RequestState.QUEUED, 2), (RequestState.FAILED, 3)] == [
        (update.state, update.attempts) for update in updates
    ]
    assert 500 == updates[-1].status_code
    assert CircuitState.CLOSED == core.circuits["a"].state


def test_lines_cut_off_by_their_window_expire_and_say_nothing_about_the_endpoint() -> None:
    """Request timeouts are capped at the window's end: two lines timing out together there (a little early, as
    timers do) are the window's doing, not an outage."""
    core = core_for("a")
    short = batch("b1", "t", expires_at=int(T0) + 4)
    core.handle(BatchesRead([short]), T0)
    assert [(1, "a"), (2, "a")] == starts(core.handle(Leased([Grant(short, lines("b1", 2), 2)]), T0))
    timeout = Outcome(OutcomeKind.TIMEOUT, message="The backend a did not answer within 3.9s.")

    actions = core.handle(Answered(1, timeout, 3.9), T0 + 3.95) + core.handle(Answered(2, timeout, 3.9), T0 + 3.96)

    assert [RequestState.EXPIRED, RequestState.EXPIRED] == [a.update.state for a in actions if isinstance(a, Record)]
    assert not any(isinstance(a, EndpointChanged) for a in actions)
    assert core.circuits["a"].is_up
