"""What the interactive proxy adds to time to first token: real processes, wall clock, side by side in one run.

A real `backfill sim serve` (default profile, real time: `--time-scale 1`, so each engine step takes as long as
on the modelled H100) and a real `backfill serve` (role all, open mode, SQLite, one `[[backends]]` entry: the sim,
flavour vllm). A slice of the Azure conversation trace (bench/data, CC-BY 4.0) is replayed open-loop as streamed
chat requests at the trace's own arrival times (`--speed` compresses them), each request sent at random either
straight to the engine or through the proxy, interleaved, so both arms meet the same engine state. TTFT is
measured here, from just before a request is sent to the first chunk whose delta carries content (the role-only
opening chunk does not count).

The slice is replayed twice per phase with every request's arm swapped the second time (a crossover): both arms
then hold the same prompts, whose lengths would otherwise decide more of a quantile than the proxy does. Two
phases: no batch; then a batch running through the dispatcher in the same process (uploaded and created over
HTTP, long enough to outlast the phase). Printed per phase: p50 / p99 TTFT of each arm and their differences; the
median per-request difference; the load generator's lag behind its schedule (how late each request went out) and
its event loop's stalls, so that a slow generator shows; each process's CPU.

Goal (issue 15): through the proxy, p50 within 5 ms and p99 within 25 ms of straight to the engine, both phases.

    .venv/bin/python bench/proxy_overhead.py                        # 2 phases x 2 replays x 60 s, ~5 min
    .venv/bin/python bench/proxy_overhead.py --seconds 20           # a smoke run, not a figure
    .venv/bin/python bench/proxy_overhead.py --profile-dir /tmp/p   # py-spy flame graphs of backfill serve
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson
import uvloop
from harness import REPO, Children, Server, cpu_s, machine_line, profiled, running, table

from backfill.sim.profile import EngineProfile
from backfill.sim.shared_engine import TraceRequest, load_trace
from backfill.testing.processes import free_port, wait_http

TRACE = REPO / "bench" / "data" / "azure_llm_2023_conv.csv"
ARMS = ("direct", "proxy")
MAX_PROMPT_TOKENS = 6000  # the default profile's context is 8192 tokens: prompt + output must fit
TICK_S = 0.005  # the generator's loop-stall probe
TWIN_TAIL_S = 0.025  # the p99 goal: how many twins differ by more than it, each way


@dataclass
class Sample:
    n: int  # the request's place in the slice: the same n in the other arm is its twin
    arm: str
    ttft_s: float | None  # None: no content arrived (an error)
    headers_s: float  # until the answer's headers arrived
    lag_s: float  # how late the request went out, behind its schedule


@dataclass
class Phase:
    name: str
    samples: list[Sample] = field(default_factory=list)
    stalls_s: list[float] = field(default_factory=list)  # how late each TICK_S sleep of the generator woke
    cpu: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0
    note: str = ""

    def ttft(self, arm: str) -> list[float]:
        return sorted(s.ttft_s for s in self.samples if s.arm == arm and s.ttft_s is not None)

    def paired_differences(self) -> list[float]:
        """Proxy minus direct TTFT of the same trace request (one replay each), sorted."""
        by_arm: dict[str, dict[int, float]] = {arm: {} for arm in ARMS}
        for s in self.samples:
            if s.ttft_s is not None:
                by_arm[s.arm][s.n] = s.ttft_s
        return sorted(by_arm["proxy"][n] - by_arm["direct"][n] for n in by_arm["proxy"].keys() & by_arm["direct"])

    def errors(self) -> int:
        return sum(1 for s in self.samples if s.ttft_s is None)


def quantile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def chat_body(model: str, prompt_tokens: int, output_tokens: int, tag: str, chars_per_token: int) -> bytes:
    """A streamed chat request of about `prompt_tokens` (the sim's tokenizer: characters / chars_per_token) whose
    answer is `output_tokens` long; `tag` up front keeps prompts from sharing a cached prefix."""
    prompt = min(prompt_tokens, MAX_PROMPT_TOKENS)
    chars = prompt * chars_per_token
    text = (tag + " " + "lorem ipsum dolor sit amet " * (chars // 27 + 1))[:chars]
    body = {
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max(1, min(output_tokens, 8000 - prompt)),
        "ignore_eos": True,  # the trace's output length, not the sim's draw
        "stream": True,
    }
    return orjson.dumps(body)


def has_content(buffer: bytes) -> bool:
    """Whether an SSE event with a non-empty delta content has arrived in `buffer`."""
    for line in buffer.split(b"\n"):
        if line.startswith(b"data:") and b'"content":"' in line:
            try:
                event = orjson.loads(line[5:])
            except orjson.JSONDecodeError:
                continue  # an event cut by the chunk boundary: the next chunk completes it
            for choice in event.get("choices") or ():
                if (choice.get("delta") or {}).get("content"):
                    return True
    return False


async def one_request(client: httpx.AsyncClient, url: str, body: bytes, n: int, arm: str, due: float) -> Sample:
    lag = time.perf_counter() - due
    started = time.perf_counter()
    ttft, headers = None, float("nan")
    buffer = b""
    try:
        async with client.stream("POST", url, content=body) as response:
            headers = time.perf_counter() - started
            async for chunk in response.aiter_raw():
                if ttft is None:
                    buffer += chunk
                    if has_content(buffer):
                        ttft = time.perf_counter() - started
                        buffer = b""
            if response.status_code != 200:
                print(f"  {arm} request answered {response.status_code}: {buffer[:300]!r}", file=sys.stderr)
                ttft = None
    except httpx.HTTPError as exc:
        print(f"  {arm} request failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        ttft = None
    return Sample(n, arm, ttft, headers, lag)


async def replay(
    phase: Phase, trace: list[TraceRequest], arms: list[str], speed: float, targets: dict[str, str], model: str
) -> None:
    """Every request of `trace` at its time (seconds from the slice's start, / speed), request n to `arms[n]`."""
    profile = EngineProfile()
    start_at = trace[0].at_s
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    headers = {"content-type": "application/json"}
    clients = {arm: httpx.AsyncClient(limits=limits, timeout=600, headers=headers) for arm in ARMS}
    planned = []
    for n, (request, arm) in enumerate(zip(trace, arms, strict=True)):
        tag = f"{phase.name} {len(phase.samples)} {n} {random.getrandbits(64):x}"  # no two prompts share a prefix
        body = chat_body(model, request.prompt_tokens, request.output_tokens, tag, profile.chars_per_token)
        planned.append(((request.at_s - start_at) / speed, n, arm, body))
    stop = asyncio.Event()

    async def probe_stalls() -> None:
        while not stop.is_set():
            before = time.perf_counter()
            await asyncio.sleep(TICK_S)
            phase.stalls_s.append(time.perf_counter() - before - TICK_S)

    prober = asyncio.create_task(probe_stalls())
    tasks = []
    t0 = time.perf_counter() + 0.2
    for offset, n, arm, body in planned:
        due = t0 + offset
        if (wait := due - time.perf_counter()) > 0:
            await asyncio.sleep(wait)
        tasks.append(asyncio.create_task(one_request(clients[arm], targets[arm], body, n, arm, due)))
    phase.samples += await asyncio.gather(*tasks)
    stop.set()
    await prober
    for client in clients.values():
        await client.aclose()


@contextmanager
def cpu_of(phase: Phase, pids: dict[str, int]) -> Iterator[None]:
    before = {name: cpu_s(pid) for name, pid in pids.items()}
    here, wall = time.process_time(), time.perf_counter()
    yield
    phase.wall_s = time.perf_counter() - wall
    phase.cpu = {name: cpu_s(pid) - before[name] for name, pid in pids.items()}
    phase.cpu["load generator"] = time.process_time() - here


def batch_lines(path: Path, lines: int, model: str, chars_per_token: int) -> Path:
    """Batch lines of ~500 prompt tokens and 1,024 output tokens: a backlog that outlasts a phase."""
    with path.open("wb") as out:
        for n in range(lines):
            body = orjson.loads(chat_body(model, 500, 1024, f"batch line {n}", chars_per_token))
            del body["stream"]
            line = {"custom_id": f"line-{n}", "method": "POST", "url": "/v1/chat/completions", "body": body}
            out.write(orjson.dumps(line) + b"\n")
    return path


def start_sim(children: Children, workdir: Path) -> tuple[int, str]:
    port = free_port()
    argv = [sys.executable, "-m", "backfill", "sim", "serve", "--port", str(port), "--time-scale", "1"]
    process = children.start(argv, workdir / "sim.log")
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/health", process)
    return process.pid, url


def start_batch(server: Server, workdir: Path, lines: int, model: str) -> str:
    path = batch_lines(workdir / "batch.jsonl", lines, model, EngineProfile().chars_per_token)
    batch = server.create_batch(server.upload(path)["id"])
    deadline = time.monotonic() + 60
    while (batch := server.batch(batch["id"]))["request_counts"]["completed"] < 1:
        if time.monotonic() > deadline or batch["status"] in ("failed", "expired", "cancelled", "completed"):
            raise RuntimeError(f"the batch did not get going: {batch['status']} {batch.get('errors')}")
        time.sleep(0.25)  # until a first line has come back: the dispatcher is at work
    return str(batch["id"])


def run_phase(
    name: str, args: argparse.Namespace, trace: list[TraceRequest], targets: dict[str, str], pids: dict[str, int],
    children: Children,
) -> Phase:  # fmt: skip
    phase = Phase(name)
    rng = random.Random(args.seed)
    arms = [rng.choice(ARMS) for _ in trace]
    flame = args.profile_dir / f"serve-{name.replace(' ', '-')}.{args.profile_format}" if args.profile_dir else None
    with profiled(children, pids["backfill serve"], flame) if flame else nullcontext(), cpu_of(phase, pids):
        for _ in range(args.replays):
            uvloop.run(replay(phase, trace, arms, args.speed, targets, EngineProfile().model))
            arms = [ARMS[1 - ARMS.index(arm)] for arm in arms]  # the other arm next time: a crossover
    return phase


def report(phases: list[Phase], rate: float) -> None:
    rows = []
    for phase in phases:
        direct, proxy = phase.ttft("direct"), phase.ttft("proxy")
        cells = [phase.name, f"{len(direct)}/{len(proxy)}"]
        for q in (0.5, 0.99):
            d, p = quantile(direct, q) * 1000, quantile(proxy, q) * 1000
            cells += [f"{d:.0f}", f"{p:.0f}", f"{p - d:+.1f}"]
        twins = sorted(phase.paired_differences())
        slower = sum(1 for d in twins if d > TWIN_TAIL_S) / max(len(twins), 1)
        faster = sum(1 for d in twins if d < -TWIN_TAIL_S) / max(len(twins), 1)
        rows.append([*cells, f"{quantile(twins, 0.5) * 1000:+.1f}", f"{slower:.1%} / {faster:.1%}"])
    print()
    header = [
        "phase",
        "n direct/proxy",
        "p50 direct",
        "p50 proxy",
        "p50 diff",
        "p99 direct",
        "p99 proxy",
        "p99 diff",
        "twin diff p50",
        f"twins > +{TWIN_TAIL_S * 1000:.0f} / < -{TWIN_TAIL_S * 1000:.0f} ms",
    ]
    print(table(header, rows))
    print(
        "\nTTFT in ms, client side; goal: p50 diff <= 5 ms and p99 diff <= 25 ms in both phases."
        "\ntwin diff: proxy minus direct TTFT of the same trace request (sent once each way), its median; then the"
        "\nshare of requests slower through the proxy than direct by more than the p99 goal, and faster by as much"
        "\n(the engine's own noise between replays is on both sides; what the proxy adds is on one).\n"
    )
    rows = []
    for phase in phases:
        lags = sorted(s.lag_s for s in phase.samples)
        stalls = sorted(phase.stalls_s)
        cpu = ", ".join(f"{name} {seconds / phase.wall_s:.0%}" for name, seconds in phase.cpu.items())
        headers = {arm: sorted(s.headers_s for s in phase.samples if s.arm == arm) for arm in ARMS}
        rows.append([
            phase.name,
            f"{quantile(headers['direct'], 0.5) * 1000:.1f} / {quantile(headers['proxy'], 0.5) * 1000:.1f}",
            f"{quantile(lags, 0.5) * 1000:.1f} / {quantile(lags, 0.99) * 1000:.1f} / {lags[-1] * 1000:.1f}",
            f"{quantile(stalls, 0.99) * 1000:.1f} / {stalls[-1] * 1000:.1f}",
            str(phase.errors()),
            cpu,
        ])  # fmt: skip
    header = [
        "phase", "headers p50 direct/proxy ms", "send lag p50/p99/max ms", "loop stall p99/max ms", "errors",
        "CPU (of one core)",
    ]  # fmt: skip
    print(table(header, rows))
    for phase in phases:
        if phase.note:
            print(f"{phase.name}: {phase.note}")
    print(f"\nrate {rate:.2f} requests/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="wall seconds of trace per replay")
    parser.add_argument("--start-minute", type=float, default=20.0, help="where the slice starts in the trace")
    parser.add_argument("--speed", type=float, default=1.0, help="trace time / wall time (1: the trace's rate)")
    parser.add_argument("--batch-lines", type=int, default=400)
    parser.add_argument("--batch-concurrency", type=int, default=32, help="the backend's max_concurrency")
    parser.add_argument("--phases", nargs="+", choices=("no-batch", "batch"), default=["no-batch", "batch"])
    parser.add_argument("--profile-dir", type=Path, help="write py-spy flame graphs of backfill serve here")
    parser.add_argument("--profile-format", choices=("svg", "txt", "json"), default="svg", help="txt: collapsed stacks")
    parser.add_argument("--replays", type=int, default=2, help="of the slice per phase, each arm swapped every time")
    parser.add_argument("--workdir", type=Path, help="keep the servers' logs and data here (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=15)
    parser.add_argument("--trace", type=Path, default=TRACE)
    args = parser.parse_args()

    start = args.start_minute * 60
    trace = [r for r in load_trace(args.trace) if start <= r.at_s < start + args.seconds * args.speed]
    rate = len(trace) / args.seconds
    prompt = sum(r.prompt_tokens for r in trace) / len(trace)
    output = sum(r.output_tokens for r in trace) / len(trace)
    print(machine_line())
    print(
        f"trace {args.trace.name}: {len(trace)} requests from minute {args.start_minute:g}, x{args.speed:g} ->"
        f" {rate:.2f}/s for {args.seconds:g} s, {args.replays} replays per phase;"
        f" mean prompt {prompt:.0f}, output {output:.0f} tokens",
        flush=True,
    )
    phases = []
    with running() as children, tempfile.TemporaryDirectory(prefix="proxy-overhead-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        sim_pid, sim_url = start_sim(children, workdir)
        model = EngineProfile().model
        backend = {
            "name": "sim", "url": f"{sim_url}/v1", "models": [model], "flavour": "vllm",
            "max_concurrency": args.batch_concurrency,
        }  # fmt: skip
        server = Server.start_with(children, workdir / "serve", [backend])
        wait_http(f"http://127.0.0.1:{server.port}/readyz", server.process)
        targets = {
            "direct": f"{sim_url}/v1/chat/completions",
            "proxy": f"http://127.0.0.1:{server.port}/v1/chat/completions",
        }
        pids = {"backfill serve": server.pid, "sim": sim_pid}
        # A fresh server builds each route's state on its first request (FastAPI: ~0.1 s, the loop stopped): not
        # what a running server's users see, so a few requests each way go first, unmeasured.
        warmup = [TraceRequest(n * 0.05, 100, 4) for n in range(8)]
        uvloop.run(replay(Phase("warm-up"), warmup, [ARMS[n % 2] for n in range(8)], 1.0, targets, model))
        if "no-batch" in args.phases:
            phases.append(run_phase("no batch", args, trace, targets, pids, children))
            print(f"  no batch: done in {phases[-1].wall_s:.0f} s", flush=True)
        if "batch" in args.phases:
            batch_id = start_batch(server, workdir, args.batch_lines, model)
            before = server.batch(batch_id)["request_counts"]["completed"]
            phases.append(run_phase("batch running", args, trace, targets, pids, children))
            after = server.batch(batch_id)
            phases[-1].note = (
                f"batch lines completed during the phase: {after['request_counts']['completed'] - before}"
                f" (of {args.batch_lines}); batch {after['status']} at its end"
            )
            print(f"  batch running: done in {phases[-1].wall_s:.0f} s", flush=True)
        server.stop(children)
    report(phases, rate)
    if args.profile_dir:
        print(f"flame graphs in {args.profile_dir}")


if __name__ == "__main__":
    sys.exit(main())
