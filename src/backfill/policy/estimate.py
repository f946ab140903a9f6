"""When will each batch finish, and which ones are at risk of missing their window.

The estimate is a fluid model of the scheduler itself: the pool serves `tokens_per_s` (line cost units, see
`fair.line_cost`), active tenants share it by weight (deficit round robin in the limit), and inside a tenant
the earliest deadline takes the tenant's whole share. Stepping from one batch completion to the next gives
every batch's completion time in O(n²) for n batches — a handful per pool in practice.

Laxity = deadline - estimated completion. A batch is *promoted* when its laxity falls below
`promote_margin(window)`, and *at risk* when the estimate is past its deadline even so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class WorkItem:
    batch_id: str
    tenant_id: str
    deadline: float
    remaining_cost: float  # line_cost summed over its unfinished lines
    weight: float = 1.0
    seq: int = 0


def estimate_completions(now: float, items: Sequence[WorkItem], tokens_per_s: float) -> dict[str, float]:
    """Estimated completion time of every batch sharing a pool that serves `tokens_per_s`."""
    if tokens_per_s <= 0:
        return {item.batch_id: float("inf") for item in items}
    left = {item.batch_id: item.remaining_cost for item in items if item.remaining_cost > 0}
    done = {item.batch_id: now for item in items if item.remaining_cost <= 0}
    by_tenant: dict[str, list[WorkItem]] = {}
    for item in sorted(items, key=lambda i: (i.deadline, i.seq)):
        if item.batch_id in left:
            by_tenant.setdefault(item.tenant_id, []).append(item)
    weights = {tenant: max(queue[0].weight, 1e-3) for tenant, queue in by_tenant.items()}
    clock = now
    while by_tenant:
        total_weight = sum(weights[t] for t in by_tenant)
        # Each tenant's head batch runs at the tenant's share; find which head finishes first.
        rates = {t: tokens_per_s * weights[t] / total_weight for t in by_tenant}
        step = min(left[queue[0].batch_id] / rates[t] for t, queue in by_tenant.items())
        clock += step
        for tenant in list(by_tenant):
            queue = by_tenant[tenant]
            head = queue[0].batch_id
            left[head] -= rates[tenant] * step
            if left[head] <= 1e-9 * max(1.0, tokens_per_s):
                done[head] = clock
                queue.pop(0)
                if not queue:
                    del by_tenant[tenant]
    return done


def promote_margin_s(window_s: float) -> float:
    """Slack kept in hand before a batch is promoted: a tenth of its window, at least five minutes."""
    return max(300.0, 0.1 * window_s)


@dataclass(frozen=True, slots=True)
class Outlook:
    eta: float
    laxity_s: float
    promoted: bool
    at_risk: bool


def outlook(eta: float, deadline: float, window_s: float, finishing_alone_at: float) -> Outlook:
    """Promote on the fair-share estimate; flag at risk only if even running alone would be too late."""
    laxity = deadline - eta
    return Outlook(eta, laxity, laxity < promote_margin_s(window_s), finishing_alone_at > deadline)
