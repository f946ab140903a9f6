"""Split a batch input file into lines and validate them against SPEC §3, streaming, one pass.

Nothing here does I/O: the caller feeds chunks of bytes and gets back either the valid lines (with their byte
offsets in the file, so the dispatcher reads each body straight from the blob) or the line-numbered errors.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import orjson

from backfill.domain.batches import LineError
from backfill.domain.bodies import check_body, json_kind
from backfill.domain.coalescing import COALESCED_ENDPOINTS
from backfill.domain.estimates import max_output_tokens, prefix_key
from backfill.domain.valid_lines import LineColumns, ValidLine, group_by_prefix

INVALID_JSON_MESSAGE = "This line is not parseable as valid JSON."
BOM = b"\xef\xbb\xbf"  # the UTF-8 byte order mark some editors put at the start of a file
# orjson reads JSON nested up to 1024 levels but writes at most 254: the dispatcher re-serialises every body.
MAX_BODY_DEPTH = 254


def missing_input_file(file_id: str) -> LineError:
    """Why a batch whose input file cannot be found failed, in OpenAI's words."""
    return LineError(
        "invalid_request", f"Cannot find file {file_id}, or your tenant does not have access to it.", None, "file_id"
    )


class RawLine(msgspec.Struct, frozen=True):
    """One physical line: 1-based number, byte offset and length in the file; `data` None if over the limit."""

    number: int
    offset: int
    length: int
    data: bytes | None


def _without_bom(chunks: Iterable[bytes]) -> tuple[int, Iterator[bytes]]:
    """The chunks with a leading byte order mark left out, and how many bytes that was (0 or 3)."""
    rest = iter(chunks)
    head = b""
    for chunk in rest:
        head += chunk
        if len(head) >= len(BOM):
            break
    skipped = len(BOM) if head.startswith(BOM) else 0
    return skipped, itertools.chain((head[skipped:],), rest)


def split_lines(chunks: Iterable[bytes], max_line_bytes: int) -> Iterator[RawLine]:
    """Yield the lines of a stream of chunks, never holding more than one line (capped) plus one chunk.

    A UTF-8 byte order mark at the start of the file belongs to no line: line 1 starts after it."""
    number = 0
    offset, stream = _without_bom(chunks)  # offset: file offset of the first byte of `pending`
    pending: list[bytes] = []
    pending_len = 0
    oversize = False
    for chunk in stream:
        parts = chunk.split(b"\n")
        for part in parts[:-1]:
            number += 1
            length = pending_len + len(part)
            if oversize or length > max_line_bytes:
                yield RawLine(number, offset, length, None)
            else:
                yield RawLine(number, offset, length, b"".join((*pending, part)) if pending else part)
            offset += length + 1
            pending, pending_len, oversize = [], 0, False
        tail = parts[-1]
        pending_len += len(tail)
        if oversize or pending_len > max_line_bytes:
            pending, oversize = [], True  # keep counting its length, drop its bytes
        elif tail:
            pending.append(tail)
    if pending_len:
        number += 1
        yield RawLine(number, offset, pending_len, None if oversize else b"".join(pending))


@dataclass(frozen=True)
class ValidationLimits:
    max_lines: int = 50_000
    max_line_bytes: int = 16 * 1024 * 1024
    max_embedding_inputs: int = 50_000
    max_reported_errors: int = 100


@dataclass
class ValidationResult:
    lines: Sequence[ValidLine]
    model: str | None
    errors: list[LineError]
    error_count: int

    @property
    def ok(self) -> bool:
        return self.error_count == 0

    @property
    def est_prompt_tokens(self) -> int:
        return sum(line.est_prompt_tokens for line in self.lines)


def estimate_prompt_tokens(line_bytes: int) -> int:
    """Documented estimate used for quotas and scheduling: one token per 4 bytes of the request line."""
    return max(1, line_bytes // 4)


def is_reserialisable(value: Any) -> bool:
    """Whether orjson can write `value` out again (it reads deeper nesting than it writes: MAX_BODY_DEPTH)."""
    try:
        orjson.dumps(value)
    except orjson.JSONEncodeError:
        return False
    return True


def count_embedding_inputs(body: dict[str, Any]) -> int:
    value = body.get("input")
    if isinstance(value, list) and value and not isinstance(value[0], int):
        return len(value)
    return 1


@dataclass
class FileValidator:
    """Feed it every RawLine of a file in order, then call `finish()`."""

    endpoint: str
    is_served: Callable[[str], bool]
    limits: ValidationLimits = field(default_factory=ValidationLimits)
    _lines: LineColumns = field(default_factory=LineColumns)
    _errors: list[LineError] = field(default_factory=list)
    _error_count: int = 0
    _seen_ids: set[str] = field(default_factory=set)
    _model: str | None = None
    _model_line: int = 0
    _requests: int = 0
    _embedding_inputs: int = 0
    _too_many: bool = False
    _refusal: LineError | None = None

    def _error(self, code: str, message: str, line: int | None, param: str | None = None) -> None:
        self._error_count += 1
        self._refusal = LineError(code, message, line, param)
        if len(self._errors) < self.limits.max_reported_errors:
            self._errors.append(self._refusal)

    def feed(self, raw: RawLine) -> LineError | None:
        """Check one line; the error that refuses it, if any (every error is also kept for `finish`)."""
        self._refusal = None
        self._check(raw)
        return self._refusal

    def _check(self, raw: RawLine) -> None:
        if raw.data is not None and not raw.data.strip():
            return  # blank lines carry no request
        self._requests += 1
        if self._requests > self.limits.max_lines:
            if not self._too_many:
                self._too_many = True
                self._error(
                    "too_many_tasks",
                    f"The batch input file has more than the maximum of {self.limits.max_lines} requests.",
                    None,
                )
            return
        if raw.data is None:
            self._error(
                "invalid_request",
                f"This line is {raw.length} bytes, more than the maximum of {self.limits.max_line_bytes}.",
                raw.number,
            )
            return
        try:
            obj = orjson.loads(raw.data)
        except orjson.JSONDecodeError:
            self._error("invalid_json_line", INVALID_JSON_MESSAGE, raw.number)
            return
        # Fewer brackets in the line than orjson writes levels: nesting cannot be too deep, skip writing it out.
        shallow = raw.data.count(b"{") + raw.data.count(b"[") <= MAX_BODY_DEPTH
        custom_id = self._check_line(obj, raw.number, shallow)
        if custom_id is not None:
            body = obj["body"]
            self._lines.add(
                raw.number,
                custom_id,
                raw.offset,
                raw.length,
                estimate_prompt_tokens(raw.length),
                max_output_tokens(body),
                # Embeddings and moderations have no prompt cache to keep hot: no grouping, no key to keep.
                0 if self.endpoint in COALESCED_ENDPOINTS else prefix_key(body),
            )

    def _check_line(self, obj: Any, number: int, shallow: bool) -> str | None:  # noqa: C901 - one flat list of rules
        if not isinstance(obj, dict):
            self._error("invalid_request", f"Each line must be a JSON object, not {json_kind(obj)}.", number)
            return None
        for key in ("custom_id", "method", "url", "body"):
            if key not in obj:
                self._error("missing_required_parameter", f"Missing required parameter: '{key}'.", number, key)
                return None
        for key, kind in (("custom_id", str), ("method", str), ("url", str), ("body", dict)):
            if not isinstance(obj[key], kind):
                expected = "an object" if kind is dict else "a string"
                self._error(
                    "invalid_request",
                    f"Invalid type for '{key}': expected {expected}, but got {json_kind(obj[key])} instead.",
                    number,
                    key,
                )
                return None
        custom_id: str = obj["custom_id"]
        body: dict[str, Any] = obj["body"]
        if not custom_id:
            self._error("invalid_request", "'custom_id' must not be empty.", number, "custom_id")
            return None
        if "\x00" in custom_id:  # PostgreSQL text cannot store it
            self._error("invalid_request", "'custom_id' must not contain NUL characters.", number, "custom_id")
            return None
        if obj["method"] != "POST":
            self._error(
                "invalid_request",
                f"Invalid value for 'method': {obj['method']!r}. Only 'POST' is supported.",
                number,
                "method",
            )
            return None
        if obj["url"] != self.endpoint:
            self._error(
                "invalid_url",
                f"The URL provided for this request ({obj['url']!r}) does not match the batch endpoint "
                f"({self.endpoint!r}).",
                number,
                "url",
            )
            return None
        model = body.get("model")
        if not isinstance(model, str) or not model:
            message = "Model parameter is required." if model is None else "Model parameter must be a non-empty string."
            self._error("invalid_request", message, number, "body.model")
            return None
        if "\x00" in model:  # PostgreSQL text cannot store it
            self._error("invalid_request", "'body.model' must not contain NUL characters.", number, "body.model")
            return None
        problem = check_body(self.endpoint, body)
        if problem is not None:
            self._error(problem.code, problem.message, number, problem.param)
            return None
        if not shallow and not is_reserialisable(body):
            self._error(
                "invalid_request",
                f"The request body is nested more than {MAX_BODY_DEPTH} levels deep: no backend would be sent it.",
                number,
                "body",
            )
            return None
        if custom_id in self._seen_ids:
            self._error(
                "duplicate_custom_id",
                f"The custom_id {custom_id!r} is already used by an earlier line.",
                number,
                "custom_id",
            )
            return None
        self._seen_ids.add(custom_id)
        if not self._check_model(model, number):
            return None
        if self.endpoint == "/v1/embeddings":
            self._embedding_inputs += count_embedding_inputs(body)
            if self._embedding_inputs > self.limits.max_embedding_inputs:
                self._error(
                    "too_many_tasks",
                    f"The batch has more than the maximum of {self.limits.max_embedding_inputs} embedding inputs.",
                    number,
                    "body.input",
                )
                return None
        return custom_id

    def _check_model(self, model: str, number: int) -> bool:
        """One model per batch, and a served one: every line that breaks this gets its own error."""
        if self._model is None:
            self._model, self._model_line = model, number
        elif model != self._model:
            self._error(
                "model_mismatch",
                f"All lines must use the same model: this line uses {model!r}, line {self._model_line} uses "
                f"{self._model!r}.",
                number,
                "body.model",
            )
            return False
        if not self.is_served(model):
            self._error(
                "model_not_found",
                f"The provided model {model!r} is not supported by the Batch API here: GET /v1/models lists the "
                "models this server serves.",
                number,
                "body.model",
            )
            return False
        return True

    def passed(self) -> Sequence[ValidLine]:
        """The lines fed so far that passed, grouped by prefix, whatever the others did: for a caller that refuses
        only the lines that fail (a message batch), where `finish` fails the whole file."""
        return group_by_prefix(self._lines)

    def finish(self) -> ValidationResult:
        if self._requests == 0:
            self._error("empty_file", "The batch input file is empty: it has no request lines.", None)
        return ValidationResult(
            group_by_prefix(self._lines) if self._error_count == 0 else [], self._model, self._errors, self._error_count
        )
