"""Read an inference server's own queue from its Prometheus `/metrics`, by flavour.

A continuous-batching engine is full exactly when requests wait in it for a slot, which its metrics say
directly: vLLM `vllm:num_requests_waiting`, SGLang `sglang:num_queue_reqs`, llama.cpp's server
`llamacpp:requests_deferred`. The adaptive concurrency limit follows that (policy/limits.py,
`on_engine_load`). Servers of flavour `openai` have no such metric; nothing is scraped for them.
"""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from backfill.config import BackendSettings

WAITING_METRIC = {
    "vllm": "vllm:num_requests_waiting",
    "sglang": "sglang:num_queue_reqs",
    "llamacpp": "llamacpp:requests_deferred",
}


def parse_waiting(text: str, metric: str) -> int | None:
    """Requests waiting, summed over the family's samples (one per served model); None if it is absent or
    the text is not Prometheus exposition format."""
    try:
        for family in text_string_to_metric_families(text):
            if family.name == metric:
                return int(sum(sample.value for sample in family.samples))
    except ValueError:
        return None
    return None


class EngineMetrics:
    """Scrapes one backend's `/metrics` (at the server root, beside `/v1`)."""

    def __init__(self, settings: BackendSettings, client: httpx.AsyncClient) -> None:
        self.name = settings.name
        self.metric = WAITING_METRIC[settings.flavour]
        self.url = settings.url.rstrip("/").removesuffix("/v1") + "/metrics"
        self.client = client

    @classmethod
    def supports(cls, settings: BackendSettings) -> bool:
        return settings.flavour in WAITING_METRIC

    async def waiting(self) -> int | None:
        """None when the server cannot be read: the limit then goes on without it."""
        try:
            response = await self.client.get(self.url, timeout=2.0)
        except httpx.HTTPError:
            return None
        if response.status_code != 200:
            return None
        return parse_waiting(response.text, self.metric)
