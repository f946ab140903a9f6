"""Compare two runs of the same requests (`backfill diff A B`): lines are matched by what they asked — the
endpoint and the canonical request body — not by custom_id, since eval tools mint fresh custom_ids every run.
Pure: input and result lines in, a `RunDiff` out.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

Json = dict[str, Any]


@dataclass(frozen=True)
class Answer:
    """One line's result: what it answered (None when it failed), its error, its tokens."""

    custom_id: str
    output: Any  # the part of the response body that is the answer (see `answer_of`), or None
    error: str | None
    input_tokens: int = 0
    output_tokens: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class RunDiff:
    matched: int = 0
    same: int = 0
    changed: list[tuple[Answer, Answer]] = field(default_factory=list)
    new_failures: list[tuple[Answer, Answer]] = field(default_factory=list)
    fixed: list[tuple[Answer, Answer]] = field(default_factory=list)
    still_failing: int = 0
    only_in_a: list[str] = field(default_factory=list)  # custom_ids of requests B did not ask
    only_in_b: list[str] = field(default_factory=list)
    tokens_a: tuple[int, int] = (0, 0)  # input, output over the matched lines
    tokens_b: tuple[int, int] = (0, 0)

    def to_json(self) -> Json:
        def pair(a: Answer, b: Answer) -> Json:
            return {
                "custom_id_a": a.custom_id,
                "custom_id_b": b.custom_id,
                "a": a.output if a.ok else {"error": a.error},
                "b": b.output if b.ok else {"error": b.error},
            }

        return {
            "matched": self.matched,
            "same": self.same,
            "changed": [pair(a, b) for a, b in self.changed],
            "new_failures": [pair(a, b) for a, b in self.new_failures],
            "fixed": [pair(a, b) for a, b in self.fixed],
            "still_failing": self.still_failing,
            "only_in_a": self.only_in_a,
            "only_in_b": self.only_in_b,
            "tokens": {
                "a": {"input": self.tokens_a[0], "output": self.tokens_a[1]},
                "b": {"input": self.tokens_b[0], "output": self.tokens_b[1]},
            },
        }


def request_key(input_line: bytes) -> tuple[str, bytes, str]:
    """(what the line asked, canonically: url + body with sorted keys; its custom_id)."""
    line = orjson.loads(input_line.removeprefix(b"\xef\xbb\xbf"))
    asked = orjson.dumps({"url": line.get("url"), "body": line.get("body")}, option=orjson.OPT_SORT_KEYS)
    return str(line.get("url")), asked, str(line["custom_id"])


def answer_of(result_line: bytes) -> Answer:
    """A result line (output or error file) as an `Answer`: for chat, the message (content, tool calls); for
    completions, the text; for embeddings, the vectors; for responses, the output; else the whole body without
    the fields that differ on every run (ids, timestamps, usage)."""
    line = orjson.loads(result_line)
    custom_id = str(line.get("custom_id"))
    response = line.get("response") or {}
    body = response.get("body") if isinstance(response, dict) else None
    status = int(response.get("status_code") or 0) if isinstance(response, dict) else 0
    if not isinstance(body, dict) or not 200 <= status < 300:
        error = line.get("error") or (body.get("error") if isinstance(body, dict) else None) or {}
        message = error.get("message") if isinstance(error, dict) else str(error)
        code = error.get("code") if isinstance(error, dict) else None
        return Answer(custom_id, None, f"{code or status or 'error'}: {message or ''}".strip())
    usage = body.get("usage")
    if not isinstance(usage, dict):
        usage = {}
    tokens_in = int(usage.get("prompt_tokens") or usage.get("input_tokens") or 0)
    tokens_out = int(usage.get("completion_tokens") or usage.get("output_tokens") or 0)
    return Answer(custom_id, _essence(body), None, tokens_in, tokens_out)


_RUN_FIELDS = frozenset({"id", "created", "created_at", "usage", "system_fingerprint", "model", "object"})


def _essence(body: Json) -> Any:
    choices = body.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        first = choices[0]
        if isinstance(first.get("message"), dict):
            return {key: first["message"].get(key) for key in ("content", "tool_calls", "refusal")}
        if "text" in first:
            return first.get("text")
    if isinstance(body.get("data"), list):
        return [item.get("embedding") if isinstance(item, dict) else item for item in body["data"]]
    if "output" in body:
        return body["output"]
    return {key: value for key, value in body.items() if key not in _RUN_FIELDS}


def compare(
    inputs_a: Iterable[bytes], results_a: Iterable[bytes], inputs_b: Iterable[bytes], results_b: Iterable[bytes]
) -> RunDiff:
    """Match B's requests to A's by what they asked (repeats of one request pair up in order) and compare."""
    answers_a = {answer.custom_id: answer for answer in map(answer_of, results_a)}
    answers_b = {answer.custom_id: answer for answer in map(answer_of, results_b)}
    waiting: dict[bytes, deque[str]] = defaultdict(deque)
    for line in inputs_a:
        if line.strip():
            _, asked, custom_id = request_key(line)
            waiting[asked].append(custom_id)
    diff = RunDiff()
    tokens = [0, 0, 0, 0]
    for line in inputs_b:
        if not line.strip():
            continue
        _, asked, custom_b = request_key(line)
        if not waiting[asked]:
            diff.only_in_b.append(custom_b)
            continue
        custom_a = waiting[asked].popleft()
        a, b = answers_a.get(custom_a), answers_b.get(custom_b)
        if a is None or b is None:  # a line with no result (its batch has not ended): not compared
            continue
        diff.matched += 1
        tokens = [tokens[0] + a.input_tokens, tokens[1] + a.output_tokens, tokens[2] + b.input_tokens,
                  tokens[3] + b.output_tokens]  # fmt: skip
        if a.ok and b.ok:
            if a.output == b.output:
                diff.same += 1
            else:
                diff.changed.append((a, b))
        elif a.ok:
            diff.new_failures.append((a, b))
        elif b.ok:
            diff.fixed.append((a, b))
        else:
            diff.still_failing += 1
    diff.only_in_a = [custom_id for queue in waiting.values() for custom_id in queue]
    diff.tokens_a, diff.tokens_b = (tokens[0], tokens[1]), (tokens[2], tokens[3])
    return diff
