"""Which batch's line starts next: deadlines first when they are at risk, otherwise fair shares across tenants.

Three rules, in order:

1. **Promotion.** A batch whose laxity (time left in its window minus the time its remaining work needs) has run
   low is *urgent*: urgent batches go ahead of everything, earliest deadline first. Their tenant is still charged,
   so a tenant cannot buy more than its share by cutting windows close.
2. **Deficit round robin across tenants**, priced in tokens (prompt + expected output, output weighted, see
   `line_cost`). Each visit a tenant's deficit grows by `quantum x weight`; it starts lines while the deficit
   covers their cost, then the turn passes. A tenant with 50,000 lines queued and one with 10 alternate, so the
   small batch is done after about 20 starts, not 50,010.
3. **Earliest deadline first within a tenant**, ties to the older batch.

Before the round robin, a tenant running less than its weighted share of the work in flight by a line or
more catches up (`_most_owed`): a newcomer next to a tenant that holds every slot gets the next free slots,
not every other one.

A tenant that returns after having no lines starts with a deficit of zero (standard DRR: no credit is banked
while idle). Pure: no clock, no I/O; the dispatcher and the virtual-time simulator both drive it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

OUTPUT_TOKEN_WEIGHT = 3.0  # a generated token costs about what 3 prompt tokens do (decode vs prefill throughput)
DEFAULT_QUANTUM_TOKENS = 4096.0


def line_cost(prompt_tokens: float, expected_output_tokens: float) -> float:
    """What one line is priced at, in prompt-token equivalents."""
    return max(1.0, prompt_tokens + OUTPUT_TOKEN_WEIGHT * expected_output_tokens)


@dataclass(frozen=True, slots=True)
class Candidate:
    """A batch with a line ready to start, as the scheduler sees it."""

    batch_id: str
    tenant_id: str
    deadline: float
    cost: float  # of its next line, see line_cost
    weight: float = 1.0  # its tenant's
    urgent: bool = False
    seq: int = 0  # creation order: the tie-break between equal deadlines


class Scheduler(Protocol):
    def pick(self, candidates: Sequence[Candidate], in_flight: Mapping[str, float] | None = None) -> Candidate | None:
        """`in_flight`: line cost each tenant has running now."""
        ...


class FifoScheduler:
    """The baseline the benchmarks compare with: oldest batch first, nothing else considered."""

    def pick(self, candidates: Sequence[Candidate], in_flight: Mapping[str, float] | None = None) -> Candidate | None:
        return min(candidates, key=lambda c: c.seq, default=None)


class EdfScheduler:
    """Earliest deadline first across everything, tenants ignored: optimal for meeting deadlines on one
    preemptive server, unfair by design. A reference point for the benchmarks."""

    def pick(self, candidates: Sequence[Candidate], in_flight: Mapping[str, float] | None = None) -> Candidate | None:
        return min(candidates, key=_edf, default=None)


class FairScheduler:
    def __init__(self, quantum_tokens: float = DEFAULT_QUANTUM_TOKENS) -> None:
        self.quantum_tokens = quantum_tokens
        self._deficit: dict[str, float] = {}
        self._turns: deque[str] = deque()  # active tenants; the head holds the turn
        self._topped_up: str | None = None  # the tenant whose current turn already got its quantum

    def pick(self, candidates: Sequence[Candidate], in_flight: Mapping[str, float] | None = None) -> Candidate | None:
        """The candidate to start now (charging its tenant), or None when there are none."""
        if not candidates:
            return None
        urgent = [c for c in candidates if c.urgent]
        if urgent:
            chosen = min(urgent, key=_edf)
            self._deficit[chosen.tenant_id] = self._deficit.get(chosen.tenant_id, 0.0) - chosen.cost
            return chosen
        best: dict[str, Candidate] = {}
        for candidate in candidates:
            held = best.get(candidate.tenant_id)
            if held is None or _edf(candidate) < _edf(held):
                best[candidate.tenant_id] = candidate
        self._sync_turns(best)
        if in_flight:
            owed = _most_owed(best, in_flight)
            if owed is not None:
                return owed
        # Every visit adds a positive quantum, so a line is found within ceil(cost / (quantum x weight)) rounds;
        # a quantum at least as large as the costliest line keeps that to one round for weights ≥ 1.
        quantum = max(self.quantum_tokens, max(c.cost for c in best.values()))
        while True:
            tenant = self._turns[0]
            chosen = best[tenant]
            if self._topped_up != tenant:
                self._deficit[tenant] += quantum * max(chosen.weight, 1e-3)
                self._topped_up = tenant
            if self._deficit[tenant] >= chosen.cost:
                self._deficit[tenant] -= chosen.cost
                return chosen
            self._turns.rotate(-1)
            self._topped_up = None

    def deficit(self, tenant_id: str) -> float:
        return self._deficit.get(tenant_id, 0.0)

    def _sync_turns(self, best: dict[str, Candidate]) -> None:
        """Drop tenants with nothing ready (their credit goes), append newcomers at the back of the round."""
        if any(tenant not in best for tenant in self._turns):
            head = self._turns[0] if self._turns else None
            self._turns = deque(t for t in self._turns if t in best)
            for tenant in list(self._deficit):
                if tenant not in best:
                    del self._deficit[tenant]
            if head not in best:
                self._topped_up = None
        for tenant in best:
            if tenant not in self._turns:
                self._deficit.setdefault(tenant, 0.0)  # a promoted line may already have charged it
                self._turns.append(tenant)


def _most_owed(best: Mapping[str, Candidate], in_flight: Mapping[str, float]) -> Candidate | None:
    """The tenant furthest below its weighted share of what is running, if it is short by a line or more.

    DRR shares out *starts*; when slots free up slowly (long lines, a full engine) a tenant that arrives while
    another holds every slot would wait many rounds for the occupancy its share entitles it to. Catching up
    on occupancy first gets it there in as many starts as it is short. Uncharged: it restores the share, it
    does not exceed it. With both tenants backlogged and line time about proportional to cost, token-fair
    starts keep occupancy even, so the two rules agree and this one stays quiet.
    """
    running = sum(in_flight.get(tenant, 0.0) for tenant in best)
    total_weight = sum(max(c.weight, 1e-3) for c in best.values())
    chosen: Candidate | None = None
    shortest = 0.0
    for tenant, candidate in best.items():
        # Shares of what will run once this slot is filled, the candidate's line included.
        after = running + candidate.cost
        short = after * max(candidate.weight, 1e-3) / total_weight - in_flight.get(tenant, 0.0)
        if short >= candidate.cost and short > shortest:
            chosen, shortest = candidate, short
    return chosen


@dataclass(frozen=True, slots=True)
class ShareGap:
    """A tenant with lines ready is short of its share of the work in flight, and who holds too much."""

    owed: Candidate  # the short tenant's next line
    short: float  # line cost it is short by
    over_tenant: str  # the tenant furthest above its share


def share_gap(candidates: Sequence[Candidate], in_flight: Mapping[str, float]) -> ShareGap | None:
    """When every slot is taken, the gap that only taking a slot back can close: None if no tenant with lines
    ready is short of its weighted share by a line or more, or if nobody else holds more than theirs.

    Tenants with work in flight but none ready count too: they hold slots they may have to give back.
    """
    best: dict[str, Candidate] = {}
    for candidate in candidates:
        held = best.get(candidate.tenant_id)
        if held is None or _edf(candidate) < _edf(held):
            best[candidate.tenant_id] = candidate
    weights = {tenant: max(c.weight, 1e-3) for tenant, c in best.items()}
    for tenant in in_flight:
        weights.setdefault(tenant, 1.0)
    running = sum(in_flight.values())
    total_weight = sum(weights.values())
    share = {tenant: running * weight / total_weight for tenant, weight in weights.items()}
    owed = max(best.values(), key=lambda c: share[c.tenant_id] - in_flight.get(c.tenant_id, 0.0), default=None)
    if owed is None:
        return None
    short = share[owed.tenant_id] - in_flight.get(owed.tenant_id, 0.0)
    over = max(in_flight, key=lambda tenant: in_flight[tenant] - share[tenant], default=None)
    if short < owed.cost or over is None or over == owed.tenant_id or in_flight[over] <= share[over]:
        return None
    return ShareGap(owed, short, over)


def _edf(candidate: Candidate) -> tuple[float, int]:
    return (candidate.deadline, candidate.seq)
