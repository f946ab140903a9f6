"""Prefixed, long, random identifiers (never guessable, never sequential)."""

import secrets


def new_id(prefix: str, nbytes: int = 16) -> str:
    """`prefix` + 32 hex chars of cryptographic randomness, e.g. `batch_3f9c…`."""
    return f"{prefix}{secrets.token_hex(nbytes)}"


def file_id() -> str:
    return new_id("file-")


def batch_id() -> str:
    return new_id("batch_")


def message_batch_id() -> str:
    return new_id("msgbatch_")


def gemini_batch_id() -> str:
    return new_id("genbatch_")


def response_id() -> str:
    """A background or flex Responses call: the id of its one-line batch too."""
    return new_id("resp_")


def batch_request_id() -> str:
    return new_id("batch_req_")


def request_id() -> str:
    return new_id("req_")


def owner_id() -> str:
    """Identity of one dispatcher process for lease ownership."""
    return new_id("worker_", 8)
