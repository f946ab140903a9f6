"""The dispatch core and the result cache: a line answered from the cache ends as a success that names where its
answer came from, and its endpoint learns nothing from it (no served tokens, no latency, its slot back at once)."""

from __future__ import annotations

from backfill.core.events import Answered, Record
from backfill.domain.batches import RequestState
from backfill.domain.outcomes import Outcome, OutcomeKind
from backfill.domain.usage import Usage
from tests.unit.test_core_outage import T0, core_for, lease, starts

CACHED = Outcome(
    OutcomeKind.SUCCESS, 200, b'{"id":"x"}', "req-1", usage=Usage(900, 0, 100, 0), cached_from="batch_req_a"
)


def test_a_cached_answer_succeeds_and_says_where_it_came_from() -> None:
    core = core_for("a")
    assert [(1, "a"), (2, "a")] == starts(lease(core, 2, T0))

    [record] = core.handle(Answered(1, CACHED, 0.0), T0 + 1)

    assert isinstance(record, Record)
    update = record.update
    assert (RequestState.SUCCEEDED, "batch_req_a", b'{"id":"x"}') == (update.state, update.cached_from, update.body)


def test_the_endpoint_learns_nothing_from_a_cached_answer() -> None:
    core = core_for("a")
    lease(core, 2, T0)
    limits = core.limits["a"]
    served_before = limits.served_tokens

    core.handle(Answered(1, CACHED, 0.0), T0 + 1)

    # Both lines' prompts were counted when they started (equal estimates); line 1's goes back, and none of the
    # 1,000 tokens its reused answer carries is counted: the engine never saw them.
    assert (1, served_before // 2) == (limits.in_flight, limits.served_tokens)
