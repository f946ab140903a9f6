"""Who is calling: API key -> tenant (and whether the key is an admin's). With no keys at all, one open tenant
(loopback only, see cli)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from backfill.domain.keys import key_matches, prefix_of
from backfill.domain.tenants import DEFAULT_TENANT, KeyMatch
from backfill.errors import AuthenticationFailed
from backfill.http.background import in_background
from backfill.services import Services

log = structlog.get_logger(__name__)
OPEN_RECHECK_S = 1.0
REVALIDATE_S = 1.0  # a revoked key is refused by every process within about this (docs/tenants.md says 5 s)
_MAX_CACHED = 10_000


@dataclass(frozen=True)
class Caller:
    """Who a request comes from. In open mode there is no key, and the caller may do anything (admin)."""

    tenant_id: str
    admin: bool
    key_id: str | None = None


class Authenticator:
    """Keys are looked up once each, then remembered. While no key exists (open mode), whether one has appeared is
    re-read from the database at most once every `recheck_s`, in the background: a request never waits for the
    database then (the interactive proxy's time to first token would), and `backfill keys create` on a running
    server closes open mode within about a second. A key that was created meanwhile and is presented works at
    once: it is looked up, and it closes open mode.

    Remembered keys are re-validated in the background (`run`): every `REVALIDATE_S` one query asks which of them
    have been revoked since, and those are forgotten, so the next request with one is refused. The same pass
    writes when each key was last used. No request waits for either."""

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
        self._cache: dict[str, KeyMatch] = {}
        self._used: dict[str, int] = {}  # key id -> when last used, not yet written

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
        return (await self.caller_for(presented)).tenant_id

    async def caller_for(self, presented: str | None) -> Caller:
        """Who presents this key (None: no key); raises AuthenticationFailed."""
        if presented and (match := self._cache.get(presented)) is not None:
            return self._used_by(match)
        if await self._is_open():
            if presented and (match := await self._look_up(presented)) is not None:
                self._open = False  # a key exists after all: open mode ends now
                return self._used_by(match)
            if self._default_tenant is None:
                self._default_tenant = await self.services.store.ensure_tenant(DEFAULT_TENANT, self.services.now())
            return Caller(self._default_tenant, admin=True)
        if not presented:
            raise AuthenticationFailed(
                "You didn't provide an API key. Pass it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'.",
                code="missing_api_key",
            )
        if (match := await self._look_up(presented)) is not None:
            return self._used_by(match)
        raise AuthenticationFailed("Incorrect API key provided.", code="invalid_api_key")

    def _used_by(self, match: KeyMatch) -> Caller:
        self._used[match.id] = self.services.now()
        return Caller(match.tenant_id, match.admin, match.id)

    async def _look_up(self, presented: str) -> KeyMatch | None:
        """The live key of ours presented, remembered; None for anything else (no database read if not ours)."""
        prefix = prefix_of(presented)
        if prefix is None:
            return None
        for match in await self.services.store.key_candidates(prefix):
            if key_matches(presented, match.salt, match.key_hash):
                if len(self._cache) > _MAX_CACHED:
                    self._cache.clear()
                self._cache[presented] = match
                return match
        return None

    async def revalidate(self) -> None:
        """Forget remembered keys that have been revoked; write when keys were last used."""
        if self._cache:
            revoked = await self.services.store.revoked_among({match.id for match in self._cache.values()})
            if revoked:
                for presented, match in list(self._cache.items()):
                    if match.id in revoked:
                        del self._cache[presented]
                log.info("auth.keys_revoked", keys=sorted(revoked))
        used, self._used = self._used, {}
        try:
            await self.services.store.record_key_use(used)
        except Exception:
            for key_id, when in used.items():  # written next time
                self._used[key_id] = max(when, self._used.get(key_id, when))
            raise

    async def run(self, interval_s: float = REVALIDATE_S) -> None:
        """`revalidate` every `interval_s`, until cancelled; a failed pass (database away) is retried next time."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.revalidate()
            except Exception as exc:
                log.warning("auth.revalidate_failed", error=f"{type(exc).__name__}: {exc}")

    def running(self, interval_s: float = REVALIDATE_S) -> contextlib.AbstractAsyncContextManager[None]:
        """`run` in the background while the block runs."""
        return in_background(self.run(interval_s))


def presented_key(authorization: str | None, x_api_key: str | None) -> str | None:
    """The key from `Authorization: Bearer` (OpenAI's SDK) or `x-api-key` (Anthropic's), whichever is sent."""
    return bearer_token(authorization) or (x_api_key.strip() if x_api_key and x_api_key.strip() else None)


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None
