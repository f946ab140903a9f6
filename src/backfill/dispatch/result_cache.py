"""The result cache as the dispatcher uses it (domain.result_cache has the rules): a line's key, the answer kept under
it, and a success marked to be kept. A line's key is worked out only when its batch has the cache on."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec
import structlog

from backfill.config import Settings
from backfill.core.events import Action, Record
from backfill.domain.batches import RequestState
from backfill.domain.leases import DispatchBatch
from backfill.domain.outcomes import Outcome, OutcomeKind
from backfill.domain.result_cache import cache_key, is_deterministic
from backfill.metrics import Metrics
from backfill.ports import Backend, IdentifiesModel, ResultCache

log = structlog.get_logger(__name__)


class ResultCacheLookups:
    def __init__(self, store: ResultCache, settings: Settings, metrics: Metrics) -> None:
        self.store = store
        self.default = settings.result_cache
        self.metrics = metrics

    def wanted(self, batch: DispatchBatch) -> bool:
        return self.default if batch.result_cache is None else batch.result_cache

    async def key(self, batch: DispatchBatch, backend: Backend, body: Mapping[str, Any]) -> str | None:
        """The line's key, or None when it is not to be cached: the batch did not ask, the request samples, or the
        backend cannot say which weights it serves."""
        if not self.wanted(batch) or not isinstance(backend, IdentifiesModel):
            return None
        if not isinstance(body, Mapping) or not is_deterministic(batch.endpoint, body):
            return None
        identity = await backend.model_identity(batch.model)
        if identity is None:
            return None
        return cache_key(batch.endpoint, batch.model, identity, body)

    async def lookup(self, batch: DispatchBatch, key: str) -> Outcome | None:
        """The kept answer as the line's outcome, or None: the line goes to its backend (also when the store
        cannot answer: a cache is never a reason for a line to fail)."""
        try:
            hit = await self.store.cached_result(batch.tenant_id, key)
        except Exception:
            log.exception("result_cache.lookup_failed", batch_id=batch.id)
            self.metrics.result_cache_lookups.labels("error").inc()
            return None
        self.metrics.result_cache_lookups.labels("miss" if hit is None else "hit").inc()
        if hit is None:
            return None
        return Outcome(
            OutcomeKind.SUCCESS,
            status_code=hit.status_code,
            body=hit.body,
            request_id=hit.request_id,
            usage=hit.usage,
            cached_from=hit.result_id,
        )

    @staticmethod
    def keep(action: Action, key: str) -> Action:
        """A line's success, to be kept under `key` when it is recorded (or, answered from the cache, to mark that
        entry used); any other action unchanged."""
        if isinstance(action, Record) and action.update.state is RequestState.SUCCEEDED:
            return Record(msgspec.structs.replace(action.update, cache_key=key))
        return action
