"""What came back from one attempt to run a line on a backend."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

import msgspec

from backfill.domain.usage import Usage


class OutcomeKind(StrEnum):
    SUCCESS = "success"  # 2xx with a JSON object body
    HTTP_ERROR = "http_error"  # the backend answered with a non-2xx status
    TIMEOUT = "timeout"  # no answer within the request timeout
    UNAVAILABLE = "unavailable"  # could not connect, or an answer that is not a JSON object


RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504, 520, 521, 522, 524, 529})


class Outcome(msgspec.Struct, frozen=True):
    kind: OutcomeKind
    status_code: int | None = None
    body: bytes | None = None  # JSON object bytes for SUCCESS and HTTP_ERROR
    request_id: str | None = None
    retry_after_s: float | None = None
    usage: Usage = Usage()
    message: str = ""
    unreachable: bool = False  # the request never reached the server: no connection could be made
    # Each input's prompt tokens, where the backend counted them with the model's tokenizer (the embedded engine):
    # how a coalesced request's usage is shared out among its lines (domain/coalescing.py).
    input_tokens: tuple[int, ...] = ()
    cached_from: str | None = None  # an earlier line's answer from the result cache: no backend saw this one
    # `body`'s members as the backend read them, values unparsed (backfill.rawjson): splitting a coalesced answer
    # (dispatch/coalesced.py) starts from these rather than reading the bytes again. Never stored.
    answer: dict[str, Any] | None = None

    @property
    def is_retryable(self) -> bool:
        if self.kind is OutcomeKind.SUCCESS:
            return False
        if self.kind is OutcomeKind.HTTP_ERROR:
            return self.status_code in RETRYABLE_STATUS or (self.status_code or 0) >= 500
        return True

    @property
    def error_code(self) -> str:
        return "timeout" if self.kind is OutcomeKind.TIMEOUT else "backend_unavailable"
