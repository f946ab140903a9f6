"""The result cache across batches (docs/evals.md): which lines may be answered from an earlier run, and by what key.

A line may reuse an earlier answer only when the same request would get the same answer again:
- the same tenant (the cache is never shared between tenants), endpoint, model and canonical request body (keys
  sorted; whitespace and key order in the input file do not matter);
- the same model identity: what the backend says about the weights it serves (`model_identity`), so that new
  weights, a new quantisation or a new context length behind the same model name re-run everything;
- a deterministic request: temperature 0, or a fixed `seed` (chat, completions, responses), or an endpoint that
  does not sample at all (embeddings, moderations, vLLM's classify, score and rerank).

A batch opts in with the metadata key `backfill_result_cache` ("true" / "false"); a batch that does not say gets
the `result_cache` setting. Pure: bodies in, keys out.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from backfill.domain.batches import POOLING_ENDPOINTS
from backfill.domain.usage import Usage

METADATA_KEY = "backfill_result_cache"
_FLAGS = {"true": True, "false": False}
_NOT_SAMPLED = frozenset({"/v1/embeddings", "/v1/moderations"}) | POOLING_ENDPOINTS
# Left out of a model's identity: when the server started and vLLM's per-answer permission objects (a fresh id
# each time), not what it serves.
_VOLATILE = frozenset({"created", "permission"})


def metadata_flag(metadata: Mapping[str, str] | None) -> bool | None:
    """The batch's own choice (None: it did not say). Values other than "true"/"false" were refused at create."""
    if not metadata:
        return None
    return _FLAGS.get(str(metadata.get(METADATA_KEY, "")).lower())


def metadata_error(metadata: Mapping[str, Any] | None) -> str | None:
    """Why the batch's `backfill_result_cache` value cannot be used, or None."""
    if not metadata or METADATA_KEY not in metadata:
        return None
    value = metadata[METADATA_KEY]
    if isinstance(value, str) and value.lower() in _FLAGS:
        return None
    return f'Invalid \'metadata.{METADATA_KEY}\': expected "true" or "false", but got {value!r} instead.'


def is_deterministic(endpoint: str, body: Mapping[str, Any]) -> bool:
    """Whether sending `body` again would give the same answer (as far as the engine keeps its promises)."""
    if endpoint in _NOT_SAMPLED:
        return True
    if body.get("stream") is True:
        return False
    temperature = body.get("temperature")
    if isinstance(temperature, int | float) and not isinstance(temperature, bool) and temperature == 0:
        return True
    seed = body.get("seed")
    return isinstance(seed, int) and not isinstance(seed, bool)


def cache_key(endpoint: str, model: str, identity: str, body: Mapping[str, Any]) -> str | None:
    """The key of a line's answer, or None if the line must not be answered from the cache."""
    if not is_deterministic(endpoint, body):
        return None
    canonical = orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
    digest = hashlib.sha256()
    for part in (endpoint.encode(), model.encode(), identity.encode()):
        digest.update(part)
        digest.update(b"\0")
    digest.update(canonical)
    return digest.hexdigest()


def model_identity(described: Mapping[str, Any] | None, *, flavour: str, revision: str | None) -> str | None:
    """A backend's identity for one model: what its server says of it (an entry of GET /v1/models, less the
    start time) and the operator's `model_revision`. None when neither is known: nothing is cached then."""
    if described is None and not revision:
        return None
    entry = {name: value for name, value in (described or {}).items() if name not in _VOLATILE}
    blob = orjson.dumps({"flavour": flavour, "model": entry, "revision": revision}, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(blob).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class CachedResult:
    """An answer kept for reuse: what the output line showed, and the line that first got it."""

    result_id: str  # the batch request id of the line that got it from a backend
    status_code: int
    request_id: str | None
    body: bytes
    usage: Usage


@dataclass(frozen=True, slots=True)
class CacheWrite:
    """A succeeded line's answer, to be kept under `key` for its batch's tenant."""

    key: str
    result: CachedResult
