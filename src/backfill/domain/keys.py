"""API keys: shown once, stored as prefix + salted SHA-256 only.

Keys carry 256 bits of randomness, so a fast salted hash is enough (no password stretching needed); the prefix
finds the row, `hmac.compare_digest` compares the hash.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

KEY_PREFIX = "bf-"
_PREFIX_CHARS = 12


@dataclass(frozen=True)
class NewKey:
    plaintext: str
    prefix: str
    salt: str
    key_hash: str


def hash_key(plaintext: str, salt: str) -> str:
    return hashlib.sha256(f"{salt}:{plaintext}".encode()).hexdigest()


def make_key() -> NewKey:
    body = secrets.token_hex(32)
    plaintext = f"{KEY_PREFIX}{body}"
    salt = secrets.token_hex(16)
    return NewKey(plaintext, body[:_PREFIX_CHARS], salt, hash_key(plaintext, salt))


def prefix_of(plaintext: str) -> str | None:
    """The lookup prefix of a presented key, or None if it cannot be one of ours."""
    if not plaintext.startswith(KEY_PREFIX) or len(plaintext) < len(KEY_PREFIX) + _PREFIX_CHARS:
        return None
    return plaintext[len(KEY_PREFIX) : len(KEY_PREFIX) + _PREFIX_CHARS]


def key_matches(plaintext: str, salt: str, key_hash: str) -> bool:
    return hmac.compare_digest(hash_key(plaintext, salt), key_hash)
