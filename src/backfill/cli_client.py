"""Client commands against a running server: submit, status, wait, results, cancel, list.

status, wait, results, cancel and list know both kinds of batch: batches (`batch_…`, /v1/batches) and Anthropic
message batches (`msgbatch_…`, /v1/messages/batches).

The server is `--base-url` (else `BACKFILL_BASE_URL`, else http://127.0.0.1:8080), the key `--api-key` (else
`BACKFILL_API_KEY`; none is needed in open mode). Exit codes are `progress.ExitCode`'s.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import click
import orjson
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from backfill.client import BackfillClient, RemoteBatch, is_gemini_batch, is_message_batch
from backfill.config import load_client_settings
from backfill.domain.batches import ENDPOINTS, BatchStatus
from backfill.domain.run_diff import compare
from backfill.errors import BackfillError, ServerRejected
from backfill.progress import ExitCode, ProgressDisplay, Snapshot, count_lines, format_duration, make_console
from backfill.result_files import custom_ids, default_errors_path, merge_results, write_atomically

DEFAULT_ENDPOINT = "/v1/chat/completions"
_POLL_S = 0.5
_PIPE_WIDTH = 200
_TIME_LABELS = {
    "created_at": "created",
    "in_progress_at": "in progress",
    "finalizing_at": "finalizing",
    "completed_at": "completed",
    "failed_at": "failed",
    "expired_at": "expired",
    "cancelling_at": "cancelling",
    "cancelled_at": "cancelled",
    "expires_at": "window ends",
}


class CommandFailed(click.ClickException):
    """An error shown as one line, exiting with ExitCode.ERROR."""

    exit_code = ExitCode.ERROR


def client_options(func: Callable[..., Any]) -> Callable[..., Any]:
    func = click.option("--api-key", help="API key (default: $BACKFILL_API_KEY; none needed in open mode).")(func)
    return click.option(
        "--base-url", help="The backfill server (default: $BACKFILL_BASE_URL, else http://127.0.0.1:8080)."
    )(func)


@contextlib.contextmanager
def _connected(base_url: str | None, api_key: str | None) -> Iterator[BackfillClient]:
    """A client on the configured server; any backfill error inside becomes a one-line message and exit 3."""
    try:
        settings = load_client_settings(base_url=base_url, api_key=api_key)
        with BackfillClient(settings.base_url, settings.api_key) as client:
            yield client
    except BackfillError as exc:
        raise CommandFailed(exc.message) from None
    except OSError as exc:  # writing the results
        raise CommandFailed(str(exc)) from None


def _stderr() -> Console:
    return make_console()


def _stdout() -> Console:
    console = make_console(stderr=False)
    if not console.is_terminal:
        console.width = _PIPE_WIDTH  # piped into a file or grep: whole rows, nothing cut to 80 columns
    return console


def snapshot_of(batch: RemoteBatch) -> Snapshot:
    return Snapshot(
        batch.status,
        batch.total,
        batch.completed,
        batch.failed,
        batch.output_tokens,
        batch.expired,
        batch.cancelled,
        batch.schedule,
    )


def _counts(batch: RemoteBatch) -> str:
    """`3 succeeded, 1 failed, 6 cancelled`"""
    rest = count_lines(batch.errored, batch.expired, batch.cancelled).replace(" · ", ", ")
    return f"{batch.completed} succeeded, {rest}"


def _follow(client: BackfillClient, batch_id: str) -> RemoteBatch:
    """Poll with a live progress bar until the batch is terminal."""
    try:
        with ProgressDisplay(_stderr()) as display:
            while True:
                batch = client.get_batch(batch_id)
                display.update(snapshot_of(batch))
                if batch.status.is_terminal:
                    return batch
                time.sleep(_POLL_S)
    except KeyboardInterrupt:
        _stderr().print(f"stopped following {batch_id}; it goes on. Follow it again: backfill wait {batch_id}")
        raise click.exceptions.Exit(ExitCode.INTERRUPTED) from None


def _finish(batch: RemoteBatch) -> None:
    """Say how it ended and where the results are; exit with the batch's exit code."""
    console = _stderr()
    console.print(f"{batch.id} {batch.status.value}: {_counts(batch)}")
    if batch.status is BatchStatus.FAILED:
        _print_errors(console, batch.errors)
    elif batch.results_url or batch.output_file_id or batch.error_file_id:
        console.print(f"results: backfill results {batch.id} -o {batch.id}.jsonl")
        for label, file_id in (("output file", batch.output_file_id), ("error file", batch.error_file_id)):
            if file_id:
                console.print(f"  {label}: {file_id}")
    click.get_current_context().exit(snapshot_of(batch).exit_code)


def _print_errors(console: Console, errors: Sequence[dict[str, Any]]) -> None:
    for error in errors:
        where = f"line {error['line']}: " if error.get("line") is not None else ""
        code = f" ({error['code']})" if error.get("code") else ""
        console.print(f"  {where}{error.get('message', '')}{code}", markup=False)


def _parse_metadata(pairs: Sequence[str]) -> dict[str, str]:
    metadata: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--metadata")
        metadata[key] = value
    return metadata


def _endpoint_of(file: Path) -> str:
    """The endpoint every line of a batch input file names in its `url`. A file that is a JSON array, or whose
    lines name several endpoints, is refused here with what to do; lines that are not JSON are left for the
    server's validation, which reports them by line number."""
    urls: set[str] = set()
    with file.open("rb") as lines:
        for number, line in enumerate(lines, start=1):
            text = line.strip().removeprefix(b"\xef\xbb\xbf") if number == 1 else line.strip()
            if number == 1 and text.startswith(b"["):
                raise CommandFailed(
                    f"{file} is a JSON array, not JSONL: write one request object per line, "
                    '{"custom_id": ..., "method": "POST", "url": ..., "body": {...}} (see examples/)'
                )
            if not text:
                continue
            with contextlib.suppress(orjson.JSONDecodeError, AttributeError):
                url = orjson.loads(text).get("url")
                if isinstance(url, str):
                    urls.add(url)
    if len(urls) > 1:
        raise CommandFailed(
            f"the lines of {file} name several endpoints ({', '.join(sorted(urls))}); a batch runs one: "
            "split the file by endpoint"
        )
    return urls.pop() if urls else DEFAULT_ENDPOINT


@click.command(
    epilog="""\b
Examples:
  backfill submit requests.jsonl --wait
  backfill submit embeddings.jsonl --metadata job=nightly --window 24h

\b
A line of requests.jsonl:
  {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions",
   "body": {"model": "MODEL", "messages": [{"role": "user", "content": "Hi"}]}}"""
)
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--endpoint",
    type=click.Choice(sorted(ENDPOINTS)),
    help="The endpoint the lines go to (default: the one every line's url names).",
)
@click.option("--window", default="24h", show_default=True, help="Completion window the server accepts.")
@click.option("--metadata", multiple=True, metavar="KEY=VALUE", help="Batch metadata; repeat for more pairs.")
@click.option("--wait", is_flag=True, help="Follow the batch with a progress bar until it ends.")
@client_options
def submit(
    file: Path,
    endpoint: str | None,
    window: str,
    metadata: tuple[str, ...],
    wait: bool,
    base_url: str | None,
    api_key: str | None,
) -> None:
    """Upload FILE (JSONL) and create a batch; prints its id.

    With --wait, follows it with a progress bar and exits like `backfill wait`.
    """
    pairs = _parse_metadata(metadata)
    endpoint = endpoint or _endpoint_of(file)
    with _connected(base_url, api_key) as client:
        batch = client.create_batch(client.upload(file), endpoint, window, pairs or None)
        click.echo(batch.id)
        if not wait:
            _stderr().print(f"follow it with: backfill wait {batch.id}")
            return
        batch = _follow(client, batch.id)
    _finish(batch)


@click.command(
    epilog="\b\nExamples:\n  backfill wait batch_abc123 && backfill results batch_abc123 -o out.jsonl\n"
    "  backfill wait msgbatch_abc123"
)
@click.argument("batch_id")
@client_options
def wait(batch_id: str, base_url: str | None, api_key: str | None) -> None:
    """Follow a batch or a message batch with a progress bar until it ends.

    \b
    Exit codes:
      0  completed, every line succeeded
      1  completed with failed lines, or expired, or cancelled
      2  failed: the input file was invalid
      3  error (server unreachable, unknown batch, …)
    """
    with _connected(base_url, api_key) as client:
        batch = _follow(client, batch_id)
    _finish(batch)


@click.command(
    epilog="\b\nExamples:\n  backfill status batch_abc123\n  backfill status batch_abc123 --json | jq .usage\n"
    "  backfill status msgbatch_abc123"
)
@click.argument("batch_id")
@click.option("--json", "as_json", is_flag=True, help="Print the batch object as the API returns it.")
@client_options
def status(batch_id: str, as_json: bool, base_url: str | None, api_key: str | None) -> None:
    """Show a batch or a message batch: status, counts, usage, times, files and errors."""
    with _connected(base_url, api_key) as client:
        batch = client.get_batch(batch_id)
    if as_json:
        click.echo(orjson.dumps(batch.raw, option=orjson.OPT_INDENT_2).decode())
        return
    _stdout().print(_summary(batch, time.time()))


def _kind(batch: RemoteBatch) -> tuple[str, str]:
    model = f" (model {batch.model})" if batch.model else ""
    if batch.is_message_batch:
        return "kind", f"message batch ({batch.endpoint}), window {batch.completion_window}"
    if batch.is_gemini_batch:
        return "kind", f"Gemini batch ({batch.endpoint}){model}, window {batch.completion_window}"
    return "endpoint", f"{batch.endpoint}{model}, window {batch.completion_window}"


def _summary(batch: RemoteBatch, now: float) -> Group:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    table.add_row(*_kind(batch))
    lines = count_lines(batch.errored, batch.expired, batch.cancelled)
    table.add_row("requests", f"{batch.total} total · {batch.completed} succeeded · {lines}")
    if not (batch.is_message_batch or batch.is_gemini_batch):  # their objects carry no usage
        table.add_row("usage", f"{batch.input_tokens:,} input tokens · {batch.output_tokens:,} output tokens")
    for name, label in _TIME_LABELS.items():
        if name in batch.times:
            table.add_row(label, _when(batch.times[name], now))
    if batch.status is BatchStatus.IN_PROGRESS and batch.schedule == "loading_model":
        table.add_row("outlook", batch.waiting or "loading model")
    elif batch.status is BatchStatus.IN_PROGRESS and batch.waiting is not None:
        table.add_row("outlook", f"waiting: {batch.waiting}")
    elif batch.status is BatchStatus.IN_PROGRESS and batch.schedule is not None:
        table.add_row("outlook", _outlook(batch, now))
    for label, file_id in (
        ("input file", batch.input_file_id),
        ("output file", batch.output_file_id),
        ("error file", batch.error_file_id),
        ("results", batch.results_url),
    ):
        if file_id:
            table.add_row(label, file_id)
    if batch.metadata:
        table.add_row("metadata", ", ".join(f"{key}={value}" for key, value in batch.metadata.items()))
    for index, error in enumerate(batch.errors):
        where = f"line {error['line']}: " if error.get("line") is not None else ""
        table.add_row("errors" if index == 0 else "", f"{where}{error.get('message', '')} ({error.get('code')})")
    return Group(Text.assemble((batch.id, "bold"), "  ", batch.status.value), table)


_SCHEDULES = {
    "on_track": "on track",
    "promoted": "promoted: running ahead of other work to make its window",
    "at_risk": "at risk: expected to miss its window",
    "harvesting": "harvesting: running in the capacity interactive traffic leaves",
    "throttled": "throttled: interactive traffic needs the servers now",
    "harvesting_blind": "harvesting blind: an engine's metrics cannot be read, so batch keeps to half of it",
    "off_peak": "held to its off-peak share at this hour",
    "waiting": "waiting: no backend for its model is up",
    "loading_model": "loading model",
}


def _outlook(batch: RemoteBatch, now: float) -> str:
    schedule = _SCHEDULES.get(batch.schedule or "", batch.schedule or "")
    if batch.estimated_completion_at is None:
        return f"{schedule} (no estimate yet)"
    return f"{schedule}, estimated to finish {_when(batch.estimated_completion_at, now)}"


def _when(at: int, now: float) -> str:
    stamp = datetime.fromtimestamp(at).astimezone().strftime("%Y-%m-%d %H:%M:%S %z")
    delta = now - at
    return f"{stamp} ({format_duration(delta)} ago)" if delta >= 0 else f"{stamp} (in {format_duration(-delta)})"


@click.command(
    epilog="\b\nExamples:\n  backfill results batch_abc123 -o out.jsonl\n"
    "  backfill results batch_abc123 -o out.jsonl --merge-retries\n"
    "  backfill results msgbatch_abc123 -o results.jsonl\n"
    "  backfill results genbatch_abc123 -o responses.jsonl"
)
@click.argument("batch_id")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Output file.")
@click.option(
    "--errors",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Error file (default: OUTPUT with .errors.jsonl in place of .jsonl). Not for a message batch: its "
    "results are one file.",
)
@click.option(
    "--merge-retries",
    is_flag=True,
    help="Merge in the results of the batch's retries (backfill retry): every line once, in input order, "
    "each with the result of the newest batch that ran it.",
)
@click.option(
    "--follow",
    is_flag=True,
    help="Start now, while the batch runs: append each output line to OUTPUT as soon as it is settled (in input "
    "order), until the batch ends; then write the error file.",
)
@client_options
def results(
    batch_id: str,
    output: Path,
    errors: Path | None,
    merge_retries: bool,
    follow: bool,
    base_url: str | None,
    api_key: str | None,
) -> None:
    """Download a finished batch's output and error files, or a message batch's or Gemini batch's results.

    Both files are written, empty when no line belongs there. A message batch (msgbatch_…) or a Gemini batch
    (genbatch_…) has one results file, every request's result in request order, written to OUTPUT.
    """
    if follow and (merge_retries or is_message_batch(batch_id) or is_gemini_batch(batch_id)):
        raise click.UsageError(
            "--follow reads one OpenAI batch's output as it runs: not with --merge-retries, a message batch or a "
            "Gemini batch"
        )
    if is_gemini_batch(batch_id) or is_message_batch(batch_id):
        kind = "Gemini batch" if is_gemini_batch(batch_id) else "message batch"
        if errors is not None or merge_retries:
            raise click.UsageError(f"a {kind}'s results are one file: --errors and --merge-retries do not apply")
        with _connected(base_url, api_key) as client:
            _one_file_results(client, batch_id, output)
        return
    errors = errors or default_errors_path(output)
    with _connected(base_url, api_key) as client:
        if merge_retries:
            _merged_results(client, batch_id, output, errors)
            return
        batch = _followed(client, batch_id, output) if follow else client.get_batch(batch_id)
        if batch.status is BatchStatus.FAILED:
            _stderr().print(f"{batch.id} failed validation; it has no results:")
            _print_errors(_stderr(), batch.errors)
            click.get_current_context().exit(ExitCode.INVALID_INPUT)
        if not batch.status.is_terminal:
            raise CommandFailed(f"{batch.id} is still {batch.status.value}; wait for it: backfill wait {batch.id}")
        for file_id, dest in ((batch.output_file_id, output), (batch.error_file_id, errors)):
            if follow and dest == output:
                continue  # already written, line by line
            if file_id:
                client.download(file_id, dest)
            else:
                write_atomically(dest, [])
    _stderr().print(f"{batch.completed} lines in {output}, {batch.failed} in {errors}")


FOLLOW_POLL_S = 2.0


def _followed(client: BackfillClient, batch_id: str, output: Path) -> RemoteBatch:
    """Append the batch's output lines to `output` as they settle, until it ends; the ended batch."""
    offset = 0
    with output.open("wb") as out:
        while True:
            batch = client.get_batch(batch_id)
            file_id = batch.output_file_id or batch.partial_output_file_id
            if file_id is None:  # ended with no output (nothing succeeded, or it failed validation)
                return batch
            data, offset, more = client.read_from(file_id, offset)
            out.write(data)
            out.flush()
            if data:
                _stderr().print(f"{offset} output lines in {output} ({batch.status.value})")
            if not more:
                return client.get_batch(batch_id)
            time.sleep(FOLLOW_POLL_S)


def _one_file_results(client: BackfillClient, batch_id: str, output: Path) -> None:
    """A message batch's or a Gemini batch's results: one file, every request's result in request order."""
    batch = client.get_batch(batch_id)
    if not batch.status.is_terminal:
        raise CommandFailed(f"{batch.id} is still {batch.status.value}; wait for it: backfill wait {batch.id}")
    if batch.is_gemini_batch:
        client.download_gemini_results(batch, output)
    else:
        client.download_results(batch.id, output)
    _stderr().print(f"{batch.total} results in {output}: {_counts(batch)}")


def _merged_results(client: BackfillClient, batch_id: str, output: Path, errors: Path) -> None:
    batch = client.get_batch(batch_id)
    family = [batch, *client.retries_of(batch)]
    for member in family:
        if not member.status.is_terminal:
            raise CommandFailed(f"{member.id} is still {member.status.value}; wait for it: backfill wait {member.id}")
    order = custom_ids(client.read_lines(batch.input_file_id))
    layers = [
        [
            line
            for file_id in (member.output_file_id, member.error_file_id)
            if file_id
            for line in client.read_lines(file_id)
        ]
        for member in family
    ]
    good, bad = merge_results(order, layers)
    write_atomically(output, good)
    write_atomically(errors, bad)
    retried = ", ".join(member.id for member in family[1:]) or "none"
    _stderr().print(f"{len(good)} lines in {output}, {len(bad)} in {errors} (retries merged: {retried})")


@click.command(epilog="\b\nExample:\n  backfill retry batch_abc123 --only failed --wait")
@click.argument("batch_id")
@click.option(
    "--only",
    default="failed,expired,cancelled",
    show_default=True,
    help="Which lines to run again, by how they ended: any of failed, expired, cancelled (comma-separated).",
)
@click.option("--wait", is_flag=True, help="Follow the new batch with a progress bar until it ends.")
@client_options
def retry(batch_id: str, only: str, wait: bool, base_url: str | None, api_key: str | None) -> None:
    """Run a finished batch's failed, expired or cancelled lines again, as a new batch; prints its id.

    The new batch has the same custom_ids and bodies, and `backfill_retry_of` in its metadata. Merge the results
    afterwards: backfill results BATCH -o OUT.jsonl --merge-retries
    """
    kinds = [kind.strip() for kind in only.split(",") if kind.strip()]
    unknown = sorted(set(kinds) - {"failed", "expired", "cancelled"})
    if not kinds or unknown:
        raise click.BadParameter(f"expected some of failed, expired, cancelled; got {only!r}", param_hint="--only")
    with _connected(base_url, api_key) as client:
        batch = client.retry_batch(batch_id, kinds)
        click.echo(batch.id)
        if not wait:
            _stderr().print(f"follow it with: backfill wait {batch.id}")
            return
        batch = _follow(client, batch.id)
    _finish(batch)


@click.command(epilog="\b\nExamples:\n  backfill cancel batch_abc123\n  backfill cancel msgbatch_abc123")
@click.argument("batch_id")
@client_options
def cancel(batch_id: str, base_url: str | None, api_key: str | None) -> None:
    """Cancel a batch or a message batch.

    Finished lines stay in its output file (a message batch: its results); the rest end as batch_cancelled
    (`canceled`). A batch that has already ended is
    left as it is: its state is printed and the command succeeds.
    """
    with _connected(base_url, api_key) as client:
        try:
            batch = client.cancel_batch(batch_id)
        except ServerRejected as exc:
            if exc.status_code != 409:
                raise
            batch = client.get_batch(batch_id)
            if not batch.status.is_terminal:
                raise
            click.echo(f"{batch.id} {batch.status.value}")
            _stderr().print(f"{batch.id} had already ended ({batch.status.value}); nothing to cancel")
            return
    click.echo(f"{batch.id} {batch.status.value}")


@click.command(name="list", epilog="\b\nExamples:\n  backfill list --limit 50\n  backfill list --json | jq '.[].id'")
@click.option("--limit", type=click.IntRange(1, 10_000), default=20, show_default=True)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the batch and message batch objects as the API returns them (an array, newest first).",
)
@client_options
def list_batches(limit: int, as_json: bool, base_url: str | None, api_key: str | None) -> None:
    """List the newest batches and message batches, newest first."""
    with _connected(base_url, api_key) as client:
        batches = client.list_all(limit)
    if as_json:
        click.echo(orjson.dumps([batch.raw for batch in batches], option=orjson.OPT_INDENT_2).decode())
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    for name in ("id", "kind", "status", "endpoint", "model", "done", "failed", "created"):
        table.add_column(name, no_wrap=name not in ("endpoint", "model", "failed"), overflow="fold")
    for batch in batches:
        created = batch.times.get("created_at")
        table.add_row(
            batch.id,
            "message" if batch.is_message_batch else "gemini" if batch.is_gemini_batch else "batch",
            batch.status.value,
            batch.endpoint,
            batch.model or "",
            f"{batch.completed + batch.failed}/{batch.total}",
            count_lines(batch.errored, batch.expired, batch.cancelled).replace(" failed", "").replace(" · ", ", "),
            datetime.fromtimestamp(created).strftime("%Y-%m-%d %H:%M") if created else "",
        )
    _stdout().print(table)


@click.command(
    "diff",
    epilog="\b\nExamples:\n  backfill diff batch_before batch_after\n  backfill diff batch_before batch_after --json",
)
@click.argument("batch_a")
@click.argument("batch_b")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON (every changed line).")
@click.option("--show", default=10, show_default=True, help="How many changed lines to print (text output).")
@client_options
def diff(batch_a: str, batch_b: str, as_json: bool, show: int, base_url: str | None, api_key: str | None) -> None:
    """Compare two finished batches of the same requests: changed answers, new failures, tokens, duration.

    Lines are matched by what they asked (endpoint and request body), not by custom_id: eval tools mint new
    custom_ids every run. Answers are compared on what the model said (a chat message, a completion's text,
    embedding vectors), not on ids or timestamps.
    """
    with _connected(base_url, api_key) as client:
        a, b = client.get_batch(batch_a), client.get_batch(batch_b)
        for batch in (a, b):
            if batch.is_message_batch or batch.is_gemini_batch:
                raise click.UsageError(f"{batch.id}: diff compares OpenAI batches (their input and output files)")
            if not batch.status.is_terminal:
                raise CommandFailed(f"{batch.id} is still {batch.status.value}; wait for it: backfill wait {batch.id}")
        result = compare(*_run_files(client, a), *_run_files(client, b))
    durations = [_duration(batch) for batch in (a, b)]
    if as_json:
        payload = {"a": a.id, "b": b.id, **result.to_json(), "duration_s": {"a": durations[0], "b": durations[1]}}
        click.echo(orjson.dumps(payload, option=orjson.OPT_INDENT_2).decode())
        return
    out = _stdout()
    out.print(f"{a.id} ({a.status.value}, {a.total} lines) vs {b.id} ({b.status.value}, {b.total} lines)")
    out.print(
        f"matched {result.matched} requests: {result.same} same, {len(result.changed)} changed, "
        f"{len(result.new_failures)} new failures, {len(result.fixed)} fixed, {result.still_failing} still failing"
    )
    if result.only_in_a or result.only_in_b:
        out.print(f"only in {a.id}: {len(result.only_in_a)} · only in {b.id}: {len(result.only_in_b)}")
    for name, before, after in (
        ("input tokens", result.tokens_a[0], result.tokens_b[0]),
        ("output tokens", result.tokens_a[1], result.tokens_b[1]),
    ):
        out.print(f"{name} (matched lines): {before:,} → {after:,}{_change(before, after)}")
    if None not in durations:
        out.print(f"duration: {format_duration(durations[0] or 0)} → {format_duration(durations[1] or 0)}")
    for title, pairs in (("changed", result.changed), ("new failures", result.new_failures)):
        for first, second in pairs[:show]:
            was = first.output if first.ok else first.error
            now = second.output if second.ok else second.error
            out.print(f"{title}: {second.custom_id}: {_short(was)} → {_short(now)}", markup=False)


def _run_files(client: BackfillClient, batch: RemoteBatch) -> tuple[list[bytes], list[bytes]]:
    results = [line for file_id in (batch.output_file_id, batch.error_file_id) if file_id
               for line in client.read_lines(file_id)]  # fmt: skip
    return client.read_lines(batch.input_file_id), results


def _duration(batch: RemoteBatch) -> int | None:
    started = batch.times.get("in_progress_at") or batch.times.get("created_at")
    ended = next((batch.times[f"{s}_at"] for s in ("completed", "expired", "cancelled", "failed")
                  if f"{s}_at" in batch.times), None)  # fmt: skip
    return ended - started if started is not None and ended is not None else None


def _change(before: int, after: int) -> str:
    return f" ({(after - before) / before:+.1%})" if before else ""


def _short(value: object, width: int = 60) -> str:
    text = value if isinstance(value, str) else orjson.dumps(value).decode()
    return text if len(text) <= width else text[: width - 1] + "…"


COMMANDS = (submit, status, wait, results, retry, cancel, list_batches, diff)
