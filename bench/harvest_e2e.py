"""Harvesting on the real path, in wall-clock time: real `backfill serve` in front of a real `backfill sim serve`,
interactive traffic replayed from the Azure conversation trace while a batch backlog waits, every strategy in one
run — and beside each row, the same strategy on the same trace slice in virtual time (bench/harvest.py's
simulator), so a disagreement between the two shows where the simulator is wrong.

What runs, per row (each row starts both servers afresh, so no row inherits another's engine or queue):

- the engine: `backfill sim serve`, its default profile (an H100 serving an 8B model, vLLM-like, real time),
  in priority mode for the rows that use engine priority;
- backfill: `backfill serve --role all` (SQLite), one `[[backends]]` entry for the engine, flavour vllm, as a
  user would configure it: a fixed `max_concurrency` (no limit: 4 x the engine's sequences; or a cap), or
  `harvest = true` with `max_concurrency` half the engine's sequences (128 of 256, as in bench/harvest.py);
  `priority` on where the engine runs in priority mode;
- the batch: a backlog of lines drawn from the trace's own (prompt, output) pairs, uploaded and created through
  the Batch API at the start of the row;
- interactive traffic: the trace's requests at their (compressed) arrival times, streamed, open loop, through
  backfill's proxy (`/v1/chat/completions` on backfill) or, in the second set of rows, straight to the engine
  (the controller then reads only the engine's /metrics).

First the engine's capacity is measured with the trace's request mix at a concurrency above its `max_num_seqs`
(prompt + output tokens/s from its counters), and the trace is compressed so that its busiest minute's tokens
are `--peak` of that capacity. Rows: interactive only; batch with no limit; fixed caps (by default the best one
the virtual-time search finds); engine priority alone; backfill (role all, and an API replica + a worker on
PostgreSQL). Straight to the engine: interactive only and backfill (metrics only); `--every-row` adds the rest.
Columns: interactive p50 / p99 time to first token relative to interactive only on the same route, batch output
tokens/s, harvest efficiency = batch tokens served / (capacity x duration - interactive tokens served), all
tokens from the engine's own counters; and the virtual-time p99 ratio and harvest efficiency of the same strategy
and slice (counted the same way: the simulated engine's counters over the window).

The p99 of one row is close to its second-slowest request, and for the controller rows a draw: where the
dispatcher's once-a-second engine readings fall relative to the trace is chance on the real path, and moves the
twin's p99 on this slice by tens of points. So the twin runs each controller row at `--twin-phases` reading
phases (mean and range shown), and `--repeat N` runs the real rows N times, with a summary of the runs beside the
twin's phases. `--capacity` skips measuring it, so that separate invocations compress the trace alike.

The load generator runs in this process (asyncio, one HTTP/1.1 connection per request in flight); its lag
behind the trace's schedule and its CPU share are printed, so a row whose generator could not keep up says so.

    .venv/bin/python bench/harvest_e2e.py                      # 8 rows, ~10 minutes
    .venv/bin/python bench/harvest_e2e.py --every-row --caps 8 12 --seconds 45 --warmup 30   # 13 rows, ~22 minutes
    .venv/bin/python bench/harvest_e2e.py --seconds 20 --rows proxy:interactive proxy:backfill   # a smoke run
    .venv/bin/python bench/harvest_e2e.py --twin-draws 11 12 13 14 15 16   # the twin alone, over six batch draws
    .venv/bin/python bench/harvest_e2e.py --capacity 13571 --repeat 3 --postgres none \
        --rows proxy:interactive proxy:backfill direct:interactive direct:backfill   # 12 rows, ~15 minutes
    .venv/bin/python bench/harvest_e2e.py --engine-url http://127.0.0.1:8081/v1 --flavour llamacpp ...  # a real engine
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import random
import resource
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from harness import REPO, Children, Server, machine_line, running, table

from backfill.backends.engine_metrics import parse_samples
from backfill.config import Settings
from backfill.interactive import FirstTokenScanner
from backfill.sim.profile import EngineProfile
from backfill.sim.shared_engine import (
    CAPACITY_WARMUP_S,
    SharedResult,
    TraceRequest,
    capacity_tokens_per_s,
    harvest_efficiency,
    load_trace,
    run,
)
from backfill.testing.processes import free_port, wait_http

TRACE = REPO / "bench" / "data" / "azure_llm_2023_conv.csv"
SEED = 11  # the batch backlog's draw (shared_engine.run's default)
VIRTUAL_CAPS = (8, 12, 16, 20, 24, 28, 32, 40, 48, 64)
BATCH_PRIORITY = 10
TEMPLATE_TOKENS = 8  # what the simulator's chat template adds to a one-message prompt (sim/tokens.py)


Counters = tuple[int, int, float]  # Engine.counters()


@dataclass(frozen=True, slots=True)
class Row:
    """One strategy on one route."""

    strategy: str  # interactive, fifo, cap:N, priority, backfill (as shared_engine.run names them)
    route: str  # proxy | direct
    split: bool = False  # backfill as an API replica and a worker (PostgreSQL) instead of one process

    @property
    def key(self) -> str:
        return f"{self.route}:{self.strategy}{'-split' if self.split else ''}"

    @property
    def label(self) -> str:
        return f"{self.strategy} (api + worker)" if self.split else self.strategy

    @property
    def virtual_strategy(self) -> str:
        return "backfill-metrics" if self.strategy == "backfill" and self.route == "direct" else self.strategy

    @property
    def priority(self) -> bool:
        return self.strategy in ("priority", "backfill")

    def backend(self, url: str, model: str, flavour: str, profile: EngineProfile, capacity: float) -> dict[str, Any]:
        """The `[[backends]]` entry a user would write for this strategy (what sim.virtual.sim_backend builds);
        a harvested one is told the engine's capacity, as measured (a row is too short to learn it)."""
        if self.strategy.startswith("cap:"):
            limit = int(self.strategy.split(":", 1)[1])
        elif self.strategy == "backfill":
            limit = max(1, profile.max_num_seqs // 2)
        else:
            limit = 4 * profile.max_num_seqs
        entry = {
            "name": "engine", "url": url, "models": [model], "flavour": flavour, "max_concurrency": limit,
            "adaptive_concurrency": False, "harvest": self.strategy == "backfill",  # the others: opted out
            "priority": "on" if self.priority else "off", "batch_priority": BATCH_PRIORITY,
        }  # fmt: skip
        if self.strategy == "backfill":
            entry["capacity_tokens_per_s"] = round(capacity)
        return entry


@dataclass
class Sent:
    at: float  # when it was due, seconds from the row's start
    lag_s: float = 0.0  # how late the generator sent it
    ttft_s: float | None = None
    prompt_tokens: int = 0  # the engine's tokens for it inside the measured window: its prompt (when its first
    output_tokens: int = 0  # token came then) and the output tokens that arrived then
    error: str | None = None


@dataclass
class RowResult:
    row: Row
    duration_s: float
    sent: list[Sent]
    engine_tokens: int  # prompt + output over the row, from the engine's counters
    engine_output_tokens: int
    generator_cpu_s: float
    batch_lines_done: int = 0
    virtual_p99_ratio: float | None = None
    notes: list[str] = field(default_factory=list)

    warmup_s: float = 0.0
    run: int = 0  # which of --repeat's runs

    def ttfts(self, grace_s: float) -> list[float]:
        """The TTFT of every request sent in the measured window; one that had none by the row's end (+ grace)
        counts as the time it waited."""
        end = self.warmup_s + self.duration_s + grace_s
        return [s.ttft_s if s.ttft_s is not None else end - s.at for s in self.sent if s.at >= self.warmup_s]

    @property
    def interactive_tokens(self) -> int:
        return sum(s.prompt_tokens + s.output_tokens for s in self.sent)

    @property
    def interactive_output_tokens(self) -> int:
        return sum(s.output_tokens for s in self.sent)

    @property
    def batch_tokens(self) -> int:
        return max(0, self.engine_tokens - self.interactive_tokens)

    @property
    def batch_output_per_s(self) -> float:
        return max(0, self.engine_output_tokens - self.interactive_output_tokens) / self.duration_s


def quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


# Common words that are one token each, space included, in the simulator's tokenizer (4 characters) and in the
# BPE vocabularies of real models (SmolLM2's, Llama's): a prompt of n of them is about n tokens on either.
WORDS = tuple(
    f" {word}"
    for word in [
        "the",
        "and",
        "for",
        "you",
        "are",
        "was",
        "not",
        "but",
        "his",
        "all",
        "can",
        "her",
        "one",
        "our",
        "out",
        "day",
        "get",
        "has",
        "him",
        "how",
        "man",
        "new",
        "now",
        "old",
        "see",
        "two",
        "way",
        "who",
        "boy",
        "did",
        "its",
        "let",
        "put",
        "say",
        "she",
        "too",
        "use",
    ]
)


def prompt_text(rng: random.Random, tokens: int) -> str:
    """Text of about `tokens` prompt tokens once templated, shared with no other prompt beyond its first words
    (drawn at random: no prefix-cache hits between requests, as between unrelated conversations)."""
    return "".join(rng.choices(WORDS, k=max(1, tokens - TEMPLATE_TOKENS)))


def busiest_minute_tokens(trace: list[TraceRequest]) -> int:
    minutes: dict[int, int] = {}
    for r in trace:
        minutes[int(r.at_s // 60)] = minutes.get(int(r.at_s // 60), 0) + r.prompt_tokens + r.output_tokens
    return max(minutes.values())


def fit(trace: list[TraceRequest], profile: EngineProfile) -> list[TraceRequest]:
    """The trace with each request's prompt cut to fit the engine's context (one request of the hour is longer)."""
    return [
        dataclasses.replace(r, prompt_tokens=min(r.prompt_tokens, profile.max_model_len - r.output_tokens - 16))
        for r in trace
    ]


# --- the engine --------------------------------------------------------------------------------------------------


class Engine:
    """An engine under test: the simulator started per row, or a real server already running (`--engine-url`)."""

    def __init__(self, args: argparse.Namespace, profile: EngineProfile, workdir: Path) -> None:
        self.args, self.profile, self.workdir = args, profile, workdir
        self.process: Any = None
        self.url = args.engine_url.rstrip("/") if args.engine_url else ""

    @property
    def root(self) -> str:
        return self.url.removesuffix("/v1")

    def start(self, children: Children, priority: bool) -> None:
        """A fresh engine (nothing queued, nothing cached from the row before), unless one runs elsewhere."""
        if self.args.engine_url:
            return
        port = free_port()
        if self.args.engine_command:  # a real engine: its command line, "{port}" filled in
            argv = shlex.split(self.args.engine_command.replace("{port}", str(port)))
        else:
            profile = self.workdir / f"profile-{'priority' if priority else 'fcfs'}.toml"
            profile.write_text(
                f'scheduling_policy = "{"priority" if priority else "fcfs"}"\n'
                f"max_num_batched_tokens = {self.profile.max_num_batched_tokens}\n"
            )
            argv = [sys.executable, "-m", "backfill", "sim", "serve", "--port", str(port), "--profile", str(profile)]
        self.process = children.start(argv, self.workdir / "engine.log")
        self.url = f"http://127.0.0.1:{port}/v1"
        wait_http(f"{self.root}/metrics", self.process, timeout_s=300)

    def stop(self, children: Children) -> None:
        if self.process is not None:
            children.stop(self.process)
            self.process = None

    def counters(self) -> Counters:
        """(prompt + output tokens, output tokens) the engine has processed so far, and the seconds the simulator
        fell behind its model (0 for a real engine)."""
        samples = parse_samples(httpx.get(f"{self.root}/metrics", timeout=120).text) or {}

        def total(name: str) -> float:  # over every label set
            return sum(value for _, value in samples.get(name, ()))

        if self.args.flavour == "llamacpp":  # cached prompt tokens were served too
            prompt = total("llamacpp:prompt_tokens_total") + total("llamacpp:prompt_tokens_cached_total")
            output = total("llamacpp:tokens_predicted_total")
        else:
            prompt, output = total("vllm:prompt_tokens_total"), total("vllm:generation_tokens_total")
        return round(prompt) + round(output), round(output), total("backfill_sim_lost_seconds_total")


# --- the load generator ------------------------------------------------------------------------------------------


def body(model: str, text: str, output_tokens: int, *, stream: bool) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": output_tokens,
        "ignore_eos": True,
    }
    if stream:
        payload |= {"stream": True, "stream_options": {"include_usage": True}}
    return payload


async def replay(
    url: str, model: str, trace: list[TraceRequest], scale: float, seconds: float, measure_from: float
) -> list[Sent]:
    """Send the trace's requests due in the first `seconds` (compressed by `scale`) to `url`, streamed, each at its
    time whatever the others do; return what each one saw (its tokens counted from `measure_from` to `seconds`, the
    window the engine's counters are read over)."""
    rng = random.Random(5)
    due = [(r.at_s / scale, r) for r in trace if r.at_s / scale < seconds]
    texts = [prompt_text(rng, r.prompt_tokens) for _, r in due]
    sent = [Sent(at) for at, _ in due]
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=512)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        start = time.monotonic()

        async def one(n: int) -> None:
            at, request = due[n]
            record = sent[n]
            delay = start + at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            began = time.monotonic()
            record.lag_s = max(0.0, began - start - at)
            payload = body(model, texts[n], request.output_tokens, stream=True)
            try:
                async with client.stream("POST", f"{url}/chat/completions", json=payload) as response:
                    if response.status_code != 200:
                        record.error = f"{response.status_code}: {(await response.aread())[:200]!r}"
                        return
                    # The first content event found as the proxy finds it (FirstTokenScanner); after it, events
                    # are only counted (one token each; the usage event and [DONE] come off at the end).
                    scanner, events, inside = FirstTokenScanner(), 0, False
                    async for chunk in response.aiter_raw():
                        now = time.monotonic()
                        inside = measure_from <= now - start < seconds
                        if record.ttft_s is None:
                            if not scanner.feed(chunk):
                                continue
                            record.ttft_s = now - began
                            if inside:
                                record.prompt_tokens = request.prompt_tokens
                        if inside:
                            events += chunk.count(b"data:")
                    # The usage event and [DONE] come last: off the count when the stream ended inside the window.
                    record.output_tokens = max(0, events - (2 if inside else 0))
            except httpx.HTTPError as exc:
                record.error = type(exc).__name__

        tasks = [asyncio.create_task(one(n)) for n in range(len(due))]
        # The row ends `seconds` after its start; requests still waiting then get a short grace, then go.
        _, pending = await asyncio.wait(tasks, timeout=seconds + 10.0)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return sent


async def saturate(url: str, model: str, trace: list[TraceRequest], concurrency: int, seconds: float) -> None:
    """Keep `concurrency` requests of the trace's mix in the engine for `seconds` (non-streamed)."""
    rng = random.Random(3)
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:

        async def worker() -> None:
            while time.monotonic() < deadline:
                request = rng.choice(trace)
                payload = body(model, prompt_text(rng, request.prompt_tokens), request.output_tokens, stream=False)
                with contextlib.suppress(httpx.HTTPError):
                    await client.post(f"{url}/chat/completions", json=payload, timeout=deadline - time.monotonic() + 1)

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def measure_capacity(engine: Engine, children: Children, trace: list[TraceRequest], seconds: float) -> float:
    """Prompt + output tokens/s the engine serves saturated with the trace's mix, counted after the warm-up its
    first wave of sequences needs (`CAPACITY_WARMUP_S`; counted from 5 s, it measured ~10 % over the steady rate)."""
    engine.start(children, priority=False)
    try:
        concurrency = engine.profile.max_num_seqs + 16
        warmup = CAPACITY_WARMUP_S

        async def go() -> float:
            load = asyncio.create_task(saturate(engine.url, engine.profile.model, trace, concurrency, warmup + seconds))
            await asyncio.sleep(warmup)
            before, t0 = engine.counters()[0], time.monotonic()
            await asyncio.sleep(seconds)
            after, t1 = engine.counters()[0], time.monotonic()
            await load
            return (after - before) / (t1 - t0)

        return asyncio.run(go())
    finally:
        engine.stop(children)


# --- one row -----------------------------------------------------------------------------------------------------


def batch_pool(trace: list[TraceRequest], args: argparse.Namespace) -> list[TraceRequest]:
    """The trace's (prompt, output) pairs batch lines are drawn from: all of them, or with --batch-prompt-max only
    those with shorter prompts (a what-if: a backlog of short prompts, where one line's prefill never fills an
    iteration)."""
    if args.batch_prompt_max is None:
        return trace
    return [r for r in trace if r.prompt_tokens <= args.batch_prompt_max]


def what_if(args: argparse.Namespace, profile: EngineProfile) -> str:
    """What this run changes from the default slice, for its header."""
    changes = [f"; iteration budget {profile.max_num_batched_tokens} tokens"] if args.max_num_batched_tokens else []
    if args.batch_prompt_max is not None:
        changes.append(f"; batch lines only of prompts <= {args.batch_prompt_max} tokens")
    return "".join(changes)


def batch_file(path: Path, trace: list[TraceRequest], count: int, model: str) -> Path:
    """The backlog: `count` lines drawn from the trace's (prompt, output) pairs, as shared_engine.batch_backlog."""
    rng, text_rng = random.Random(SEED), random.Random(SEED + 1)
    with path.open("w") as out:
        for n in range(count):
            request = rng.choice(trace)
            line = {
                "custom_id": f"line-{n}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": body(model, prompt_text(text_rng, request.prompt_tokens), request.output_tokens, stream=False),
            }
            out.write(json.dumps(line) + "\n")
    return path


async def drive(
    row: Row,
    engine: Engine,
    server: Server | None,
    file_id: str | None,
    target: str,
    trace: list[TraceRequest],
    scale: float,
    args: argparse.Namespace,
) -> tuple[list[Sent], tuple[Counters, Counters], str | None]:
    """The batch and the interactive traffic from the start; the engine's counters read after the warm-up and at
    the end of the measured window (the steady state, not the batch's first seconds; not the grace the last
    interactive requests get after it either: tokens the engine served then are outside the window)."""
    profile = engine.profile
    batch_id = None
    if file_id is not None and server is not None:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}/v1", timeout=60) as client:
            payload = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
            created = await client.post("/batches", json=payload)
            created.raise_for_status()
            batch_id = created.json()["id"]
    total = args.warmup + args.seconds
    started = time.monotonic()
    traffic = asyncio.create_task(replay(target, profile.model, trace, scale, total, args.warmup))
    await asyncio.sleep(args.warmup)
    before = await asyncio.to_thread(engine.counters)
    await asyncio.sleep(max(0.0, started + total - time.monotonic()))
    after = await asyncio.to_thread(engine.counters)
    return await traffic, (before, after), batch_id


async def watch_controller(dispatcher: Server, seconds: float, seen: list[tuple[float, float | None]]) -> None:
    """The harvest controller as the dispatcher's /metrics show it, once a second: (ceiling, TTFT baseline)."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{dispatcher.port}", timeout=5) as client:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            samples = parse_samples((await client.get("/metrics")).text) or {}
            ceiling = [value for _, value in samples.get("backfill_harvest_limit", [])]
            baseline = [value for _, value in samples.get("backfill_harvest_ttft_baseline_seconds", [])]
            if ceiling:
                seen.append((ceiling[0], baseline[0] if baseline else None))
            await asyncio.sleep(1.0)


def controller_note(seen: list[tuple[float, float | None]]) -> str | None:
    """What the controller did over the row, for the notes column."""
    if not seen:
        return None
    ceilings = [ceiling for ceiling, _ in seen]
    baseline = seen[-1][1]
    learned = f"baseline {baseline * 1000:.0f} ms" if baseline is not None else "no baseline learned"
    mean = sum(ceilings) / len(ceilings)
    return f"ceiling mean {mean:.1f} (min {min(ceilings):.0f}, max {max(ceilings):.0f}), {learned}"


@dataclass
class Backfill:
    """The backfill processes of one row: one (role all), or an API replica and a worker on PostgreSQL."""

    server: Server
    worker: Server | None = None
    database: Database | None = None

    @classmethod
    def start(cls, row: Row, backend: dict[str, Any], children: Children, rowdir: Path, postgres: str) -> Backfill:
        settings: dict[str, Any] = {"fair_share_preemption": False}
        if not row.split:
            started = cls(Server.start_with(children, rowdir, [backend], settings))
        else:
            database = Database.create(postgres)
            settings["database_url"] = database.url
            data = rowdir / "data"
            worker = Server.start_with(children, rowdir / "worker", [backend], settings | {"role": "worker"}, data)
            api = Server.start_with(children, rowdir / "api", [backend], settings | {"role": "api"}, data)
            started = cls(api, worker, database)
        for server in (started.server, started.worker):
            if server is not None:
                wait_http(f"http://127.0.0.1:{server.port}/readyz", server.process)
        return started

    def stop(self, children: Children) -> None:
        for server in (self.server, self.worker):
            if server is not None:
                server.stop(children)
        if self.database is not None:
            self.database.drop()


def run_row(
    row: Row,
    engine: Engine,
    children: Children,
    workdir: Path,
    trace: list[TraceRequest],
    scale: float,
    args: argparse.Namespace,
    backlog: Path,
    capacity: float,
) -> RowResult:
    profile = engine.profile
    engine.start(children, priority=row.priority)
    backfill: Backfill | None = None
    try:
        target = engine.url
        if row.strategy != "interactive" or row.route == "proxy":
            backend = row.backend(engine.url, profile.model, args.flavour, profile, capacity)
            backfill = Backfill.start(row, backend, children, workdir / row.key.replace(":", "-"), args.postgres)
            if row.route == "proxy":
                target = f"http://127.0.0.1:{backfill.server.port}/v1"
        server = backfill.server if backfill is not None else None
        file_id = server.upload(backlog)["id"] if server is not None and row.strategy != "interactive" else None
        cpu_before = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.monotonic()
        seen: list[tuple[float, float | None]] = []

        async def both() -> tuple[list[Sent], tuple[Counters, Counters], str | None]:
            dispatcher = backfill.worker or backfill.server if backfill is not None else None
            if dispatcher is not None:
                watcher = asyncio.create_task(watch_controller(dispatcher, args.warmup + args.seconds, seen))
            driven = await drive(row, engine, server, file_id, target, trace, scale, args)
            if dispatcher is not None:
                await watcher
            return driven

        sent, (before, after), batch_id = asyncio.run(both())
        elapsed = time.monotonic() - t0 - args.warmup
        cpu_after = resource.getrusage(resource.RUSAGE_SELF)
        result = RowResult(
            row,
            args.seconds,
            sent,
            after[0] - before[0],
            after[1] - before[1],
            (cpu_after.ru_utime + cpu_after.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime),
            warmup_s=args.warmup,
        )
        result.notes += timing_notes(elapsed - args.seconds, after[2] - before[2])
        if batch_id is not None and server is not None:
            counts = server.batch(batch_id)["request_counts"]
            result.batch_lines_done = counts["completed"] + counts["failed"]
            if counts["failed"]:
                result.notes.append(f"{counts['failed']} batch lines failed")
        note = controller_note(seen[int(args.warmup) :])
        if note is not None and row.strategy == "backfill":
            result.notes.append(note)
        errors = [s.error for s in sent if s.error]
        if errors:
            result.notes.append(f"{len(errors)} interactive errors, e.g. {errors[0]}")
        return result
    finally:
        if backfill is not None:
            backfill.stop(children)
        engine.stop(children)


def timing_notes(overrun_s: float, lost_s: float) -> list[str]:
    """What went slower than planned in a row: the replay past its window, the simulator behind its model."""
    notes = [f"replay ran {overrun_s:.0f} s past its window"] if overrun_s > 11 else []
    if lost_s > 0.05:  # the engine's iterations stretched: its latencies are not the model's
        notes.append(f"the simulator fell {lost_s:.2f} s behind its model")
    return notes


@dataclass
class Database:
    """A PostgreSQL database of its own for one split row, dropped after it."""

    admin_url: str
    name: str

    @property
    def url(self) -> str:
        return self.admin_url.rsplit("/", 1)[0] + f"/{self.name}"

    @classmethod
    def create(cls, admin_url: str) -> Database:
        database = cls(admin_url, f"harvest_e2e_{random.randrange(1 << 32):08x}")
        database._execute(f'CREATE DATABASE "{database.name}"')
        return database

    def drop(self) -> None:
        self._execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')

    def _execute(self, statement: str) -> None:
        import sqlalchemy

        engine = sqlalchemy.create_engine(
            self.admin_url.replace("postgresql://", "postgresql+psycopg://", 1), isolation_level="AUTOCOMMIT"
        )
        try:
            with engine.connect() as connection:
                connection.execute(sqlalchemy.text(statement))
        finally:
            engine.dispose()


# --- the virtual-time twin ---------------------------------------------------------------------------------------


def virtual(
    strategy: str,
    trace: list[TraceRequest],
    profile: EngineProfile,
    scale: float,
    args: argparse.Namespace,
    capacity: float,
    seed: int = SEED,
    phase: float = 0.0,
) -> SharedResult:
    """One strategy on the same slice, warm-up and backlog in virtual time (the simulator's model of the engine);
    `seed`: the batch backlog's draw; `phase`: when the dispatcher first reads the engine."""
    return run(
        strategy, trace, profile, scale=scale, duration_s=args.warmup + args.seconds, backlog=args.backlog,
        seed=seed, warmup_s=args.warmup, capacity=capacity, probe_phase_s=phase, batch_from=batch_pool(trace, args),
    )  # fmt: skip


def phases(strategy: str, args: argparse.Namespace) -> list[float]:
    """Where the dispatcher's once-a-second engine readings fall relative to the trace, evenly over a second, for a
    strategy that acts on them (on the real path that is chance, and a controller's p99 on one slice moves with it
    by tens of points); a fixed cap or engine priority alone never does, and one phase is all of them."""
    if not strategy.startswith(("backfill", "clairvoyant")):
        return [0.0]
    interval = Settings.model_fields["engine_metrics_interval_s"].default
    return [interval * k / args.twin_phases for k in range(args.twin_phases)]


def twin_draws(
    trace: list[TraceRequest], profile: EngineProfile, scale: float, args: argparse.Namespace, capacity: float
) -> None:
    """The slice in virtual time over several batch draws (and reading phases): what one draw's p99 is worth, and
    the fixed caps' frontier (p99 against efficiency) with that noise averaged out."""
    reference = virtual("interactive", trace, profile, scale, args, capacity).ttft_quantile(0.99)
    strategies = [*(f"cap:{cap}" for cap in VIRTUAL_CAPS), "priority", "backfill", "backfill-metrics", "clairvoyant"]
    rows = []
    for strategy in strategies:
        results = [
            virtual(strategy, trace, profile, scale, args, capacity, seed, phase)
            for seed in args.twin_draws
            for phase in phases(strategy, args)
        ]
        p99s = [r.ttft_quantile(0.99) / reference - 1 for r in results]
        efficiencies = [harvest_efficiency(r, capacity) for r in results]
        rows.append([
            strategy,
            f"{statistics.mean(p99s):+.0%}",
            f"{min(p99s):+.0%} .. {max(p99s):+.0%}",
            f"{statistics.mean(efficiencies):.1%}",
            f"{min(efficiencies):.0%} .. {max(efficiencies):.0%}",
        ])  # fmt: skip
    draws = " ".join(map(str, args.twin_draws))
    print(
        f"virtual time, batch draws {draws} (the controllers over {args.twin_phases} reading phases each);"
        f" interactive only p99 {reference * 1000:.0f} ms"
    )
    print(table(["strategy", "p99 vs interactive, mean", "range", "harvest eff., mean", "range"], rows))


def virtual_twins(
    rows: Sequence[Row],
    trace: list[TraceRequest],
    profile: EngineProfile,
    scale: float,
    args: argparse.Namespace,
    capacity: float,
) -> dict[str, list[SharedResult]]:
    """Each strategy in virtual time, the controllers at every reading phase."""
    strategies = sorted({row.virtual_strategy for row in rows} | {"interactive"})
    return {
        s: [virtual(s, trace, profile, scale, args, capacity, phase=p) for p in phases(s, args)] for s in strategies
    }


def best_virtual_cap(
    trace: list[TraceRequest], profile: EngineProfile, scale: float, args: argparse.Namespace, capacity: float
) -> int:
    """The largest fixed cap whose virtual p99 stays within +10% of interactive only on this slice. Prints each
    cap's p99 and harvest efficiency: the most any batch concurrency can harvest here within the p99 goal."""
    reference = virtual("interactive", trace, profile, scale, args, capacity).ttft_quantile(0.99)
    best = VIRTUAL_CAPS[0]
    frontier = []
    for cap in VIRTUAL_CAPS:
        result = virtual(f"cap:{cap}", trace, profile, scale, args, capacity)
        p99 = result.ttft_quantile(0.99)
        frontier.append(f"{cap}: {p99 / reference - 1:+.0%} / {harvest_efficiency(result, capacity):.0%}")
        if p99 <= 1.10 * reference:
            best = cap
    print(f"virtual-time fixed caps, p99 / harvest efficiency: {'; '.join(frontier)}", flush=True)
    return best


# --- the report --------------------------------------------------------------------------------------------------


def twin_figures(twins: dict[str, list[SharedResult]], row: Row, capacity: float) -> tuple[list[float], list[float]]:
    """The twin's p99 ratios (against its interactive-only p99) and harvest efficiencies for a row, one a phase."""
    v_ref, vs = twins.get("interactive"), twins.get(row.virtual_strategy, [])
    if not v_ref or not vs:
        return [], []
    reference = v_ref[0].ttft_quantile(0.99)
    efficiencies = [harvest_efficiency(v, capacity) for v in vs] if row.strategy != "interactive" else []
    return [v.ttft_quantile(0.99) / reference - 1 for v in vs], efficiencies


def spread(values: Sequence[float], digits: int = 0) -> str:
    """A mean, with the range when there are several: "+55% (+34% .. +95%)"."""
    if not values:
        return "-"
    mean = f"{statistics.mean(values):+.{digits}%}"
    return mean if len(values) == 1 else f"{mean} ({min(values):+.0%} .. {max(values):+.0%})"


def report(results: list[RowResult], capacity: float, twins: dict[str, list[SharedResult]], grace_s: float) -> None:
    ratios: dict[Row, list[float]] = {}  # each row's p99 ratio, run by run
    efficiencies: dict[Row, list[float]] = {}
    runs = sorted({r.run for r in results})
    for route in ("proxy", "direct"):
        for index in runs:
            mine = [r for r in results if r.row.route == route and r.run == index]
            label = f", run {index + 1} of {len(runs)}" if len(runs) > 1 else ""
            if mine:
                report_run(mine, label, capacity, twins, grace_s, ratios, efficiencies)
    if len(runs) < 2:
        return
    rows = []
    for row, values in ratios.items():
        v_ratios, v_efficiencies = twin_figures(twins, row, capacity)
        effs = efficiencies.get(row, [])
        rows.append([
            f"{row.label} ({row.route})",
            spread(values),
            spread(v_ratios),
            f"{statistics.mean(effs):.1%}" if effs else "-",
            f"{statistics.mean(v_efficiencies):.1%}" if v_efficiencies else "-",
        ])  # fmt: skip
    print(f"\nover {len(runs)} runs (real) and the reading phases (virtual)")
    print(table(["row", "p99 real, mean (range)", "p99 virtual", "harvest eff. real", "virtual"], rows))


def report_run(
    mine: list[RowResult],
    label: str,
    capacity: float,
    twins: dict[str, list[SharedResult]],
    grace_s: float,
    ratios: dict[Row, list[float]],
    efficiencies: dict[Row, list[float]],
) -> None:
    """One run of one route's rows, each against the interactive-only row of the same run."""
    ref = next((r for r in mine if r.row.strategy == "interactive"), None)
    ref50 = quantile(ref.ttfts(grace_s), 0.5) if ref else float("nan")
    ref99 = quantile(ref.ttfts(grace_s), 0.99) if ref else float("nan")
    caps = [r for r in mine if r.row.strategy.startswith("cap:") and quantile(r.ttfts(grace_s), 0.99) <= 1.1 * ref99]
    best_cap = max(caps, key=lambda r: r.batch_output_per_s, default=None)
    rows = []
    for r in mine:
        ttfts = r.ttfts(grace_s)
        p50, p99 = quantile(ttfts, 0.5), quantile(ttfts, 0.99)
        idle = capacity * r.duration_s - r.interactive_tokens
        efficiency = r.batch_tokens / idle if r.row.strategy != "interactive" and idle > 0 else float("nan")
        if r.row.strategy != "interactive":
            ratios.setdefault(r.row, []).append(p99 / ref99 - 1)
            efficiencies.setdefault(r.row, []).append(efficiency)
        v_ratios, v_efficiencies = twin_figures(twins, r.row, capacity)
        lags = [s.lag_s for s in r.sent]
        versus_cap = (
            f"{r.batch_output_per_s / best_cap.batch_output_per_s:.2f}x"
            if best_cap is not None and best_cap.batch_output_per_s > 0 and r.row.strategy != "interactive"
            else "-"
        )
        rows.append([
            r.row.label,
            f"{p50 * 1000:.0f} ({p50 / ref50 - 1:+.1%})",
            f"{p99 * 1000:.0f} ({p99 / ref99 - 1:+.1%})",
            spread(v_ratios, 1),
            f"{r.batch_output_per_s:,.0f}" if r.row.strategy != "interactive" else "-",
            f"{efficiency:.1%}" if efficiency == efficiency else "-",
            f"{statistics.mean(v_efficiencies):.1%}" if v_efficiencies else "-",
            versus_cap,
            f"{len(ttfts)}",
            f"{quantile(lags, 0.99) * 1000:.1f}",
            f"{r.generator_cpu_s / r.duration_s:.0%}",
            "; ".join(r.notes) or "",
        ])  # fmt: skip
    best = f" (best fixed cap within +10%: {best_cap.row.strategy})" if best_cap else " (no fixed cap within +10%)"
    route = "through the proxy" if mine[0].row.route == "proxy" else "straight to the engine"
    print(f"\ninteractive {route}{best}{label}")
    print(
        table(
            ["strategy", "TTFT p50 ms", "TTFT p99 ms", "virtual p99 (phases)", "batch out tok/s", "harvest eff.",
             "virtual eff.", "x best cap", "requests", "gen lag p99 ms", "gen CPU", "notes"],
            rows,
        )
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=40.0, help="wall-clock seconds measured per row")
    parser.add_argument("--warmup", type=float, default=20.0, help="seconds of batch + interactive before measuring")
    parser.add_argument("--offset-min", type=float, default=10.0, help="start this many trace minutes in")
    parser.add_argument("--peak", type=float, default=0.9, help="share of the engine the trace's busiest minute needs")
    parser.add_argument("--backlog", type=int, default=1500, help="batch lines waiting (more than a row can serve)")
    parser.add_argument("--caps", type=int, nargs="*", help="fixed caps to run (default: the virtual best and next)")
    parser.add_argument(
        "--capacity-s", type=float, default=30.0, help="seconds of saturation to measure capacity (after 30 s)"
    )
    parser.add_argument("--every-row", action="store_true", help="also fifo, caps and priority straight to the engine")
    parser.add_argument("--rows", nargs="*", help="only these rows, as route:strategy (proxy:backfill, direct:fifo)")
    parser.add_argument("--engine-url", help="a real engine already running (its /v1 URL) instead of the simulator")
    parser.add_argument(
        "--engine-command", help="a real engine started afresh for every row instead of the simulator ('{port}')"
    )
    parser.add_argument("--model", help="the model the real engine serves")
    parser.add_argument("--flavour", default="vllm", choices=("vllm", "llamacpp"))
    parser.add_argument("--max-num-seqs", type=int, help="the real engine's sequence slots (llama-server -np)")
    parser.add_argument("--token-scale", type=float, default=1.0, help="multiply every prompt and output length")
    parser.add_argument("--max-model-len", type=int, help="the real engine's context per sequence (prompts are cut)")
    parser.add_argument("--trace", type=Path, default=TRACE)
    parser.add_argument(
        "--twin-draws", type=int, nargs="+", metavar="SEED",
        help="only the virtual twin, over these batch draws (fixed caps and controllers); no process is started",
    )  # fmt: skip
    parser.add_argument(
        "--capacity", type=float,
        help="the engine's tokens/s, not measured (so that runs compress the trace alike); with --twin-draws, default:"
        " the model's",
    )  # fmt: skip
    parser.add_argument(
        "--repeat", type=int, default=1, help="run the rows this many times (the p99 of a run is noisy)"
    )
    parser.add_argument(
        "--batch-prompt-max", type=int, help="draw batch lines only from trace requests with prompts this long or less"
    )
    parser.add_argument(
        "--max-num-batched-tokens", type=int, help="the simulated engine's token budget an iteration (default 8192)"
    )
    parser.add_argument(
        "--twin-phases", type=int, default=10, help="reading phases the twin's controller rows are run at"
    )
    parser.add_argument(
        "--postgres",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="a PostgreSQL server (any database on it) for the api + worker row: a database is created there and"
        " dropped after; 'none' skips that row",
    )
    args = parser.parse_args()

    profile = EngineProfile()
    if args.model:
        profile = dataclasses.replace(profile, model=args.model)
    if args.max_num_seqs:
        profile = dataclasses.replace(profile, max_num_seqs=args.max_num_seqs)
    if args.max_model_len:
        profile = dataclasses.replace(profile, max_model_len=args.max_model_len)
    if args.max_num_batched_tokens:
        profile = dataclasses.replace(profile, max_num_batched_tokens=args.max_num_batched_tokens)
    whole = fit(load_trace(args.trace), profile)
    if args.token_scale != 1.0:  # a small engine: the same arrivals and mix, every request shorter
        whole = [
            dataclasses.replace(
                r,
                prompt_tokens=max(TEMPLATE_TOKENS + 1, round(r.prompt_tokens * args.token_scale)),
                output_tokens=max(1, round(r.output_tokens * args.token_scale)),
            )
            for r in whole
        ]
    start = args.offset_min * 60
    trace = [dataclasses.replace(r, at_s=r.at_s - start) for r in whole if r.at_s >= start]
    print(machine_line())
    if args.twin_draws:
        capacity = args.capacity or capacity_tokens_per_s(profile, whole, seed=3)
        scale = args.peak * capacity * 60 / busiest_minute_tokens(whole)
        print(
            f"capacity {capacity:,.0f} tokens/s{what_if(args, profile)}; trace compressed x{scale:.2f};"
            f" {args.warmup:g} s warm-up, {args.seconds:g} s measured"
        )
        twin_draws(trace, profile, scale, args, capacity)
        return

    with tempfile.TemporaryDirectory(prefix="harvest-e2e-") as tmp, running() as children:
        workdir = Path(tmp)
        engine = Engine(args, profile, workdir)
        began = time.monotonic()
        capacity = args.capacity or measure_capacity(engine, children, whole, args.capacity_s)
        real = args.engine_url or args.engine_command
        modelled = "" if real else f" ({capacity_tokens_per_s(profile, whole, seed=3):,.0f} in the simulator's model)"
        # Compress so that the busiest minute's tokens are --peak of the capacity measured.
        scale = args.peak * capacity * 60 / busiest_minute_tokens(whole)
        window = [r for r in trace if args.warmup <= r.at_s / scale < args.warmup + args.seconds]
        load = sum(r.prompt_tokens + r.output_tokens for r in window) / args.seconds / capacity
        print(
            f"engine capacity {capacity:,.0f} tokens/s {'given' if args.capacity else 'measured'}{modelled} with the"
            f" trace mix at {profile.max_num_seqs + 16} in flight; trace compressed x{scale:.2f}; each row: the batch"
            f" and the trace from the start, {args.warmup:g} s of warm-up, then {args.seconds:g} s measured ="
            f" {(args.warmup + args.seconds) * scale / 60:.1f} trace minutes from minute {args.offset_min:g};"
            f" {len(window)} interactive requests measured per row, {load:.0%} of the capacity"
            f"{what_if(args, profile)}\n",
            flush=True,
        )
        if args.caps is None:
            best = best_virtual_cap(trace, profile, scale, args, capacity)
            args.caps = [best]
            print(f"virtual-time search: best fixed cap {best}; running caps {args.caps}", flush=True)
        strategies = ["interactive", "fifo", *(f"cap:{c}" for c in args.caps), "priority", "backfill"]
        rows = [Row(strategy, "proxy") for strategy in strategies]
        # Straight to the engine, the rows without a controller are the same work on another route: by default
        # only the reference and the metrics-only controller (the 10-minute budget), all of them with --every-row.
        rows += [Row(s, "direct") for s in strategies if args.every_row or s in ("interactive", "backfill")]
        if args.postgres != "none":
            rows.insert(rows.index(Row("backfill", "proxy")) + 1, Row("backfill", "proxy", split=True))
        if args.rows:
            rows = [row for row in rows if row.key in args.rows]
        twins = virtual_twins(rows, trace, profile, scale, args, capacity) if not real else {}
        backlog = batch_file(workdir / "backlog.jsonl", batch_pool(trace, args), args.backlog, profile.model)
        results = []
        for index in range(args.repeat):
            for row in rows:
                print(f"  {row.key} ...", end=" ", flush=True)
                result = run_row(row, engine, children, workdir, trace, scale, args, backlog, capacity)
                result.run = index
                ttfts = result.ttfts(10.0)
                p50, p99 = quantile(ttfts, 0.5), quantile(ttfts, 0.99)
                print(f"p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms", flush=True)
                results.append(result)
        report(results, capacity, twins, 10.0)
        print(f"\n{time.monotonic() - began:.0f} s in all")


if __name__ == "__main__":
    main()
