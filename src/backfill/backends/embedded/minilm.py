"""MiniLMEngine: all-MiniLM-L6-v2 sentence embeddings with sentence-transformers on the CPU.

Requests that arrive while the model is busy are gathered and encoded together in one `encode` call (batches of
up to `batch_size` texts), so many small embeddings lines cost about as much as one large one.
"""

from __future__ import annotations

import asyncio
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DIMENSIONS = 384


@dataclass
class _Pending:
    texts: list[str]
    future: asyncio.Future[tuple[list[list[float]], list[int]]]


class MiniLMEngine:
    def __init__(self, model_dir: Path, *, batch_size: int = 64, threads: int | None = None) -> None:
        self.model_dir = model_dir
        self.batch_size = batch_size
        self.threads = threads or os.cpu_count() or 1
        self._model: Any = None
        self._load_lock = threading.Lock()
        self._queue: list[_Pending] = []
        self._worker: asyncio.Task[None] | None = None

    def _load(self) -> Any:
        with self._load_lock:
            if self._model is None:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is on disk; never reach for a hub
                import torch
                from sentence_transformers import SentenceTransformer

                torch.set_num_threads(self.threads)
                self._model = SentenceTransformer(str(self.model_dir), device="cpu", local_files_only=True)
        return self._model

    async def embed(self, texts: list[str]) -> tuple[list[list[float]], list[int]]:
        """Unit-normalised vectors for `texts`, and the number of tokens each took."""
        loop = asyncio.get_running_loop()
        pending = _Pending(texts, loop.create_future())
        self._queue.append(pending)
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return await pending.future

    async def _drain(self) -> None:
        while self._queue:
            group: list[_Pending] = []
            size = 0
            while self._queue and (not group or size + len(self._queue[0].texts) <= self.batch_size * 4):
                item = self._queue.pop(0)
                if not item.future.done():
                    group.append(item)
                    size += len(item.texts)
            if not group:
                continue
            texts = [text for item in group for text in item.texts]
            try:
                vectors, tokens = await asyncio.to_thread(self._encode, texts)
            except Exception as exc:
                for item in group:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            start = 0
            for item in group:
                end = start + len(item.texts)
                if not item.future.done():
                    item.future.set_result((vectors[start:end], tokens[start:end]))
                start = end

    def _encode(self, texts: list[str]) -> tuple[list[list[float]], list[int]]:
        model = self._load()
        vectors = model.encode(
            texts, batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        )
        tokenizer = model.tokenizer
        limit = model.max_seq_length
        counts = [min(limit, len(ids)) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]
        return vectors.tolist(), counts
