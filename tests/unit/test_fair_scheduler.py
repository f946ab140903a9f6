"""The fair scheduler: deficit round robin across tenants in tokens, EDF within a tenant, promotion first."""

from __future__ import annotations

from collections import Counter, deque

from hypothesis import given, settings
from hypothesis import strategies as st

from backfill.policy.fair import Candidate, FairScheduler, line_cost


def test_line_cost_weights_output_above_prompt() -> None:
    assert line_cost(100, 0) < line_cost(0, 100)
    assert 1.0 == line_cost(0, 0)


def run(scheduler: FairScheduler, queues: dict[str, deque[Candidate]], picks: int) -> list[str]:
    """Pick `picks` times from per-batch queues, like the dispatcher pops ready lines; returns batch ids."""
    order = []
    for _ in range(picks):
        heads = [queue[0] for queue in queues.values() if queue]
        chosen = scheduler.pick(heads)
        if chosen is None:
            break
        queues[chosen.batch_id].popleft()
        order.append(chosen.batch_id)
    return order


def lines(batch: str, tenant: str, count: int, cost: float = 100.0, deadline: float = 1000.0, **kw: object) -> deque:
    return deque(Candidate(batch, tenant, deadline, cost, **kw) for _ in range(count))  # type: ignore[arg-type]


def test_a_small_tenant_is_not_starved_by_a_large_backlog() -> None:
    queues = {"big": lines("big", "a", 50_000), "small": lines("small", "b", 10)}
    order = run(FairScheduler(quantum_tokens=100), queues, 40)
    assert 10 == order.count("small")
    assert order.index("small") <= 1
    assert max(i for i, b in enumerate(order) if b == "small") < 21


def test_equal_weights_share_tokens_not_lines() -> None:
    # b's lines cost 4x a's: in tokens both get the same, so a starts 4 lines for each of b's.
    queues = {"cheap": lines("cheap", "a", 10_000, cost=100), "dear": lines("dear", "b", 10_000, cost=400)}
    counts = Counter(run(FairScheduler(quantum_tokens=400), queues, 5000))
    assert abs(counts["cheap"] * 100 - counts["dear"] * 400) <= 800


def test_weights_divide_the_tokens() -> None:
    queues = {
        "heavy": lines("heavy", "a", 10_000, weight=3.0),
        "light": lines("light", "b", 10_000, weight=1.0),
    }
    counts = Counter(run(FairScheduler(quantum_tokens=100), queues, 4000))
    assert 2900 <= counts["heavy"] <= 3100


def test_earliest_deadline_first_within_a_tenant() -> None:
    queues = {"late": lines("late", "a", 3, deadline=2000), "soon": lines("soon", "a", 3, deadline=100)}
    assert ["soon"] * 3 + ["late"] * 3 == run(FairScheduler(), queues, 6)


def test_promoted_batches_go_first_earliest_deadline_first() -> None:
    queues = {
        "other": lines("other", "a", 5),
        "urgent_late": lines("urgent_late", "b", 2, deadline=500, urgent=True),
        "urgent_soon": lines("urgent_soon", "c", 2, deadline=400, urgent=True),
    }
    assert ["urgent_soon"] * 2 + ["urgent_late"] * 2 == run(FairScheduler(), queues, 4)


def test_promotion_is_charged_to_its_tenant() -> None:
    scheduler = FairScheduler(quantum_tokens=100)
    scheduler.pick([Candidate("x", "a", 10.0, 500.0, urgent=True)])
    assert -500.0 == scheduler.deficit("a")


def test_a_line_dearer_than_the_quantum_still_starts() -> None:
    queues = {"huge": lines("huge", "a", 2, cost=1e9), "small": lines("small", "b", 2, cost=1.0)}
    assert {"huge", "small"} == set(run(FairScheduler(quantum_tokens=10), queues, 4))


def test_an_idle_tenant_banks_no_credit() -> None:
    scheduler = FairScheduler(quantum_tokens=100)
    run(scheduler, {"a1": lines("a1", "a", 3)}, 3)  # a alone: b absent throughout
    assert 0.0 == scheduler.deficit("b")


def test_nothing_to_pick() -> None:
    assert FairScheduler().pick([]) is None


batches = st.lists(
    st.tuples(
        st.sampled_from(["t1", "t2", "t3", "t4"]),  # tenant
        st.integers(1, 40),  # lines
        st.floats(1, 5000),  # cost per line
        st.sampled_from([0.5, 1.0, 2.0]),  # weight
        st.floats(0, 1e5),  # deadline
        st.booleans(),  # urgent
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=200, deadline=None)
@given(batches, st.floats(10, 10_000))
def test_no_tenant_with_work_is_starved_and_no_line_is_handed_out_twice(specs: list, quantum: float) -> None:
    queues: dict[str, deque[Candidate]] = {}
    weights: dict[str, float] = {}
    for i, (tenant, count, cost, weight, deadline, urgent) in enumerate(specs):
        weight = weights.setdefault(tenant, weight)  # one weight per tenant
        queues[f"b{i}"] = deque(Candidate(f"b{i}", tenant, deadline, cost, weight, urgent, seq=i) for _ in range(count))
    handed: list[tuple[str, int]] = []
    remaining = {batch: len(queue) for batch, queue in queues.items()}
    scheduler = FairScheduler(quantum_tokens=quantum)
    # DRR's guarantee is in tokens: while a tenant has work, the others are served a bounded amount before its
    # turn comes: a round each (at most quantum x weight + a line) per quantum x its weight it needs, where it
    # needs a line's cost plus whatever its own promoted lines ran ahead (they are charged to it), plus what
    # promoted lines of anyone take.
    max_cost = max(spec[2] for spec in specs)
    per_round = len(weights) * (max(quantum, max_cost) * max(weights.values()) + max_cost)
    urgent_total = sum(c.cost for q in queues.values() for c in q if c.urgent)
    debt = Counter({tenant: 0.0 for tenant in weights})
    for queue in queues.values():
        for c in queue:
            debt[c.tenant_id] += c.cost if c.urgent else 0.0
    bound = {
        tenant: (int((max_cost + debt[tenant]) / (quantum * weight)) + 3) * per_round + urgent_total
        for tenant, weight in weights.items()
    }
    others_served: Counter[str] = Counter()  # tokens served to others since each tenant was last served
    while any(queues.values()):
        heads = [queue[0] for queue in queues.values() if queue]
        chosen = scheduler.pick(heads)
        assert chosen is not None
        assert chosen in heads
        queues[chosen.batch_id].popleft()
        remaining[chosen.batch_id] -= 1
        handed.append((chosen.batch_id, remaining[chosen.batch_id]))
        for tenant in {c.tenant_id for c in heads}:
            others_served[tenant] = 0 if tenant == chosen.tenant_id else others_served[tenant] + chosen.cost
            assert others_served[tenant] <= bound[tenant]
    assert len(handed) == len(set(handed)) == sum(spec[1] for spec in specs)
