"""What a line becomes after an attempt: the retry policy's verdict turned into the update the store records."""

from __future__ import annotations

import random

from backfill import ids
from backfill.core.pool import Start
from backfill.domain.batches import RequestState
from backfill.domain.leases import LeasedLine, LineUpdate
from backfill.domain.outcomes import Outcome, OutcomeKind
from backfill.policy.retry import RetryPolicy, Verdict

# A request's timeout is capped at its batch's window end; timers fire a little early (the request's own set-up
# came off the budget), so a timeout this close to the end is the window's.
WINDOW_SLACK_S = 1.0


def cut_by_window(start: Start, outcome: Outcome, now: float) -> bool:
    """The request timed out because its batch's window ran out, not because the endpoint failed."""
    return outcome.kind is OutcomeKind.TIMEOUT and now >= start.batch.expires_at - WINDOW_SLACK_S


def line_update_after(retry: RetryPolicy, rng: random.Random, start: Start, outcome: Outcome, now: float) -> LineUpdate:
    """The line's new state once `outcome` came back for it: succeeded, failed, expired, or queued for a retry."""
    line, batch = start.line, start.batch
    attempts = line.attempts + 1
    if cut_by_window(start, outcome, now):
        return LineUpdate(line.id, line.batch_id, line.lease_seq, RequestState.EXPIRED, attempts)
    decision = retry.decide(outcome, attempts, now, batch.expires_at, rng)
    if decision.verdict is Verdict.RETRY:
        assert decision.retry_at is not None
        return LineUpdate(
            line.id, line.batch_id, line.lease_seq, RequestState.QUEUED, attempts, decision.retry_at,
            error_message=outcome.message or None,
        )  # fmt: skip
    state = RequestState.SUCCEEDED if decision.verdict is Verdict.SUCCEED else RequestState.FAILED
    has_response = outcome.kind in (OutcomeKind.SUCCESS, OutcomeKind.HTTP_ERROR)
    return LineUpdate(
        line.id,
        line.batch_id,
        line.lease_seq,
        state,
        attempts,
        result_id=ids.batch_request_id(),
        status_code=outcome.status_code if has_response else None,
        request_id=(outcome.request_id or ids.request_id()) if has_response else None,
        body=outcome.body if has_response else None,
        error_code=None if has_response else outcome.error_code,
        error_message=None if has_response else f"{outcome.message} ({decision.reason}).",
        usage=outcome.usage,
        capacity=start.capacity,
        finished_at=now,
        cached_from=outcome.cached_from,
    )


def closed(line: LeasedLine, state: RequestState) -> LineUpdate:
    """A line this worker gives up: back to the queue uncharged (QUEUED), or ended expired/cancelled."""
    return LineUpdate(line.id, line.batch_id, line.lease_seq, state, line.attempts)
