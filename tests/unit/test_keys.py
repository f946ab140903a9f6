"""API keys: made once, stored as prefix + salted hash, matched in constant time."""

from __future__ import annotations

import pytest

from backfill.domain.keys import KEY_PREFIX, hash_key, key_matches, make_key, prefix_of


def test_new_key_is_long_prefixed_and_its_prefix_finds_it() -> None:
    key = make_key()

    assert key.plaintext.startswith(KEY_PREFIX)
    assert 64 == len(key.plaintext) - len(KEY_PREFIX)  # 256 bits, hex
    assert key.prefix == prefix_of(key.plaintext)
    assert key_matches(key.plaintext, key.salt, key.key_hash)


def test_stored_parts_do_not_contain_the_key() -> None:
    key = make_key()

    secret_part = key.plaintext[len(KEY_PREFIX) + len(key.prefix) :]
    for stored in (key.prefix, key.salt, key.key_hash):
        assert secret_part not in stored


def test_keys_and_salts_are_never_reused() -> None:
    keys = [make_key() for _ in range(50)]

    assert 50 == len({key.plaintext for key in keys})
    assert 50 == len({key.salt for key in keys})
    assert 50 == len({key.prefix for key in keys})


def test_a_different_key_does_not_match() -> None:
    key = make_key()
    other = make_key()
    tampered = key.plaintext[:-1] + ("0" if key.plaintext[-1] != "0" else "1")

    assert not key_matches(other.plaintext, key.salt, key.key_hash)
    assert not key_matches(tampered, key.salt, key.key_hash)


def test_same_key_with_another_salt_hashes_differently() -> None:
    key = make_key()

    assert hash_key(key.plaintext, "salt-a") != hash_key(key.plaintext, "salt-b")
    assert not key_matches(key.plaintext, "another-salt", key.key_hash)


@pytest.mark.parametrize(
    "presented",
    ["", "sk-0123456789abcdef0123", "bf-", "bf-0123456789a", "BF-0123456789abcdef", "0123456789abcdef"],
)
def test_strings_that_cannot_be_our_keys_have_no_prefix(presented: str) -> None:
    assert prefix_of(presented) is None


def test_prefix_is_the_start_of_the_key_body() -> None:
    assert "0123456789ab" == prefix_of("bf-0123456789abcdef")
