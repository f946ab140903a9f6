"""Who is calling: API key -> tenant. With no keys at all, one open tenant (loopback only, see cli)."""

from __future__ import annotations

from backfill.domain.keys import key_matches, prefix_of
from backfill.errors import AuthenticationFailed
from backfill.services import DEFAULT_TENANT, Services


class Authenticator:
    def __init__(self, services: Services) -> None:
        self.services = services
        self._open = True
        self._default_tenant: str | None = None
        self._cache: dict[str, str] = {}

    async def _is_open(self) -> bool:
        # Checked on every request until the first key exists (a cheap count), then never again: a key created
        # by `backfill keys create` on a running server closes open mode at once.
        if self._open:
            self._open = await self.services.store.count_api_keys() == 0
        return self._open

    async def tenant_for(self, presented: str | None) -> str:
        """The tenant id for a presented key; raises AuthenticationFailed."""
        if await self._is_open():
            if self._default_tenant is None:
                self._default_tenant = await self.services.store.ensure_tenant(DEFAULT_TENANT, self.services.now())
            return self._default_tenant
        if not presented:
            raise AuthenticationFailed(
                "You didn't provide an API key. Pass it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'.",
                code="missing_api_key",
            )
        if (tenant := self._cache.get(presented)) is not None:
            return tenant
        prefix = prefix_of(presented)
        if prefix is not None:
            for salt, key_hash, tenant_id in await self.services.store.key_candidates(prefix):
                if key_matches(presented, salt, key_hash):
                    if len(self._cache) > 10_000:
                        self._cache.clear()
                    self._cache[presented] = tenant_id
                    return tenant_id
        raise AuthenticationFailed("Incorrect API key provided.", code="invalid_api_key")


def presented_key(authorization: str | None, x_api_key: str | None) -> str | None:
    """The key from `Authorization: Bearer` (OpenAI's SDK) or `x-api-key` (Anthropic's), whichever is sent."""
    return bearer_token(authorization) or (x_api_key.strip() if x_api_key and x_api_key.strip() else None)


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None
