"""`backfill run`: one batch file through the same validation, dispatcher and finalizer, in this process.

Its state lives in a directory beside the output, `OUT.jsonl.backfill/`: `run.json` (which input file, which
batch), the SQLite database, the blobs (a copy of the input; the output and error files once written) and a lock
file. Killed at any moment (even `kill -9`) and started again with the same arguments, a run finds its batch
there and goes on: lines whose result was committed are never sent again. The directory is removed once OUT and
ERR are written, unless asked to keep it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import orjson

from backfill import ids
from backfill.config import Settings
from backfill.domain.batches import Batch, BatchStatus, LineError
from backfill.domain.files import FileRecord
from backfill.domain.tenants import DEFAULT_TENANT
from backfill.errors import RunStateError
from backfill.ports import BlobWriter
from backfill.progress import Snapshot
from backfill.result_files import write_atomically
from backfill.services import Services
from backfill.usecases.batches import CreateBatch, create_batch

STATE_SUFFIX = ".backfill"
_MANIFEST = "run.json"
_LOCK = "lock"
_POLL_S = 0.25
_CHUNK_BYTES = 1 << 20


def state_dir_for(output: Path) -> Path:
    """`out/results.jsonl` -> `out/results.jsonl.backfill`."""
    return output.with_name(output.name + STATE_SUFFIX)


@dataclass(frozen=True)
class RunRequest:
    input_path: Path
    output_path: Path
    errors_path: Path
    endpoint: str
    window: str
    keep_state: bool = False


@dataclass(frozen=True)
class RunResult:
    batch_id: str
    snapshot: Snapshot
    errors: list[LineError]  # why validation failed (status `failed`), line-numbered
    resumed: bool
    state_dir: Path | None  # None once removed


@dataclass(frozen=True)
class _Manifest:
    """What a state directory is a run of."""

    batch_id: str
    input_bytes: int
    input_sha256: str
    endpoint: str
    window: str


async def run_offline(
    settings: Settings,
    request: RunRequest,
    on_progress: Callable[[Snapshot], None],
    on_note: Callable[[str], None],
) -> RunResult:
    """Run (or resume) the batch of `request.input_path` to its end and write OUT and ERR."""
    state = state_dir_for(request.output_path)
    state.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(state):
        manifest = _read_manifest(state)
        if manifest is None:
            _clear(state)  # whatever a start that never got as far as its manifest left behind
        else:
            await asyncio.to_thread(_check_same_run, manifest, request, state)
        services = await Services.open(_offline_settings(settings, state, request.window))
        try:
            if manifest is None:
                batch_id = await _start(services, request, state)
            else:
                batch_id = manifest.batch_id
                await services.store.release_all_leases()  # a killed run's: nobody else uses this directory
                on_note(_resuming(batch_id, state, await services.store.get_batch(None, batch_id)))
            batch = await _drive(services, batch_id, on_progress)
            if batch.status is not BatchStatus.FAILED:
                await _write_results(services, batch, request)
        except asyncio.CancelledError:  # Ctrl-C: said at once, before lines in flight are handed back
            on_note("stopping: lines in flight are handed back; run the same command again to continue")
            raise
        finally:
            await services.close()
        # A batch that failed validation is of no use again: fixing the input changes its fingerprint.
        kept = request.keep_state and batch.status is not BatchStatus.FAILED
        if not kept:
            shutil.rmtree(state)
    return RunResult(batch.id, Snapshot.of(batch), batch.errors or [], manifest is not None, state if kept else None)


def _resuming(batch_id: str, state: Path, batch: Batch | None) -> str:
    done = f": {batch.completed + batch.failed} of {batch.total} lines already done" if batch and batch.total else ""
    return f"resuming {batch_id} from {state}{done}"


def _offline_settings(settings: Settings, state: Path, window: str) -> Settings:
    """The configured settings, but the database and blobs in the state directory, and any window accepted."""
    windows = settings.completion_windows
    return settings.model_copy(
        update={
            "data_dir": state.resolve(),
            "database_url": None,
            "blob_store": "local",
            "completion_windows": windows if window in windows else [*windows, window],
            # Stopped early only by Ctrl-C: lines in flight are handed back at once (the run resumes them).
            "shutdown_grace_s": 0.0,
        }
    )


async def _start(services: Services, request: RunRequest, state: Path) -> str:
    """Store the input once, create its batch, and only then write the manifest that makes the run resumable."""
    now = services.now()
    tenant_id = await services.store.ensure_tenant(DEFAULT_TENANT, now)
    file_id = ids.file_id()
    key = f"files/{file_id}"
    writer = services.blobs.open_writer(key)
    try:
        size, digest = await asyncio.to_thread(_copy_hashing, request.input_path, writer)
    except BaseException:
        await writer.abort()
        raise
    await writer.commit()
    record = FileRecord(file_id, tenant_id, request.input_path.name, "batch", size, key, now, None)
    await services.store.add_file(record)
    create = CreateBatch(input_file_id=file_id, endpoint=request.endpoint, completion_window=request.window)
    batch = await create_batch(services, tenant_id, create)
    _write_manifest(state, _Manifest(batch.id, size, digest, request.endpoint, request.window))
    return batch.id


async def _drive(services: Services, batch_id: str, on_progress: Callable[[Snapshot], None]) -> Batch:
    """Run the dispatcher until the batch is terminal; on the way out it hands back what it has not finished."""
    stop = asyncio.Event()
    assert services.dispatcher is not None  # opened with one (the default)
    dispatcher = asyncio.create_task(services.dispatcher.run(stop))
    services.dispatcher.wake()
    try:
        while True:
            batch = await services.store.get_batch(None, batch_id)
            if batch is None:
                raise RunStateError(f"the state directory's database has no batch {batch_id}")
            on_progress(Snapshot.of(batch))
            if batch.status.is_terminal:
                return batch
            if dispatcher.done():
                dispatcher.result()  # raises what stopped it
                raise RunStateError("the dispatcher stopped before the batch ended")
            await asyncio.sleep(_POLL_S)
    finally:
        stop.set()
        await dispatcher


async def _write_results(services: Services, batch: Batch, request: RunRequest) -> None:
    """OUT and ERR, each replaced whole; a file with no lines is written empty."""
    for file_id, dest in ((batch.output_file_id, request.output_path), (batch.error_file_id, request.errors_path)):
        record = await services.store.get_file(None, file_id) if file_id else None
        chunks = services.blobs.iter_chunks(record.blob_key) if record else iter(())
        await asyncio.to_thread(write_atomically, dest, chunks)


def _copy_hashing(path: Path, writer: BlobWriter) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK_BYTES):
            writer.write(chunk)
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _check_same_run(manifest: _Manifest, request: RunRequest, state: Path) -> None:
    """Refuse to resume with another input file, endpoint or window than the run in `state` started with."""
    start_over = f"Re-run with the original arguments, or remove {state} to start over."
    size = request.input_path.stat().st_size
    if size != manifest.input_bytes or _fingerprint(request.input_path) != manifest.input_sha256:
        raise RunStateError(
            f"{request.input_path} has changed since this run started ({state} holds a run of a "
            f"{manifest.input_bytes}-byte file with sha256 {manifest.input_sha256[:16]}…). {start_over}"
        )
    if (request.endpoint, request.window) != (manifest.endpoint, manifest.window):
        raise RunStateError(
            f"{state} holds a run with --endpoint {manifest.endpoint} --window {manifest.window}. {start_over}"
        )


def _read_manifest(state: Path) -> _Manifest | None:
    try:
        return _Manifest(**orjson.loads((state / _MANIFEST).read_bytes()))
    except FileNotFoundError:
        return None
    except (orjson.JSONDecodeError, TypeError) as exc:
        raise RunStateError(f"{state / _MANIFEST} is damaged ({exc}); remove {state} to start over") from None


def _write_manifest(state: Path, manifest: _Manifest) -> None:
    tmp = state / f"{_MANIFEST}.part"
    with open(tmp, "wb") as fh:
        fh.write(orjson.dumps(asdict(manifest), option=orjson.OPT_INDENT_2))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, state / _MANIFEST)
    directory = os.open(state, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a power cut
    finally:
        os.close(directory)


def _clear(state: Path) -> None:
    for entry in state.iterdir():
        if entry.name == _LOCK:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


@contextlib.contextmanager
def _exclusive_lock(state: Path) -> Iterator[None]:
    """Held for the whole run: two runs sharing a state directory would each hand back the other's leases."""
    fd = os.open(state / _LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunStateError(f"another `backfill run` is using {state}; wait for it to end or stop it") from None
        yield
    finally:
        os.close(fd)
