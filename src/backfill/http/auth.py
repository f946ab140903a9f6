"""Who is calling: API key -> tenant. With no keys at all, one open tenant (loopback only, see cli)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog

from backfill.domain.keys import key_matches, prefix_of
from backfill.errors import AuthenticationFailed
from backfill.services import DEFAULT_TENANT, Services

log = structlog.get_logger(__name__)
OPEN_RECHECK_S = 1.0


class Authenticator:
    """Keys are looked up once each, then remembered. While no key exists (open mode), whether one has appeared is
    re-read from the database at most once every `recheck_s`, in the background: a request never waits for the
    database then (the interactive proxy's time to first token would), and `backfill keys create` on a running
    server closes open mode within about a second. A key that was created meanwhile and is presented works at
    once: it is looked up, and it closes open mode."""

    def __init__(
        self, services: Services, *, clock: Callable[[], float] = time.monotonic, recheck_s: float = OPEN_RECHECK_S
    ) -> None:
        self.services = services
        self.clock = clock
        self.recheck_s = recheck_s
        self._open = True
        self._checked_at: float | None = None
        self._recheck: asyncio.Task[None] | None = None
        self._default_tenant: str | None = None
        self._cache: dict[str, str] = {}

    async def _is_open(self) -> bool:
        if not self._open:
            return False
        now = self.clock()
        if self._checked_at is None:
            await self._count_keys(now)
        elif now - self._checked_at >= self.recheck_s and self._recheck is None:
            self._recheck = asyncio.create_task(self._recount(now))
        return self._open

    async def _count_keys(self, now: float) -> None:
        self._open = self._open and await self.services.store.count_api_keys() == 0
        self._checked_at = now

    async def _recount(self, now: float) -> None:
        try:
            await self._count_keys(now)
        except Exception as exc:  # the database is away: the next request tries again
            log.warning("auth.recheck_failed", error=f"{type(exc).__name__}: {exc}")
        finally:
            self._recheck = None

    async def tenant_for(self, presented: str | None) -> str:
        """The tenant id for a presented key; raises AuthenticationFailed."""
        if presented and (tenant := self._cache.get(presented)) is not None:
            return tenant
        if await self._is_open():
            if presented and (tenant := await self._look_up(presented)) is not None:
                self._open = False  # a key exists after all: open mode ends now
                return tenant
            if self._default_tenant is None:
                self._default_tenant = await self.services.store.ensure_tenant(DEFAULT_TENANT, self.services.now())
            return self._default_tenant
        if not presented:
            raise AuthenticationFailed(
                "You didn't provide an API key. Pass it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'.",
                code="missing_api_key",
            )
        if (tenant := await self._look_up(presented)) is not None:
            return tenant
        raise AuthenticationFailed("Incorrect API key provided.", code="invalid_api_key")

    async def _look_up(self, presented: str) -> str | None:
        """The tenant of a key of ours, remembered; None for anything else (no database read if not ours)."""
        prefix = prefix_of(presented)
        if prefix is None:
            return None
        for salt, key_hash, tenant_id in await self.services.store.key_candidates(prefix):
            if key_matches(presented, salt, key_hash):
                if len(self._cache) > 10_000:
                    self._cache.clear()
                self._cache[presented] = tenant_id
                return tenant_id
        return None


def presented_key(authorization: str | None, x_api_key: str | None) -> str | None:
    """The key from `Authorization: Bearer` (OpenAI's SDK) or `x-api-key` (Anthropic's), whichever is sent."""
    return bearer_token(authorization) or (x_api_key.strip() if x_api_key and x_api_key.strip() else None)


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None
