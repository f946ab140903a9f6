"""Output and error files on the user's disk (`backfill run`, `backfill results`): names; whole-or-nothing writes."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


def default_errors_path(output: Path) -> Path:
    """`results.jsonl` -> `results.errors.jsonl`; a name without `.jsonl` gets `.errors.jsonl` appended."""
    return output.with_name(f"{output.name.removesuffix('.jsonl')}.errors.jsonl")


def write_atomically(dest: Path, chunks: Iterable[bytes]) -> int:
    """Write `chunks` to `dest`, which is replaced only once everything is on disk; the number of bytes."""
    tmp = dest.with_name(f".{dest.name}.part")
    written = 0
    try:
        with open(tmp, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
                written += len(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return written
