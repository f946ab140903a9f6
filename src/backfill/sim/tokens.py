"""The simulator's synthetic tokenizer, answer lengths and embedding vectors: deterministic and cheap.

A text's tokens are its consecutive ``chars_per_token``-character pieces, so a count is one division and two
prompts that start with the same text start with the same tokens. A chat prompt is rendered with a fixed
template first, so equal leading messages give equal leading blocks, as a real chat template does.
"""

from __future__ import annotations

import hashlib
import math
import random
import struct
from collections.abc import Iterable, Sequence

from backfill.sim.engine import FinishReason
from backfill.sim.profile import EngineProfile

_HASH_BYTES = 8


def render_chat(messages: Sequence[tuple[str, str]]) -> str:
    """The prompt text of (role, content) messages, ending with the assistant's turn."""
    return "".join(f"<|{role}|>\n{content}<|end|>\n" for role, content in messages) + "<|assistant|>\n"


def count_text_tokens(text: str, chars_per_token: int) -> int:
    """At least one: an empty prompt still holds the begin-of-text token."""
    return max(1, -(-len(text) // chars_per_token))


def text_prefix_hashes(text: str, chars_per_token: int, block_size: int) -> tuple[int, ...]:
    """Chained hashes of the full token blocks of ``text`` (each hash covers its block and all before it)."""
    num_blocks = count_text_tokens(text, chars_per_token) // block_size
    width = chars_per_token * block_size
    return _chain(text[i * width : (i + 1) * width].encode() for i in range(num_blocks))


def ids_prefix_hashes(token_ids: Sequence[int], block_size: int) -> tuple[int, ...]:
    """Chained hashes of the full blocks of a prompt given as token ids."""
    num_blocks = len(token_ids) // block_size
    return _chain(
        struct.pack(f"<{block_size}q", *token_ids[i * block_size : (i + 1) * block_size]) for i in range(num_blocks)
    )


def _chain(blocks: Iterable[bytes]) -> tuple[int, ...]:
    hashes = []
    previous = b""
    for block in blocks:
        previous = hashlib.blake2b(previous + block, digest_size=_HASH_BYTES).digest()
        hashes.append(int.from_bytes(previous, "little"))
    return tuple(hashes)


def answer_piece(chars_per_token: int) -> str:
    """The text of one generated token: " sim", cut or padded to the token width, so answers re-tokenize exactly."""
    return (" sim" + "m" * chars_per_token)[:chars_per_token]


class OutputLengths:
    """Draws how many tokens an answer has, from the profile's distribution, with its own seeded generator."""

    def __init__(self, profile: EngineProfile) -> None:
        self._dist = profile.output_len_dist
        self._mean = profile.output_len_mean
        self._rng = random.Random(profile.seed)

    def draw(self, max_tokens: int, ignore_eos: bool) -> tuple[int, FinishReason]:
        """The answer's length and why it ends: "length" when max_tokens cut it short."""
        if ignore_eos:
            return max_tokens, "length"
        natural = self._natural_length()
        if natural >= max_tokens:
            return max_tokens, "length"
        return natural, "stop"

    def _natural_length(self) -> int:
        if self._dist == "fixed":
            return self._mean
        if self._dist == "uniform":
            return self._rng.randint(1, 2 * self._mean - 1)
        return max(1, round(self._rng.expovariate(1 / self._mean)))


def embed(text: str, dimensions: int) -> list[float]:
    """A deterministic unit vector for ``text``."""
    raw = hashlib.shake_128(text.encode()).digest(dimensions)
    vector = [byte / 127.5 - 1.0 for byte in raw]
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return [x / norm for x in vector]
