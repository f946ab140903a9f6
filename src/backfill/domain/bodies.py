"""What each batch endpoint requires of a line's `body`, checked before the line is accepted (SPEC §3).

OpenAI rejects these at validation, so a batch never runs a line its endpoint would refuse anyway. The messages
follow OpenAI's own ("Messages parameter is required.", "Invalid type for 'body.temperature': …").
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class BodyProblem:
    code: str
    message: str
    param: str


@dataclass(frozen=True, slots=True)
class Required:
    field: str  # a body field the endpoint cannot do without
    kind: str  # what it must be, for the message
    accepts: Callable[[Any], bool]


@dataclass(frozen=True, slots=True)
class EndpointRules:
    name: str  # as OpenAI (or vLLM) names the API in its messages
    required: tuple[Required, ...]
    # Other sets of fields that may stand in for `required` (vLLM's classify takes `messages` instead of `input`,
    # its score `queries` with `documents`, …): when the first of `required` is absent, the first set that is all
    # there is checked instead, else the first set whose first field is there.
    instead: tuple[tuple[Required, ...], ...] = ()
    typed: tuple[Required, ...] = ()  # fields of this endpoint alone, checked where present and not null

    def fields_for(self, body: dict[str, Any]) -> tuple[Required, ...]:
        if body.get(self.required[0].field) is not None:
            return self.required
        begun = [fields for fields in self.instead if body.get(fields[0].field) is not None]
        complete = [fields for fields in begun if all(body.get(f.field) is not None for f in fields)]
        return (complete or begun or [self.required])[0]


def _is_text_or_list(value: Any) -> bool:
    return isinstance(value, str | list)


def _is_nonempty_list(value: Any) -> bool:
    return isinstance(value, list) and len(value) > 0


def _is_score_input(value: Any) -> bool:
    """vLLM's score inputs: a text, an array (of texts or content parts), or a multimodal object."""
    return isinstance(value, str | list | dict)


def _input(kind: str = "a string or an array", accepts: Callable[[Any], bool] = _is_text_or_list) -> Required:
    return Required("input", kind, accepts)


_MESSAGES = Required("messages", "a non-empty array", _is_nonempty_list)
_SCORE_INPUT = "a string, an array or an object"


def _score_pair(first: str, second: str) -> tuple[Required, ...]:
    return Required(first, _SCORE_INPUT, _is_score_input), Required(second, _SCORE_INPUT, _is_score_input)


_SCORE = EndpointRules(
    "Score",
    _score_pair("text_1", "text_2"),
    (_score_pair("queries", "documents"), _score_pair("queries", "items"), _score_pair("data_1", "data_2")),
)
_RERANK = EndpointRules(
    "Rerank",
    (
        Required("query", "a string or an object", lambda value: isinstance(value, str | dict)),
        Required("documents", _SCORE_INPUT, _is_score_input),
    ),
    typed=(Required("top_n", "an integer", lambda value: type(value) is int),),
)

RULES: dict[str, EndpointRules] = {
    "/v1/chat/completions": EndpointRules("Chat Completions", (_MESSAGES,)),
    "/v1/completions": EndpointRules("Completions", (Required("prompt", "a string or an array", _is_text_or_list),)),
    "/v1/embeddings": EndpointRules("Embeddings", (_input(),)),
    "/v1/responses": EndpointRules("Responses", (_input(),)),
    "/v1/moderations": EndpointRules("Moderations", (_input(),)),
    # vLLM's pooling APIs (docs/embeddings.md): `/classify` as vLLM serves it, score and rerank in both spellings
    # vLLM serves (and its own batch runner accepts).
    "/classify": EndpointRules("Classification", (_input(),), ((_MESSAGES,),)),
    "/v1/score": _SCORE,
    "/score": _SCORE,
    "/v1/rerank": _RERANK,
    "/rerank": _RERANK,
}


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_stop(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and all(isinstance(item, str) for item in value))


# Common fields, checked where present and not null: (what it must be, for the message; the check).
_FIELD_TYPES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "stream": ("a boolean", lambda value: isinstance(value, bool)),
    "max_tokens": ("an integer", _is_integer),
    "max_completion_tokens": ("an integer", _is_integer),
    "max_output_tokens": ("an integer", _is_integer),
    "n": ("an integer", _is_integer),
    "seed": ("an integer", _is_integer),
    "temperature": ("a number", _is_number),
    "top_p": ("a number", _is_number),
    "presence_penalty": ("a number", _is_number),
    "frequency_penalty": ("a number", _is_number),
    "stop": ("a string or an array of strings", _is_stop),
    "user": ("a string", lambda value: isinstance(value, str)),
    "metadata": ("an object", lambda value: isinstance(value, dict)),
    "tools": ("an array", lambda value: isinstance(value, list)),
}

_JSON_NAMES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "an integer"}


def json_kind(value: Any) -> str:
    """How OpenAI's messages name a JSON value's type: 'a string', 'an array', …"""
    if value is None:
        return "null"
    if isinstance(value, float):
        return "a number"
    return next((name for kind, name in _JSON_NAMES.items() if isinstance(value, kind)), "a value")


def check_body(endpoint: str, body: dict[str, Any]) -> BodyProblem | None:
    """The first problem of a line's body for `endpoint` (model checks aside), or None."""
    rules = RULES.get(endpoint)
    if rules is None:
        return None
    for required in rules.fields_for(body):
        value = body.get(required.field)
        if value is None:
            return BodyProblem(
                "invalid_request", f"{required.field.capitalize()} parameter is required.", f"body.{required.field}"
            )
        if not required.accepts(value):
            return BodyProblem(
                "invalid_request",
                f"Invalid 'body.{required.field}': expected {required.kind}, but got {json_kind(value)} instead.",
                f"body.{required.field}",
            )
    if body.get("stream") is True:
        return BodyProblem(
            "streaming_unsupported", f"{rules.name}: Streaming is not supported in the Batch API.", "body.stream"
        )
    # The first wrong field in the checks' order, found by looking up the body's own few keys among the checks.
    checks = _typed_checks(endpoint)
    wrong: tuple[int, str, str] | None = None
    for name, field in body.items():
        if field is None:
            continue
        for rank, expected, accepts in checks.get(name, ()):
            if not accepts(field):
                if wrong is None or rank < wrong[0]:
                    wrong = (rank, name, expected)
                break
    if wrong is None:
        return None
    _, name, expected = wrong
    return BodyProblem(
        "invalid_request",
        f"Invalid type for 'body.{name}': expected {expected}, but got {json_kind(body[name])} instead.",
        f"body.{name}",
    )


_Check = tuple[int, str, Callable[[Any], bool]]  # its rank in the order checks are made, what it must be, the check


@functools.cache
def _typed_checks(endpoint: str) -> dict[str, tuple[_Check, ...]]:
    """Each field's type checks for `endpoint`: its own typed fields first, then the common ones (built once; a
    line's body is checked in the validator's inner loop)."""
    ordered = [
        *((t.field, t.kind, t.accepts) for t in RULES[endpoint].typed),
        *((n, *c) for n, c in _FIELD_TYPES.items()),
    ]
    checks: dict[str, list[_Check]] = {}
    for rank, (name, expected, accepts) in enumerate(ordered):
        checks.setdefault(name, []).append((rank, expected, accepts))
    return {name: tuple(found) for name, found in checks.items()}
