"""A pure, steppable model of a continuous-batching LLM engine: vLLM V1's scheduler, in token counts.

No I/O and no clock: ``step()`` runs one engine iteration and says how long it would have taken
(``profile.py`` has the formula). The real-time server sleeps that long; a virtual-time simulation adds it up.

One iteration, as vLLM V1 schedules it:

1. Running sequences first, in admission order: each gets the tokens it still lacks (1 for a decode, the rest
   of its prompt for a chunked prefill), within the iteration's token budget (``max_num_batched_tokens``).
   A sequence holds ceil(tokens in KV / block_size) KV blocks; when it needs a block and none is free, the
   latest-admitted running sequence (under the "priority" policy: the one with the largest
   (priority, arrival)) is preempted: its blocks are freed and it goes back to the front of the queue, to be
   recomputed from scratch (prompt and the tokens generated so far).
2. Then waiting requests are admitted, FCFS or by (priority, arrival) (lower first, as in vLLM), while
   sequences < ``max_num_seqs``, budget remains and the KV blocks for their first chunk are free; the head of
   the queue blocks those behind it. No admission happens in an iteration that preempted.
   Under the "priority" policy a waiting request that cannot be admitted also preempts running sequences
   of lower priority, before step 1.
3. Each sequence whose KV is complete after the iteration samples one token: its first token comes with the
   iteration that completes its prefill.

Prefix cache (``kv_cache.py``): a request's full prompt blocks carry chained hashes; on admission, the leading
blocks found in the cache are not prefilled, and count as the request's cached tokens.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from dataclasses import dataclass
from typing import Literal, NamedTuple

from backfill.sim.kv_cache import KVCache
from backfill.sim.profile import EngineProfile

FinishReason = Literal["stop", "length"]

_WAITING, _RUNNING, _DONE = 0, 1, 2


@dataclass(frozen=True, slots=True)
class SimRequest:
    """A request as the engine sees it: token counts, never token ids."""

    id: str
    prompt_tokens: int
    prefix_blocks: tuple[int, ...]  # chained hashes of the prompt's full blocks (see tokens.py)
    output_tokens: int  # exactly this many tokens are generated; 0: prefill only (embeddings)
    priority: int = 0  # lower runs first under the "priority" policy
    arrival_s: float = 0.0  # orders requests of equal priority
    finish_reason: FinishReason = "stop"  # reported with the last token


class TokenEvent(NamedTuple):
    """What one iteration produced for one request (a tuple: iterations make many of these)."""

    request_id: str
    num_tokens: int  # 1, or 0 when a prefill-only request completes
    is_first_token: bool
    finish_reason: FinishReason | None  # set on the request's last event
    cached_tokens: int  # prompt tokens found in the prefix cache when the request was first admitted

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True, slots=True)
class StepResult:
    """One iteration: its modelled duration, the tokens it produced, and the work that set its duration."""

    duration_s: float
    events: tuple[TokenEvent, ...]
    prefill_tokens: int
    decode_seqs: int
    context_tokens: int


@dataclass(slots=True)
class EngineTotals:
    """Counters since the model was made; the model writes them, everyone else only reads."""

    steps: int = 0
    busy_s: float = 0.0
    prompt_tokens: int = 0  # of requests whose prefill completed
    generation_tokens: int = 0
    prefix_cache_queries: int = 0  # tokens looked up in the prefix cache on admission
    prefix_cache_hits: int = 0
    preemptions: int = 0
    finished_stop: int = 0
    finished_length: int = 0
    aborted: int = 0


class _Seq:
    """A request's state in the engine."""

    __slots__ = ("cached_tokens", "computed", "generated", "order", "private", "request", "shared", "state")

    def __init__(self, request: SimRequest, order: int) -> None:
        self.request = request
        self.order = order  # submission order: the last tie-breaker
        self.state = _WAITING
        self.computed = 0  # tokens in the KV cache
        self.generated = 0
        self.shared = 0  # leading blocks held as prefix-cache references: request.prefix_blocks[:shared]
        self.private = 0  # other blocks held
        self.cached_tokens = -1  # set on first admission

    @property
    def num_tokens(self) -> int:
        return self.request.prompt_tokens + self.generated

    def priority_key(self) -> tuple[int, float, int]:
        return self.request.priority, self.request.arrival_s, self.order


class EngineModel:
    """The engine's scheduler and KV cache; ``step()`` runs one iteration."""

    def __init__(self, profile: EngineProfile) -> None:
        self.profile = profile
        self.totals = EngineTotals()
        self._kv = KVCache(profile.num_gpu_blocks, profile.block_size, profile.enable_prefix_caching)
        self._block_size = profile.block_size
        self._by_priority = profile.scheduling_policy == "priority"
        self._seqs: dict[str, _Seq] = {}  # waiting or running, by request id
        self._running: list[_Seq] = []  # in admission order
        self._waiting = _WaitQueue(self._by_priority)
        self._order = itertools.count()

    # --- load ----------------------------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def kv_cache_usage(self) -> float:
        """Share of KV blocks held by sequences (cached blocks nobody holds count as free, as in vLLM)."""
        return self._kv.used_blocks / self.profile.num_gpu_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks in the prefix cache, held or evictable."""
        return self._kv.cached_blocks

    def is_idle(self) -> bool:
        return not self._seqs

    # --- requests ------------------------------------------------------------------------------------------

    def submit(self, request: SimRequest) -> None:
        """Queue a request; raises ValueError for a duplicate id or a request that could never fit."""
        if request.id in self._seqs:
            raise ValueError(f"request {request.id!r} is already in the engine")
        if request.prompt_tokens < 1 or request.output_tokens < 0:
            raise ValueError("a request needs at least one prompt token and a non-negative output length")
        if request.prompt_tokens + request.output_tokens > self.profile.kv_capacity_tokens:
            raise ValueError(f"request {request.id!r} needs more tokens than the KV cache holds")
        if len(request.prefix_blocks) > request.prompt_tokens // self._block_size:
            raise ValueError(f"request {request.id!r} has more prefix hashes than full prompt blocks")
        seq = _Seq(request, next(self._order))
        self._seqs[request.id] = seq
        self._waiting.push(seq)

    def abort(self, request_id: str) -> bool:
        """Drop a waiting or running request and free its blocks; False when it is not in the engine."""
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return False
        if seq.state == _RUNNING:
            self._release(seq)
            self._running.remove(seq)
        else:
            self._waiting.forget()
        seq.state = _DONE
        self.totals.aborted += 1
        return True

    # --- one iteration -------------------------------------------------------------------------------------

    def step(self) -> StepResult | None:
        """Schedule and run one iteration; None when no request is waiting or running."""
        if not self._seqs:
            return None
        if self._by_priority:
            self._preempt_for_waiting()
        scheduled: dict[_Seq, int] = {}  # sequence -> tokens computed this iteration
        budget, preempted = self._schedule_running(scheduled)
        if not preempted:
            self._admit_waiting(scheduled, budget)
        return self._execute(scheduled)

    def _schedule_running(self, scheduled: dict[_Seq, int]) -> tuple[int, bool]:
        budget = self.profile.max_num_batched_tokens
        block_size = self._block_size
        preemptions_before = self.totals.preemptions
        for seq in tuple(self._running):  # the hot loop: mostly decodes, so plain arithmetic, no calls
            if budget == 0:
                break
            if seq.state != _RUNNING:  # preempted for an earlier one in this loop
                continue
            num_new = seq.request.prompt_tokens + seq.generated - seq.computed
            if num_new > budget:
                num_new = budget
            needed = -(-(seq.computed + num_new) // block_size) - seq.shared - seq.private
            if needed > 0:
                freed_budget, is_running = self._make_room(seq, needed, scheduled)
                budget += freed_budget
                if not is_running:
                    continue
            scheduled[seq] = num_new
            budget -= num_new
        return budget, self.totals.preemptions != preemptions_before

    def _make_room(self, seq: _Seq, needed: int, scheduled: dict[_Seq, int]) -> tuple[int, bool]:
        """Allocate ``needed`` blocks to ``seq``, preempting as needed: (budget given back, is seq still running)."""
        freed_budget = 0
        while needed > self._kv.free_blocks:
            victim = self._pick_victim()
            self._preempt(victim)
            freed_budget += scheduled.pop(victim, 0)
            if victim is seq:
                return freed_budget, False
        self._allocate(seq, needed)
        return freed_budget, True

    def _admit_waiting(self, scheduled: dict[_Seq, int], budget: int) -> None:
        while budget > 0 and len(self._running) < self.profile.max_num_seqs:
            seq = self._waiting.peek()
            if seq is None:
                return
            hits, num_new, blocks_wanted = self._admission(seq, budget)
            if blocks_wanted > self._kv.free_blocks:
                return
            self._waiting.pop()
            self._kv.hold(seq.request.prefix_blocks, hits)
            seq.shared = hits
            computed = hits * self._block_size
            self._allocate(seq, self._kv.blocks_for(computed + num_new) - hits)
            if self._kv.prefix_caching:
                self.totals.prefix_cache_queries += seq.num_tokens
                self.totals.prefix_cache_hits += computed
            if seq.cached_tokens < 0:
                seq.cached_tokens = computed
            seq.computed = computed
            seq.state = _RUNNING
            self._running.append(seq)
            scheduled[seq] = num_new
            budget -= num_new

    def _admission(self, seq: _Seq, budget: int) -> tuple[int, int, int]:
        """Admitting ``seq`` now: its prefix-cache hits (blocks), first chunk (tokens), and free blocks it takes."""
        # A full hit still computes the prompt's last token, whose logits the first output token is sampled from.
        max_hits = (seq.num_tokens - 1) // self._block_size
        hits, from_evictable = self._kv.lookup(seq.request.prefix_blocks, max_hits)
        computed = hits * self._block_size
        num_new = min(seq.num_tokens - computed, budget)
        return hits, num_new, self._kv.blocks_for(computed + num_new) - hits + from_evictable

    def _preempt_for_waiting(self) -> None:
        """Priority policy: make room for the best waiting request by preempting running ones it outranks."""
        while self._running:
            best = self._waiting.peek()
            if best is None:
                return
            victim = self._pick_victim()
            if best.priority_key() >= victim.priority_key():
                return
            if len(self._running) < self.profile.max_num_seqs:
                blocks_wanted = self._admission(best, self.profile.max_num_batched_tokens)[2]
                if blocks_wanted <= self._kv.free_blocks:
                    return
            self._preempt(victim)

    def _execute(self, scheduled: dict[_Seq, int]) -> StepResult:
        totals = self.totals
        caching = self._kv.prefix_caching
        prefill_tokens = decode_seqs = context_tokens = generated_tokens = 0
        events: list[TokenEvent] = []
        any_finished = False
        for seq, num_new in scheduled.items():  # the hot loop again
            request = seq.request
            generated = seq.generated
            context_tokens += seq.computed
            seq.computed += num_new
            if num_new == 1 and generated and seq.computed == request.prompt_tokens + generated:
                decode_seqs += 1
            else:
                prefill_tokens += num_new
                if caching and seq.shared < len(request.prefix_blocks):
                    self._share_full_blocks(seq)
                if seq.computed < request.prompt_tokens + generated:
                    continue  # a prefill chunk that does not complete the prompt samples nothing
                if generated == 0:
                    totals.prompt_tokens += request.prompt_tokens
                if request.output_tokens == 0:
                    events.append(TokenEvent(request.id, 0, False, request.finish_reason, seq.cached_tokens))
                    self._finish(seq, request.finish_reason)
                    any_finished = True
                    continue
            generated += 1
            seq.generated = generated
            generated_tokens += 1
            if generated == request.output_tokens:
                events.append(TokenEvent(request.id, 1, generated == 1, request.finish_reason, seq.cached_tokens))
                self._finish(seq, request.finish_reason)
                any_finished = True
            else:
                events.append(TokenEvent(request.id, 1, generated == 1, None, seq.cached_tokens))
        if any_finished:
            self._running = [seq for seq in self._running if seq.state == _RUNNING]
        profile = self.profile
        duration_s = (
            profile.iteration_base_s
            + profile.prefill_token_s * prefill_tokens
            + profile.decode_seq_s * decode_seqs
            + profile.kv_token_s * context_tokens
        )
        totals.steps += 1
        totals.busy_s += duration_s
        totals.generation_tokens += generated_tokens
        return StepResult(duration_s, tuple(events), prefill_tokens, decode_seqs, context_tokens)

    def _finish(self, seq: _Seq, reason: FinishReason) -> None:
        self._release(seq)
        seq.state = _DONE
        del self._seqs[seq.request.id]
        if reason == "stop":
            self.totals.finished_stop += 1
        else:
            self.totals.finished_length += 1

    # --- KV blocks -----------------------------------------------------------------------------------------

    def _allocate(self, seq: _Seq, count: int) -> None:
        if count > 0:
            self._kv.allocate(count)
            seq.private += count

    def _release(self, seq: _Seq) -> None:
        self._kv.release(seq.request.prefix_blocks, seq.shared, seq.private)
        seq.shared = seq.private = seq.computed = 0

    def _share_full_blocks(self, seq: _Seq) -> None:
        """Put the prompt blocks this iteration completed in the prefix cache."""
        full = min(seq.computed // self._block_size, len(seq.request.prefix_blocks))
        if full > seq.shared:
            self._kv.register(seq.request.prefix_blocks, seq.shared, full)
            seq.private -= full - seq.shared
            seq.shared = full

    def _pick_victim(self) -> _Seq:
        if self._by_priority:
            return max(self._running, key=_Seq.priority_key)
        return self._running[-1]

    def _preempt(self, seq: _Seq) -> None:
        self._release(seq)
        self._running.remove(seq)
        seq.state = _WAITING
        self._waiting.push_front(seq)
        self.totals.preemptions += 1


class _WaitQueue:
    """Requests waiting for admission: FCFS with preempted ones at the front, or a heap by (priority, arrival).

    An aborted request's entry stays until it reaches the front, where it is skipped: removal stays O(1).
    """

    def __init__(self, by_priority: bool) -> None:
        self._by_priority = by_priority
        self._fifo: deque[_Seq] = deque()
        self._heap: list[tuple[int, float, int, _Seq]] = []
        self._live = 0

    def __len__(self) -> int:
        return self._live

    def push(self, seq: _Seq) -> None:
        self._live += 1
        if self._by_priority:
            heapq.heappush(self._heap, (*seq.priority_key(), seq))
        else:
            self._fifo.append(seq)

    def push_front(self, seq: _Seq) -> None:
        if self._by_priority:  # its key puts it back in its place
            self.push(seq)
        else:
            self._live += 1
            self._fifo.appendleft(seq)

    def forget(self) -> None:
        """One waiting request was aborted (and marked done)."""
        self._live -= 1

    def peek(self) -> _Seq | None:
        if self._by_priority:
            heap = self._heap
            while heap and heap[0][3].state != _WAITING:
                heapq.heappop(heap)
            return heap[0][3] if heap else None
        fifo = self._fifo
        while fifo and fifo[0].state != _WAITING:
            fifo.popleft()
        return fifo[0] if fifo else None

    def pop(self) -> None:
        """Remove the request ``peek()`` returned."""
        if self._by_priority:
            heapq.heappop(self._heap)
        else:
            self._fifo.popleft()
        self._live -= 1
