"""The dashboard's session: a signed, expiring cookie naming the API key that signed in, and its CSRF token.

The cookie holds the key's id, never the key: each request checks that the key still exists and is not revoked,
so revoking a key signs its dashboard sessions out too. Open mode (no keys yet) signs in without a key, as admin."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass

import orjson

COOKIE = "backfill_session"
SESSION_S = 12 * 3600
OPEN_MODE = "-"  # the key id of an open-mode session


@dataclass(frozen=True)
class Session:
    key_id: str  # OPEN_MODE when signed in without a key
    csrf: str
    expires_at: int


class SessionSigner:
    """Signs and checks session tokens with HMAC-SHA256 over a server secret."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    @classmethod
    def from_setting(cls, secret: str | None) -> SessionSigner:
        return cls(secret.encode() if secret else secrets.token_bytes(32))

    def _mac(self, body: bytes) -> str:
        return base64.urlsafe_b64encode(hmac.new(self._secret, body, hashlib.sha256).digest()).decode().rstrip("=")

    def issue(self, key_id: str, now: int) -> tuple[str, Session]:
        session = Session(key_id, secrets.token_urlsafe(24), now + SESSION_S)
        body = base64.urlsafe_b64encode(orjson.dumps([session.key_id, session.csrf, session.expires_at]))
        return f"{body.decode()}.{self._mac(body)}", session

    def read(self, token: str | None, now: int) -> Session | None:
        """The session of a token this server signed and that has not expired; None for anything else."""
        if not token or token.count(".") != 1:
            return None
        body, mac = token.split(".")
        if not hmac.compare_digest(mac, self._mac(body.encode())):
            return None
        try:
            key_id, csrf, expires_at = orjson.loads(base64.urlsafe_b64decode(body.encode()))
        except (ValueError, TypeError):
            return None
        if not isinstance(expires_at, int) or expires_at <= now:
            return None
        return Session(str(key_id), str(csrf), expires_at)
