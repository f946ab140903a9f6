"""Saturation: a chat batch through `backfill serve` to one engine simulator, against an ideal closed-loop client.

Issue 4: "a 20,000-line batch through backfill to one simulator reaches >= 0.97x the throughput of an ideal
closed-loop client at the simulator's best concurrency, and beats the cookbook-style client."

Every side gets a fresh `backfill sim serve` (the default profile: an H100 serving Llama-3-8B, max_num_seqs 256;
docs/simulator.md) with --time-scale 0.25 by default, so modelled seconds pass 4x faster: the same settings for
all, and an empty prefix cache for each (the sides send the same prompts, so a reused simulator would hand the
later side cache hits). The batch (default 20,000 lines, the same bytes for every run) is chat completions with a
shared system prompt (~130 characters, cached after the first line) and a user prompt of 200-800 characters
(50-200 tokens to the simulator's tokenizer); `max_tokens` is drawn per line from an exponential distribution of
mean 256 clipped to 16-1,024 (the simulator's own answer-length model), with `ignore_eos: true`, so each line
generates exactly its `max_tokens` and every side does exactly the same work.

    sweep      the ideal client (below) on the first --sweep-lines lines at each --sweep concurrency; the best
               lines/s picks N.
    ideal      N asyncio workers, each sending its next request as soon as its previous one returns (a closed
               loop), over httpx clients of 8 connections each (one client of N connections spends its CPU
               rescanning the pool: BENCHMARKS.md, "Throughput"). Time: first request sent -> last answer read.
    cookbook   bench/cookbook_client.py --max-concurrency N (the ideal's best N), in its own process, no rate
               limits; on the first --cookbook-lines lines (default 3,000: it is CPU-bound, see BENCHMARKS.md,
               so its rate hardly depends on the length of the run, and all 20,000 would take ~10 minutes).
               Time: its own, first request read -> last result written.
    backfill   `backfill serve` (SQLite, fresh data dir) with one backend (flavour vllm) at the simulator,
               max_concurrency 1024 and adaptive concurrency on (the default, starting at initial_concurrency
               16): backfill finds the concurrency by itself. The file is uploaded first (not timed). Time:
               POST /v1/batches -> status `completed` seen by polling every 100 ms (validation, dispatch, group
               commits and finalization included).

Every line must come back once with status 200 and exactly its `max_tokens` output tokens, or the script fails.
Also printed: the engine model's own ceiling for the batch at N (virtual time: no CPU, no network), the requests
in flight at the simulator (running + waiting, from its /metrics every 0.5 s) and, for backfill, its own
`backfill_backend_in_flight`, as medians over the middle 60% of each run: the concurrency each side settled at.

    .venv/bin/python bench/saturation.py                      # 20,000 lines, ~8 minutes
    .venv/bin/python bench/saturation.py --quick              # 2,000 lines, a smoke run
    .venv/bin/python bench/saturation.py --profile bench/out/saturation.svg   # py-spy on the backfill server
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import shutil
import ssl
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
from harness import MODEL, Children, Server, children_cpu_s, cpu_s, machine_line, profiled, running, table
from throughput import POLL_S, TERMINAL, check_results

from backfill.sim.engine import EngineModel, SimRequest
from backfill.sim.profile import EngineProfile, load_profile
from backfill.sim.tokens import count_text_tokens, render_chat, text_prefix_hashes
from backfill.testing.processes import free_port, wait_http

COOKBOOK = Path(__file__).resolve().parent / "cookbook_client.py"
CONNECTIONS_PER_CLIENT = 8
MAX_ATTEMPTS = 5
SAMPLE_S = 0.5
SYSTEM_PROMPT = (
    "You are a careful technical writer. Answer the request below in plain English, in complete sentences, "
    "without lists or headings."
)
_SYLLABLES = ("ka", "lo", "mi", "ter", "an", "ver", "sol", "pri", "du", "nex", "ab", "or", "qui", "est", "ra", "ment")


# --- the batch ----------------------------------------------------------------------------------------------------


@dataclass
class Workload:
    path: Path
    ids: list[str]
    bodies: list[bytes]  # each line's request body, for the closed-loop client
    output_tokens: int  # the sum of max_tokens: with ignore_eos, what every side must generate


def generate(path: Path, lines: int, seed: int = 20240611) -> Workload:
    """Write `lines` chat requests; the same seed always gives the same bytes, and the first n lines of a longer
    batch are the n lines of a shorter one."""
    rng = random.Random(seed)
    words = ["".join(rng.choices(_SYLLABLES, k=rng.randint(1, 4))) for _ in range(4000)]
    pool = " ".join(rng.choices(words, k=200_000))
    ids, bodies, output_tokens = [], [], 0
    with path.open("wb") as out:
        for i in range(lines):
            chars = rng.randint(200, 800)
            start = rng.randrange(len(pool) - chars)
            max_tokens = min(1024, max(16, round(rng.expovariate(1 / 256))))
            body = {
                "model": MODEL,
                "messages": [
                    {"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": f"Request {i}: {pool[start : start + chars]}"},
                ],
                "max_tokens": max_tokens,
                "ignore_eos": True,
            }
            custom_id = f"sat-{i:06d}"
            line = {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}
            out.write(orjson.dumps(line) + b"\n")
            ids.append(custom_id)
            bodies.append(orjson.dumps(body))
            output_tokens += max_tokens
    return Workload(path, ids, bodies, output_tokens)


def check_tokens(name: str, output: list[dict[str, Any]], expected: int) -> int:
    tokens = sum(int(line["response"]["body"]["usage"]["completion_tokens"]) for line in output)
    if tokens != expected:
        raise RuntimeError(f"{name}: {tokens} output tokens, expected {expected}")
    return tokens


# --- the simulator --------------------------------------------------------------------------------------------------


def prometheus(text: str) -> dict[str, float]:
    """Each sample of a Prometheus text page, by its name with labels, e.g. `vllm:num_requests_running{...}`."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def metric(samples: dict[str, float], name: str) -> float:
    """The sum of every sample of `name`, whatever its labels."""
    return sum(value for key, value in samples.items() if key == name or key.startswith(name + "{"))


@dataclass(frozen=True)
class SimSpec:
    """How to start a simulator: its profile (None: the default one) and --time-scale."""

    time_scale: float
    profile: Path | None = None

    def engine_profile(self) -> EngineProfile:
        return load_profile(self.profile)


@dataclass
class Sim:
    """A `backfill sim serve` serving MODEL."""

    process: Any
    port: int
    client: httpx.Client = field(repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def start(cls, children: Children, spec: SimSpec, log_path: Path | None = None) -> Sim:
        port = free_port()
        argv = [sys.executable, "-m", "backfill", "sim", "serve", "--port", str(port), "--model", MODEL]
        argv += ["--time-scale", str(spec.time_scale)] + (["--profile", str(spec.profile)] if spec.profile else [])
        process = children.start(argv, log_path)
        wait_http(f"http://127.0.0.1:{port}/health", process)
        return cls(process, port, httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30))

    def metrics(self) -> dict[str, float]:
        return prometheus(self.client.get("/metrics").text)

    def in_flight(self) -> float:
        """Requests the engine holds: running plus waiting."""
        samples = self.metrics()
        return metric(samples, "vllm:num_requests_running") + metric(samples, "vllm:num_requests_waiting")

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = self.client.get("/_stats?log=0").json()
        return stats


@contextmanager
def fresh_sims(children: Children, specs: dict[str, SimSpec]) -> Iterator[dict[str, Sim]]:
    """New simulators for one side (an empty engine and prefix cache), stopped after it."""
    sims = {name: Sim.start(children, spec) for name, spec in specs.items()}
    try:
        yield sims
    finally:
        for sim in sims.values():
            sim.client.close()
            children.stop(sim.process)


class Sampler:
    """Calls each probe every SAMPLE_S seconds in a thread while the `with` block runs; keeps (seconds, value)."""

    def __init__(self, probes: dict[str, Callable[[], float]]) -> None:
        self.probes = probes
        self.samples: dict[str, list[tuple[float, float]]] = {name: [] for name in probes}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.started = 0.0

    def __enter__(self) -> Sampler:
        self.started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            for name, probe in self.probes.items():
                with suppress(httpx.HTTPError):
                    self.samples[name].append((time.perf_counter() - self.started, probe()))

    def steady(self, name: str, seconds: float) -> float:
        """The median over the middle 60% of a run `seconds` long (0 when nothing was sampled)."""
        values = sorted(v for t, v in self.samples[name] if 0.2 * seconds <= t <= 0.8 * seconds)
        return values[len(values) // 2] if values else 0.0

    def reached(self, name: str, level: float) -> float | None:
        """Seconds until `name` first reached `level`."""
        return next((t for t, v in self.samples[name] if v >= level), None)


# --- the sides ------------------------------------------------------------------------------------------------------


@dataclass
class Side:
    name: str
    seconds: float
    lines: int
    output_tokens: int
    cpu_s: float  # the client's: this process, the cookbook process, or the backfill server
    sim_cpu_s: float
    sim_in_flight: float  # median of the simulators' running + waiting over the middle of the run
    ramp_s: float | None = None  # until the simulator first held 90% of sim_in_flight
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def lines_per_s(self) -> float:
        return self.lines / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds


@dataclass
class Loop:
    """What a closed-loop run did."""

    seconds: float = 0.0
    output_tokens: int = 0
    retries: int = 0
    failures: list[str] = field(default_factory=list)


async def _closed_loop(url: str, bodies: Sequence[bytes], workers: int) -> Loop:
    limits = httpx.Limits(max_connections=CONNECTIONS_PER_CLIENT, max_keepalive_connections=CONNECTIONS_PER_CLIENT)
    tls = ssl.create_default_context()  # unused on http://, but httpx builds one per client unless given one
    clients = [
        httpx.AsyncClient(base_url=url, limits=limits, timeout=600.0, verify=tls)
        for _ in range(math.ceil(workers / CONNECTIONS_PER_CLIENT))
    ]
    headers = {"content-type": "application/json"}
    position = 0
    result = Loop()

    async def send(client: httpx.AsyncClient, body: bytes) -> str | None:
        """One request, sent again after a transport error; None when it succeeded, else why not."""
        error = ""
        for _attempt in range(MAX_ATTEMPTS):
            try:
                response = await client.post("/v1/chat/completions", content=body, headers=headers)
            except httpx.TransportError as exc:  # a dropped connection, seen rarely on this machine: send again
                result.retries += 1
                error = f"{type(exc).__name__}: {exc}"
                continue
            if response.status_code != 200:
                return f"{response.status_code}: {response.text[:200]}"
            result.output_tokens += orjson.loads(response.content)["usage"]["completion_tokens"]
            return None
        return error

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal position
        while position < len(bodies):
            body = bodies[position]
            position += 1
            if (error := await send(client, body)) is not None:
                result.failures.append(error)

    try:
        started = time.perf_counter()
        await asyncio.gather(*(worker(clients[w // CONNECTIONS_PER_CLIENT]) for w in range(workers)))
        result.seconds = time.perf_counter() - started
    finally:
        for client in clients:
            await client.aclose()
    return result


def run_ideal(children: Children, spec: SimSpec, bodies: Sequence[bytes], workers: int, name: str) -> Side:
    """The closed-loop client, in this process, against a fresh simulator."""
    with fresh_sims(children, {"sim": spec}) as sims:
        sim = sims["sim"]
        cpu_before, sim_cpu_before = time.process_time(), cpu_s(sim.process.pid)
        with Sampler({"sim": sim.in_flight}) as sampler:
            loop = asyncio.run(_closed_loop(sim.url, bodies, workers))
        cpu, sim_cpu = time.process_time() - cpu_before, cpu_s(sim.process.pid) - sim_cpu_before
    if loop.failures:
        raise RuntimeError(f"{name}: {len(loop.failures)} requests failed, e.g. {loop.failures[0]}")
    expected = sum(int(orjson.loads(body)["max_tokens"]) for body in bodies)
    if loop.output_tokens != expected:
        raise RuntimeError(f"{name}: {loop.output_tokens} output tokens, expected {expected}")
    steady = sampler.steady("sim", loop.seconds)
    ramp_s = sampler.reached("sim", 0.9 * steady)
    return Side(name, loop.seconds, len(bodies), expected, cpu, sim_cpu, steady, ramp_s, {"retries": loop.retries})


def run_cookbook(children: Children, spec: SimSpec, workload: Workload, workdir: Path, concurrency: int) -> Side:
    workdir.mkdir(parents=True, exist_ok=True)
    results, log = workdir / "results.jsonl", workdir / "cookbook.log"
    with fresh_sims(children, {"sim": spec}) as sims:
        sim = sims["sim"]
        argv = [
            sys.executable, str(COOKBOOK), "--requests", str(workload.path), "--results", str(results),
            "--base-url", sim.url, "--max-concurrency", str(concurrency),
            "--max-requests-per-minute", "1e12", "--max-tokens-per-minute", "1e15", "--timeout-s", "600",
        ]  # fmt: skip
        cpu_before, sim_cpu_before = children_cpu_s(), cpu_s(sim.process.pid)
        with Sampler({"sim": sim.in_flight}) as sampler:
            process = children.start(argv, log)
            if process.wait() != 0:
                raise RuntimeError(f"cookbook client exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        cpu, sim_cpu = children_cpu_s() - cpu_before, cpu_s(sim.process.pid) - sim_cpu_before
    seconds = float(orjson.loads(log.read_text().strip().splitlines()[-1])["seconds"])
    output = [orjson.loads(line) for line in results.read_bytes().splitlines()]
    check_results("cookbook", output, workload.ids)
    tokens = check_tokens("cookbook", output, workload.output_tokens)
    shutil.rmtree(workdir, ignore_errors=True)
    steady = sampler.steady("sim", seconds)
    ramp_s = sampler.reached("sim", 0.9 * steady)
    return Side("cookbook", seconds, len(workload.ids), tokens, cpu, sim_cpu, steady, ramp_s)


def backend_in_flight(client: httpx.Client, backend: str) -> Callable[[], float]:
    """backfill's `backfill_backend_in_flight` gauge of one backend, read from GET /metrics through `client`."""
    key = f'backfill_backend_in_flight{{backend="{backend}"}}'
    return lambda: prometheus(client.get("/metrics").text).get(key, 0.0)


def run_backfill(
    children: Children,
    specs: dict[str, SimSpec],
    workload: Workload,
    workdir: Path,
    backend: dict[str, Any],
    profile: Path | None = None,
) -> Side:
    """One batch through `backfill serve` whose pool has one backend per simulator (named by `specs`' keys).

    `extra["per_sim"]` has, for each simulator: `completed` (its /_stats), `output_tokens` (its /metrics),
    `sim_in_flight` and `own_in_flight` (medians as in Side), `max_own_in_flight` and `ramp_s`."""
    with fresh_sims(children, specs) as sims:
        backends = [
            {"name": name, "url": sim.url, "models": [MODEL], "flavour": "vllm", **backend}
            for name, sim in sims.items()
        ]
        server = Server.start_with(children, workdir, backends, {"max_lines": max(50_000, len(workload.ids))})
        try:
            file_id = server.upload(workload.path)["id"]
            sim_cpu_before = sum(cpu_s(sim.process.pid) for sim in sims.values())
            probes: dict[str, Callable[[], float]] = {}
            metrics_client = httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=30)
            for name, sim in sims.items():
                probes[f"sim:{name}"] = sim.in_flight
                probes[f"own:{name}"] = backend_in_flight(metrics_client, name)
            with metrics_client, profiled(children, server.pid, profile), Sampler(probes) as sampler:
                cpu_before = cpu_s(server.pid)
                started = time.perf_counter()
                batch = server.create_batch(file_id)
                while batch["status"] not in TERMINAL:
                    time.sleep(POLL_S)
                    batch = server.batch(batch["id"])
                seconds = time.perf_counter() - started
                cpu = cpu_s(server.pid) - cpu_before
            sim_cpu = sum(cpu_s(sim.process.pid) for sim in sims.values()) - sim_cpu_before
            if batch["status"] != "completed" or batch["error_file_id"] is not None:
                raise RuntimeError(f"backfill: batch ended {batch['status']}: {batch}")
            output = [orjson.loads(line) for line in server.content(batch["output_file_id"]).splitlines()]
            check_results("backfill", output, workload.ids)
            tokens = check_tokens("backfill", output, workload.output_tokens)
        except BaseException:
            sys.stderr.write(f"--- server log ({server.log_path}) ---\n{server.log_tail()}\n")
            raise
        finally:
            server.stop(children)
        per_sim: dict[str, dict[str, float]] = {}
        for name, sim in sims.items():
            steady = sampler.steady(f"sim:{name}", seconds)
            own = [v for _, v in sampler.samples[f"own:{name}"]]
            reached = sampler.reached(f"sim:{name}", 0.9 * steady)
            per_sim[name] = {
                "completed": float(sim.stats()["completed"]),
                "output_tokens": metric(sim.metrics(), "vllm:generation_tokens_total"),
                "sim_in_flight": steady,
                "own_in_flight": sampler.steady(f"own:{name}", seconds),
                "max_own_in_flight": max(own, default=0.0),
                "ramp_s": math.nan if reached is None else reached,
            }
    shutil.rmtree(workdir, ignore_errors=True)
    in_flight = sum(p["sim_in_flight"] for p in per_sim.values())
    ramp_s = next(iter(per_sim.values()))["ramp_s"] if len(per_sim) == 1 else None
    extra = {"per_sim": per_sim, "own_in_flight": sum(p["own_in_flight"] for p in per_sim.values())}
    return Side("backfill", seconds, len(workload.ids), tokens, cpu, sim_cpu, in_flight, ramp_s, extra)


# --- the sweep and the model's ceiling ------------------------------------------------------------------------------


def sweep(
    children: Children, spec: SimSpec, workload: Workload, lines: int, concurrencies: Sequence[int], label: str = ""
) -> dict[int, Side]:
    """The closed-loop client on the first `lines` lines at each concurrency, a fresh simulator for each."""
    results = {}
    for workers in concurrencies:
        side = run_ideal(children, spec, workload.bodies[:lines], workers, name=f"ideal N={workers}")
        results[workers] = side
        print(
            f"  sweep{label}: N={workers:<4} {side.lines_per_s:7.1f} lines/s  {side.tokens_per_s:8,.0f} tok/s  "
            f"(in flight at the simulator: {side.sim_in_flight:.0f})",
            flush=True,
        )
    return results


def best(results: dict[int, Side]) -> int:
    return max(results, key=lambda workers: results[workers].lines_per_s)


def model_ceiling(profile: EngineProfile, bodies: Sequence[bytes], workers: int) -> float:
    """Wall seconds (modelled x the profile's time scale) the engine model needs for `bodies` under a closed loop
    of `workers`, in virtual time: no CPU, no network, each request sent the instant the previous one ends."""
    model = EngineModel(profile)
    pending = iter(enumerate(bodies))
    now = 0.0

    def submit() -> None:
        item = next(pending, None)
        if item is None:
            return
        number, raw = item
        body = orjson.loads(raw)
        text = render_chat([(message["role"], message["content"]) for message in body["messages"]])
        prefix = text_prefix_hashes(text, profile.chars_per_token, profile.block_size)
        tokens = count_text_tokens(text, profile.chars_per_token)
        model.submit(SimRequest(f"r{number}", tokens, prefix, body["max_tokens"], arrival_s=now))

    for _ in range(workers):
        submit()
    while (step := model.step()) is not None:
        now += step.duration_s
        for event in step.events:
            if event.finish_reason is not None:
                submit()
    return now


# --- reporting ------------------------------------------------------------------------------------------------------


def fmt_optional(value: float | None, spec: str = ".0f") -> str:
    return "-" if value is None or math.isnan(value) else format(value, spec)


SIDE_HEADERS = ["side", "seconds", "lines/s", "output tok/s", "x ideal", "in flight", "ramp s", "CPU s", "sim CPU s"]


def side_rows(sides: Sequence[Side], reference: Side) -> list[list[str]]:
    return [
        [
            side.name,
            f"{side.seconds:.1f}",
            f"{side.lines_per_s:.1f}",
            f"{side.tokens_per_s:,.0f}",
            f"{side.lines_per_s / reference.lines_per_s:.3f}",
            f"{side.sim_in_flight:.0f}",
            fmt_optional(side.ramp_s, ".1f"),
            f"{side.cpu_s:.1f}",
            f"{side.sim_cpu_s:.1f}",
        ]
        for side in sides
    ]


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def median_side(runs: Sequence[Side]) -> Side:
    """The run with the median lines/s (the lower middle one of an even count)."""
    ordered = sorted(runs, key=lambda side: side.lines_per_s)
    return ordered[(len(ordered) - 1) // 2]


def report(workload: Workload, spec: SimSpec, sides: dict[str, list[Side]], ceiling_s: float) -> None:
    lines = len(workload.ids)
    rounds = len(sides["backfill"])
    print(
        f"\n{lines} lines, {workload.output_tokens:,} output tokens (ignore_eos), one simulator (default profile, "
        f"time scale {spec.time_scale}: rates are wall-clock, {1 / spec.time_scale:g}x the modelled ones); "
        f"median of {rounds} run(s)\n"
    )
    ideal, cookbook, ours = (median_side(sides[name]) for name in ("ideal", "cookbook", "backfill"))
    print(table(SIDE_HEADERS, side_rows([ideal, cookbook, ours], ideal)))
    print(
        "\nin flight: median of the simulator's running + waiting over the middle 60% of the run; "
        "ramp: seconds until it first reached 90% of that; CPU: the client's (the backfill server's)"
    )
    ceiling = lines / ceiling_s
    print(
        f"engine model alone (virtual time, no CPU, no network): {ceiling:.1f} lines/s; the ideal client reached "
        f"{ideal.lines_per_s / ceiling:.3f} of it, backfill {ours.lines_per_s / ceiling:.3f}"
    )
    retries = sum(side.extra.get("retries", 0) for side in sides["ideal"])
    print(f"ideal client: {retries} request(s) sent again after a transport error")
    own = ours.extra["per_sim"]["sim"]
    print(
        f"backfill's own backfill_backend_in_flight: median {own['own_in_flight']:.0f} over the middle 60%, "
        f"max {own['max_own_in_flight']:.0f}"
    )
    if rounds > 1:
        for name in ("ideal", "cookbook", "backfill"):
            print(f"{name} per run (lines/s): " + ", ".join(f"{side.lines_per_s:.1f}" for side in sides[name]))
    vs_ideal = ours.lines_per_s / ideal.lines_per_s
    vs_cookbook = ours.lines_per_s / cookbook.lines_per_s
    print(f"\nratio backfill / ideal: {vs_ideal:.3f}x  (goal >= 0.97x: {'met' if vs_ideal >= 0.97 else 'NOT met'})")
    print(f"ratio backfill / cookbook: {vs_cookbook:.2f}x  (goal > 1.0x: {'met' if vs_cookbook > 1 else 'NOT met'})")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=20_000, help="request lines in the batch (default 20,000)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2,000 lines, a 500-line sweep")
    parser.add_argument("--time-scale", type=float, default=0.25, help="the simulator's --time-scale (default 0.25)")
    parser.add_argument(
        "--sweep", type=int, nargs="+", default=[64, 128, 256, 384, 512], help="closed-loop concurrencies to try"
    )
    parser.add_argument("--sweep-lines", type=int, default=1500, help="lines per sweep point (default 1,500)")
    parser.add_argument("--cookbook-lines", type=int, default=3000, help="cookbook client's lines (default 3,000)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of the three sides, rotating their order")
    parser.add_argument("--max-concurrency", type=int, default=1024, help="backfill backend's max_concurrency")
    parser.add_argument("--initial-concurrency", type=int, help="backfill backend's initial_concurrency (default 16)")
    parser.add_argument("--profile", type=Path, help="py-spy the backfill server into this file (.svg, .json, .txt)")
    args = parser.parse_args(argv)
    lines = 2_000 if args.quick else args.lines
    sweep_lines = min(lines, 500 if args.quick else args.sweep_lines)
    print(machine_line())
    print(f"load average at start: {load_average()}", flush=True)
    spec = SimSpec(args.time_scale)
    backend: dict[str, Any] = {"max_concurrency": args.max_concurrency}
    if args.initial_concurrency is not None:
        backend["initial_concurrency"] = args.initial_concurrency
    tmp = Path(tempfile.mkdtemp(prefix="backfill-bench-saturation-"))
    sides: dict[str, list[Side]] = {"ideal": [], "cookbook": [], "backfill": []}
    try:
        workload = generate(tmp / "requests.jsonl", lines)
        cookbook_load = workload
        if args.cookbook_lines < lines:
            cookbook_load = generate(tmp / "cookbook-requests.jsonl", args.cookbook_lines)  # the same first lines
        with running() as children:
            print(f"sweep on the first {sweep_lines} lines (time scale {args.time_scale}):", flush=True)
            best_n = best(sweep(children, spec, workload, sweep_lines, args.sweep))
            ceiling_s = model_ceiling(spec.engine_profile(), workload.bodies, best_n) * args.time_scale
            print(f"engine model alone (virtual time), N={best_n}: {lines / ceiling_s:.1f} lines/s", flush=True)
            order = ["ideal", "cookbook", "backfill"]
            for run in range(args.repeat):
                for name in order[run % 3 :] + order[: run % 3]:
                    if name == "ideal":
                        side = run_ideal(children, spec, workload.bodies, best_n, f"ideal closed loop, N={best_n}")
                    elif name == "cookbook":
                        side = run_cookbook(children, spec, cookbook_load, tmp / f"cookbook{run}", best_n)
                        side.name = f"cookbook client, N={best_n}" + (
                            f" ({side.lines:,} lines)" if side.lines != lines else ""
                        )
                    else:
                        profile = args.profile if run == 0 else None
                        work = tmp / f"backfill{run}"
                        side = run_backfill(children, {"sim": spec}, workload, work, backend, profile)
                        side.name = "backfill: create -> completed"
                    sides[name].append(side)
                    print(f"run {run + 1}: {name} {side.lines_per_s:.1f} lines/s ({side.seconds:.1f} s)", flush=True)
        report(workload, spec, sides, ceiling_s)
        if args.profile:
            print(f"profile of the backfill server (run 1): {args.profile}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"load average at end: {load_average()}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
