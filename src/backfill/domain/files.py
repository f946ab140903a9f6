"""Files API objects (SPEC §2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PURPOSES = frozenset({"batch", "user_data", "evals"})
OUTPUT_PURPOSE = "batch_output"
# The input lines backfill writes for a message batch (SPEC §4): nobody uploaded it, so the Files API lists it not.
MESSAGE_BATCH_PURPOSE = "message_batch"
MIN_EXPIRES_AFTER_S = 3600
MAX_EXPIRES_AFTER_S = 2_592_000


@dataclass(frozen=True)
class FileRecord:
    id: str
    tenant_id: str
    filename: str
    purpose: str
    bytes: int
    blob_key: str
    created_at: int
    expires_at: int | None

    def to_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "expires_at": self.expires_at,
            "status_details": None,
        }
