"""LlamaEngine: continuous batching over llama.cpp's batch API, several sequences per forward pass.

One worker thread owns the llama.cpp context. Each request gets a sequence id (a slot); every step builds one
`llama_batch` holding the prompt tokens of newly admitted sequences and the last sampled token of every running
one, runs one `llama_decode`, and samples each sequence from its own logits row with its own sampler chain
(temperature, top-p, seed). A finished or abandoned sequence frees its slot at once, so a new request joins the
next step: throughput grows with the number of requests in flight, up to `slots`. The slot keeps the KV of the
prompt it served; a new prompt takes the free slot whose kept prompt shares the longest start with it and decodes
only the rest (a batch's lines mostly share a system prompt and instructions).

With several slots the weights come from a one-time conversion of the shipped GGUF to Q8_0 (`weights.py`): Q4_1,
as shipped, has no batched matrix-multiply kernel on x86, so batching it gains little. ctypes releases the GIL
around every llama.cpp call, so the event loop keeps running while the thread decodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import math
import os
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import structlog

from backfill.backends.embedded.shapes import BadRequest, Generation, Sampling, TokenLogprob
from backfill.backends.embedded.weights import WeightType, prepared_gguf, resolve

log = structlog.get_logger(__name__)
_MAX_PIECE = 256
# llama.cpp's llama_token_data (id, logit, p), as numpy lays it out: a whole vocabulary's candidates in one array.
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


def _ignore_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    """llama.cpp logs every tensor it loads to stderr; backfill has its own logs."""


_QUIET = llama_cpp.llama_log_callback(_ignore_log)  # kept referenced: llama.cpp calls it from C


@dataclass
class _Job:
    text: str
    sampling: Sampling
    future: asyncio.Future[Generation]
    loop: asyncio.AbstractEventLoop
    tokens: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    seq: int = -1
    pos: int = 0
    fed: int = 0  # prompt tokens already decoded
    generated: list[int] = field(default_factory=list)
    text_out: bytearray = field(default_factory=bytearray)
    sampler: Any = None
    grammar: Any = None  # the output format's grammar sampler, checked after the chain (see `_sample`)
    logits_index: int = -1
    logprobs: list[TokenLogprob] = field(default_factory=list)  # per generated token, when asked for

    def resolve(self, result: Generation | BaseException) -> None:
        def settle() -> None:
            if self.future.done():
                return
            if isinstance(result, BaseException):
                self.future.set_exception(result)
            else:
                self.future.set_result(result)

        self.loop.call_soon_threadsafe(settle)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class LlamaEngine:
    """Chat and text generation with a GGUF model, `slots` sequences at a time."""

    def __init__(
        self,
        model_path: Path,
        *,
        slots: int = 8,
        context_per_slot: int = 2048,
        threads: int | None = None,
        weights: WeightType = "auto",
        cache_dir: Path | None = None,
        name: str | None = None,
    ):
        """`name`: the model's name in the log (default: the file's)."""
        self.model_path = model_path
        self.name = name or model_path.stem
        self.weights: WeightType = weights
        self.cache_dir = cache_dir
        self.loaded_path: Path | None = None  # the GGUF actually loaded: model_path or its cached conversion
        self.reuse_prefix = True  # a slot keeps its last prompt's KV; a new prompt decodes only what differs
        self._held: list[list[int]] = [[] for _ in range(slots)]  # per slot: the tokens whose KV it still holds
        self.slots = slots
        self.context_per_slot = context_per_slot
        self.threads = threads or os.cpu_count() or 1
        self._inbox: queue.Queue[_Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self._start_lock = threading.Lock()
        self.model: Any = None
        self.vocab: Any = None
        self.ctx: Any = None

    # --- public, event-loop side ----------------------------------------------------------------------------

    async def generate(self, text: str, sampling: Sampling) -> Generation:
        """Generate a continuation of `text` (already formatted with the chat template, if any)."""
        await asyncio.to_thread(self._ensure_started)
        loop = asyncio.get_running_loop()
        job = _Job(text, sampling, loop.create_future(), loop)
        self._inbox.put(job)
        return await job.future  # cancelling this abandons the sequence: the thread frees its slot

    def format_chat(self, messages: Sequence[tuple[str, str]]) -> str:
        """The model's own chat template (from the GGUF), with the assistant turn opened."""
        self._ensure_started()
        template = llama_cpp.llama_model_chat_template(self.model, None)
        array = (llama_cpp.llama_chat_message * len(messages))()
        keep = []
        for index, (role, content) in enumerate(messages):
            role_b, content_b = role.encode(), content.encode()
            keep += [role_b, content_b]
            array[index].role = role_b
            array[index].content = content_b
        size = max(1024, 2 * sum(len(c) + 16 for _, c in messages))
        while True:
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_chat_apply_template(template, array, len(messages), True, buf, size)
            if n < 0:
                raise BadRequest("The messages could not be formatted with the model's chat template.", "messages")
            if n <= size:
                return buf.raw[:n].decode("utf-8", "replace")
            size = n + 1

    def close(self) -> None:
        if self._thread is not None:
            self._inbox.put(None)
            self._thread.join(timeout=30)
            self._thread = None

    # --- the worker thread ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Load the model now, if that has not begun, and wait until it is loaded (raises if it cannot be)."""
        self._ensure_started()

    def _ensure_started(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._main, name="llama-engine", daemon=True)
                self._thread.start()
        self._ready.wait()
        if self._load_error is not None:
            raise RuntimeError(f"the embedded model could not be loaded: {self._load_error}")

    def _load(self) -> None:
        llama_cpp.llama_log_set(_QUIET, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        path = prepared_gguf(self.model_path, resolve(self.weights, self.slots), self.cache_dir, self.threads)
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), model_params)
        if not self.model and path != self.model_path:  # a damaged cached conversion: drop it, use the shipped file
            path.unlink(missing_ok=True)
            path = self.model_path
            self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), model_params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.loaded_path = path
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self.slots * self.context_per_slot
        params.n_batch = max(512, self.context_per_slot)
        params.n_ubatch = 512
        params.n_seq_max = self.slots
        # One KV stream per slot, so attention never scans the other sequences' cells. llama.cpp then splits a
        # batch into one forward pass per run of consecutive sequence ids in ascending order: `_fill_batch` sorts
        # by slot and `_take_slot` prefers low slots, or a step of 8 sequences costs ~2.5x what it should.
        params.kv_unified = False
        params.n_threads = self.threads
        params.n_threads_batch = self.threads
        params.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.n_batch = params.n_batch
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self.memory = llama_cpp.llama_get_memory(self.ctx)

    def _main(self) -> None:
        log.info("model.loading", model=self.name)
        started = time.monotonic()
        try:
            self._load()
        except BaseException as exc:
            log.error("model.load_failed", model=self.name, error=str(exc))
            self._load_error = exc
            self._ready.set()
            return
        seconds = round(time.monotonic() - started, 2)
        weights = self.loaded_path.name if self.loaded_path else None
        log.info("model.loaded", model=self.name, seconds=seconds, weights=weights)
        self._ready.set()
        free = list(range(self.slots))
        running: list[_Job] = []
        while True:
            # Block only when idle; otherwise take whatever has arrived and keep stepping.
            try:
                job = self._inbox.get(block=not running)
            except queue.Empty:
                job = None
            else:
                if job is None:
                    break
                self._admit(job, free, running)
                while free:
                    try:
                        more = self._inbox.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        self._inbox.put(None)
                        break
                    self._admit(more, free, running)
            for dropped in [j for j in running if j.future.done()]:  # cancelled by the caller
                self._finish(dropped, free, running, None)
            if running:
                self._step(free, running)
        for job in list(running):
            self._finish(job, free, running, RuntimeError("the engine is shutting down"))
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)
        llama_cpp.llama_model_free(self.model)

    def _tokenize(self, text: str) -> list[int]:
        data = text.encode()
        capacity = len(data) + 8
        buf = (llama_cpp.llama_token * capacity)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, capacity, True, True)
        if n < 0:
            capacity = -n
            buf = (llama_cpp.llama_token * capacity)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, capacity, True, True)
        return list(buf[:n])

    def _admit(self, job: _Job, free: list[int], running: list[_Job]) -> None:
        if job.future.done():
            return
        if not free:
            self._inbox.put(job)  # no slot: back of the queue (the dispatcher never sends more than `slots`)
            return
        job.tokens = self._tokenize(job.text)
        job.prompt_tokens = len(job.tokens)
        if not job.tokens:  # nothing to decode, so no logits to sample the first token from
            job.resolve(BadRequest("The prompt is empty.", "prompt"))
            return
        if job.prompt_tokens + job.sampling.max_tokens > self.context_per_slot:
            job.resolve(
                BadRequest(
                    f"This model's context is {self.context_per_slot} tokens: the prompt has {job.prompt_tokens} "
                    f"and max_tokens asks for {job.sampling.max_tokens} more.",
                    "max_tokens",
                )
            )
            return
        try:
            job.grammar = self._grammar(job.sampling)
        except BadRequest as exc:
            job.resolve(exc)
            return
        job.sampler = self._sampler(job.sampling)
        job.seq, job.fed = self._take_slot(job.tokens, free)
        job.pos = job.fed
        running.append(job)

    def _take_slot(self, tokens: list[int], free: list[int]) -> tuple[int, int]:
        """The free slot whose held KV shares the longest prefix with `tokens`, and how many tokens it spares.

        A batch's lines mostly share their start (system prompt, instructions), as the requests to a sequential
        llama-cpp-python `Llama` do, which keeps its last prompt's KV the same way. The last prompt token is always
        decoded again: its logits give the first output token.
        """
        seq, shared = min(free), 0
        if self.reuse_prefix:
            for candidate in sorted(free):
                n = _common_prefix(self._held[candidate], tokens)
                if n > shared:
                    seq, shared = candidate, n
            shared = min(shared, len(tokens) - 1)
        free.remove(seq)
        llama_cpp.llama_memory_seq_rm(self.memory, seq, shared, -1)
        self._held[seq] = tokens[:shared]
        return seq, shared

    def _grammar(self, sampling: Sampling) -> Any:
        if sampling.grammar is None:
            return None
        grammar = llama_cpp.llama_sampler_init_grammar(self.vocab, sampling.grammar.encode(), b"root")
        if not grammar:
            raise BadRequest("The output format could not be compiled into a grammar.", "response_format")
        return grammar

    def _sampler(self, sampling: Sampling) -> Any:
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        if sampling.temperature <= 0.0:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
            return chain
        if sampling.top_k > 0:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_k(sampling.top_k))
        if sampling.top_p < 1.0:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_p(sampling.top_p, 1))
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(sampling.temperature))
        seed = sampling.seed if sampling.seed is not None else llama_cpp.LLAMA_DEFAULT_SEED
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        return chain

    def _step(self, free: list[int], running: list[_Job]) -> None:
        self.batch.n_tokens = self._fill_batch(running)
        if llama_cpp.llama_decode(self.ctx, self.batch) != 0:
            for job in list(running):
                self._finish(job, free, running, RuntimeError("llama_decode failed"), keep=False)
            return
        for job in list(running):
            if job.logits_index >= 0:
                self._sample(job, free, running)

    def _fill_batch(self, running: list[_Job]) -> int:
        """Decoding sequences first (one token each), then prompt chunks up to the batch size."""
        batch, n = self.batch, 0
        running = sorted(running, key=lambda job: job.seq)  # ascending slots: one forward pass (see `_load`)
        for job in running:
            job.logits_index = -1
            if job.fed == job.prompt_tokens and n < self.n_batch:
                n = self._add(batch, n, job.generated[-1], job.pos, job.seq, True)
                job.pos += 1
                job.logits_index = n - 1
        for job in running:
            while job.fed < job.prompt_tokens and n < self.n_batch:
                last = job.fed == job.prompt_tokens - 1
                n = self._add(batch, n, job.tokens[job.fed], job.pos, job.seq, last)
                job.fed += 1
                job.pos += 1
                if last:
                    job.logits_index = n - 1
        return n

    def _sample(self, job: _Job, free: list[int], running: list[_Job]) -> None:
        token = llama_cpp.llama_sampler_sample(job.sampler, self.ctx, job.logits_index)
        if job.grammar is not None:
            token = self._grammatical(job, token)
        if llama_cpp.llama_vocab_is_eog(self.vocab, token):
            self._finish(job, free, running, self._result(job, "stop"))
            return
        job.generated.append(token)
        piece = self._piece(token)
        if job.sampling.logprobs:
            job.logprobs.append(self._logprob(job, token, piece))
        job.text_out += piece
        stopped = self._stop_at(job)
        if stopped is not None:
            self._finish(job, free, running, stopped)
        elif len(job.generated) >= job.sampling.max_tokens:
            self._finish(job, free, running, self._result(job, "length"))

    def _grammatical(self, job: _Job, token: int) -> int:
        """`token` if the output format's grammar allows it, else the token the chain picks among those it allows.

        The grammar is checked after the chain, on the one token the chain chose, as llama.cpp's own server does:
        judging every token of the vocabulary first (49,152 here) at every step cost 0.37x the throughput, and a
        model asked for JSON mostly chooses an allowed token anyway. Only a refused choice pays for the full pass.
        """
        one = llama_cpp.llama_token_data(token, 0.0, 0.0)
        single = llama_cpp.llama_token_data_array(ctypes.pointer(one), 1, -1, False)
        llama_cpp.llama_sampler_apply(job.grammar, ctypes.byref(single))
        if one.logit != -math.inf:
            llama_cpp.llama_sampler_accept(job.grammar, token)
            return token
        n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, job.logits_index), (n_vocab,))
        candidates = np.empty(n_vocab, dtype=_TOKEN_DATA)
        candidates["id"] = np.arange(n_vocab, dtype=np.int32)
        candidates["logit"] = logits
        candidates["p"] = 0.0
        data = candidates.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data))
        every = llama_cpp.llama_token_data_array(data, n_vocab, -1, False)
        llama_cpp.llama_sampler_apply(job.grammar, ctypes.byref(every))
        llama_cpp.llama_sampler_apply(job.sampler, ctypes.byref(every))
        token = int(candidates["id"][every.selected])
        llama_cpp.llama_sampler_accept(job.grammar, token)
        return token

    def _logprob(self, job: _Job, token: int, piece: bytes) -> TokenLogprob:
        """`token`'s log probability from the sequence's own logits row of this step (log-softmax over the whole
        vocabulary, in float64), and the `top_logprobs` most likely tokens there."""
        n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, job.logits_index), (n_vocab,))
        logits = row.astype(np.float64)
        peak = logits.max()
        logprobs = logits - (peak + np.log(np.exp(logits - peak).sum()))
        top: tuple[tuple[bytes, float], ...] = ()
        if k := job.sampling.top_logprobs:
            best = np.argpartition(logprobs, -k)[-k:]
            best = best[np.argsort(-logprobs[best], kind="stable")]
            top = tuple((self._piece(int(other)), float(logprobs[other])) for other in best)
        return TokenLogprob(piece, float(logprobs[token]), top)

    @staticmethod
    def _add(batch: Any, n: int, token: int, pos: int, seq: int, logits: bool) -> int:
        batch.token[n] = token
        batch.pos[n] = pos
        batch.n_seq_id[n] = 1
        batch.seq_id[n][0] = seq
        batch.logits[n] = 1 if logits else 0
        return n + 1

    def _piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(_MAX_PIECE)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, _MAX_PIECE, 0, False)
        return buf.raw[: max(0, n)]

    def _stop_at(self, job: _Job) -> Generation | None:
        if not job.sampling.stop:
            return None
        text = job.text_out.decode("utf-8", "ignore")
        hits = [(at, stop) for stop in job.sampling.stop if (at := text.find(stop)) >= 0]
        if not hits:
            return None
        cut, matched = min(hits)
        return Generation(
            text[:cut], "stop", job.prompt_tokens, len(job.generated), matched, self._logprobs(job, text[:cut])
        )

    def _result(self, job: _Job, reason: str) -> Generation:
        text = job.text_out.decode("utf-8", "replace")
        return Generation(text, reason, job.prompt_tokens, len(job.generated), logprobs=self._logprobs(job, text))

    @staticmethod
    def _logprobs(job: _Job, text: str) -> tuple[TokenLogprob, ...] | None:
        """The logprobs of the tokens that make up `text` (a stop string cuts the output short: the tokens after
        the cut are not part of the answer)."""
        if not job.sampling.logprobs:
            return None
        size, at, kept = len(text.encode()), 0, []
        for token in job.logprobs:
            if at >= size:
                break
            kept.append(token)
            at += len(token.piece)
        return tuple(kept)

    def _finish(
        self,
        job: _Job,
        free: list[int],
        running: list[_Job],
        result: Generation | BaseException | None,
        *,
        keep: bool = True,
    ) -> None:
        """Free the job's slot, keeping the KV of its prompt (every token fed so far was decoded) for the next."""
        running.remove(job)
        kept = job.fed if keep and self.reuse_prefix else 0
        llama_cpp.llama_memory_seq_rm(self.memory, job.seq, kept, -1)
        self._held[job.seq] = job.tokens[:kept]
        with contextlib.suppress(Exception):
            llama_cpp.llama_sampler_free(job.sampler)
        if job.grammar is not None:
            with contextlib.suppress(Exception):
                llama_cpp.llama_sampler_free(job.grammar)
        free.append(job.seq)
        if result is not None:
            job.resolve(result)
