"""Settings: the only place that reads environment variables and the TOML config file.

Precedence, highest first: command-line options, `BACKFILL_*` environment variables, the TOML file
(`--config` or `BACKFILL_CONFIG`), defaults.
"""

from __future__ import annotations

import base64
import os
import re
import tomllib
from collections.abc import Mapping
from datetime import time
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, InitSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from backfill.config_errors import Sources, describe, unknown_variables
from backfill.domain.usage_report import Price
from backfill.errors import ConfigError
from backfill.policy.harvest import OffPeak, Window

_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MiB = 1024 * 1024


def parse_duration_s(text: str) -> int:
    """`"24h"` -> 86400. Accepts a whole number followed by s, m, h or d."""
    match = _DURATION.match(text)
    if not match or int(match.group(1)) <= 0:
        raise ValueError(f"not a duration: {text!r} (expected e.g. '1h', '24h', '7d')")
    return int(match.group(1)) * _UNIT_S[match.group(2)]


class BackendSettings(BaseModel):
    """One `[[backends]]` entry: an OpenAI-compatible inference server."""

    model_config = ConfigDict(extra="forbid")  # a misspelt key is named, not silently dropped

    name: str
    url: str
    models: list[str]
    flavour: Literal["openai", "vllm", "sglang", "llamacpp"] = "openai"
    api_key_env: str | None = None
    max_concurrency: int = Field(default=64, ge=1, le=4096)
    request_timeout_s: float | None = Field(default=None, gt=0)
    # Adaptive concurrency searches below max_concurrency for the level past which the server gains no
    # throughput (policy/limits.py); off, max_concurrency lines are kept in flight.
    adaptive_concurrency: bool = True
    initial_concurrency: int = Field(default=16, ge=1)
    rpm: float | None = Field(default=None, gt=0)  # requests per minute
    tpm: float | None = Field(default=None, gt=0)  # tokens (prompt + max output) per minute
    # Engine priority for batch lines, flavours vllm and sglang only (the engine must run vLLM's
    # `--scheduling-policy priority` or SGLang's `--enable-priority-scheduling`). "auto": sent until the server
    # refuses it as not enabled (vLLM answers 400), then never; "on": always; "off": never.
    priority: Literal["auto", "on", "off"] = "auto"
    # In vLLM's convention, lower runs first (interactive requests have 0), so batch gets a larger number. SGLang
    # runs higher values first: it is sent negated there. An SGLang started with
    # `--schedule-low-priority-values-first` wants a negative setting here.
    batch_priority: int = 10
    # What the weights behind this endpoint are, for the result cache (docs/evals.md): any string an operator
    # changes when they change (a checkpoint hash, a release tag). Cached answers are kept per model identity: this
    # and what the server's GET /v1/models says of the model (its root, context length, …; not its start time).
    model_revision: str | None = None
    # How long that answer is trusted (0: asked again before each cached line): a restart with new weights is seen
    # within it, and at once when the server was unreachable meanwhile.
    model_identity_ttl_s: float = Field(default=30.0, ge=0)
    # The endpoint also serves interactive traffic (through backfill's proxy or not): batch lines take only the
    # capacity it leaves, under a harvest controller (policy/harvest.py) that reads the proxy's interactive TTFT
    # and the engine's /metrics once a second. Interactive load is its share of the engine's token throughput:
    # below `harvest_fill_below` batch may use the whole endpoint, from `harvest_target` on nothing, a linear
    # share between. `capacity_tokens_per_s`: the engine's throughput when full (prompt + output tokens/s),
    # learned while the engine queues when not given. "auto" (the default): the endpoint is treated as dedicated
    # to batch work until interactive traffic is first seen on it (through the proxy, or in the engine's token
    # counters), then harvested; true: harvested from the start (no batch line before the first reading);
    # false: never (batch may fill the endpoint whatever else runs there).
    harvest: bool | Literal["auto"] = "auto"
    harvest_target: float = Field(default=0.78, gt=0, le=1)
    harvest_fill_below: float = Field(default=0.4, ge=0, lt=1)
    capacity_tokens_per_s: float | None = Field(default=None, gt=0)
    # Embeddings and moderations lines of one batch go to this server several to a request, with an array `input`
    # (domain/coalescing.py): at most this many inputs a request, and lines whose estimated tokens (bytes / 4 of
    # the line) sum to at most `max_tokens_per_request` (one line larger than that still goes, alone). The
    # defaults suit text-embeddings-inference (whose `--max-client-batch-size` defaults to 32, `--max-batch-tokens`
    # to 16384), vLLM and llama.cpp's server (no limit on inputs); 1 sends every line alone.
    max_inputs_per_request: int = Field(default=32, ge=1, le=2048)
    max_tokens_per_request: int = Field(default=16384, ge=1)

    @model_validator(mode="after")
    def _check_harvest_band(self) -> BackendSettings:
        if self.harvest_fill_below >= self.harvest_target:
            raise ValueError(
                f"harvest_fill_below ({self.harvest_fill_below}) must be below harvest_target ({self.harvest_target})"
            )
        return self

    @field_validator("url")
    @classmethod
    def _strip_slash(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"backend url must start with http:// or https://, got {url!r}")
        return url.rstrip("/")

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None


class WebhookSettings(BaseModel):
    """One `[[webhooks]]` entry: a tenant's endpoint kept in step with the config file (docs/webhooks.md)."""

    model_config = ConfigDict(extra="forbid")  # a misspelt key is named, not silently dropped
    url: str
    secret_env: str  # the environment variable holding its `whsec_…` secret
    tenant: str = "default"

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"webhook url must start with http:// or https://, got {url!r}")
        return url

    def secret(self) -> str:
        """The secret from the environment; ConfigError when it is missing or not `whsec_` + base64."""
        secret = os.environ.get(self.secret_env, "")
        if not secret.startswith("whsec_") or not _is_base64(secret.removeprefix("whsec_")):
            raise ConfigError(
                f"webhook {self.url}: ${self.secret_env} must hold a whsec_ secret (whsec_ + base64), such as "
                "`backfill webhooks create` prints"
            )
        return secret


def _is_base64(text: str) -> bool:
    try:
        return bool(base64.b64decode(text + "==", validate=False))
    except ValueError:
        return False


_CLOCK = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")


class OffPeakWindow(BaseModel):
    """From `start` to `end` ("HH:MM", local time; wraps past midnight when end <= start) batch may use `share`."""

    model_config = ConfigDict(extra="forbid")

    start: str
    end: str
    share: float = Field(ge=0, le=1)

    @field_validator("start", "end")
    @classmethod
    def _clock(cls, value: str) -> str:
        if not _CLOCK.match(value):
            raise ValueError(f"not a time of day: {value!r} (expected HH:MM, e.g. '22:00')")
        return value

    def to_policy(self) -> Window:
        start, end = (time(int(t[:2]), int(t[3:])) for t in (self.start, self.end))
        return Window(start, end, self.share)


class OffPeakSettings(BaseModel):
    """One `[[off_peak]]` entry: how much of a pool's (a model's) harvested endpoints batch work may use by time
    of day. A batch promoted for its deadline is not held to it."""

    model_config = ConfigDict(extra="forbid")

    model: str
    timezone: str = "UTC"
    default_share: float = Field(default=1.0, ge=0, le=1)
    windows: list[OffPeakWindow] = []

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (expected an IANA name, e.g. 'Europe/Berlin')") from None
        return value

    def to_policy(self) -> OffPeak:
        return OffPeak(tuple(window.to_policy() for window in self.windows), self.default_share, self.timezone)


class PriceSettings(BaseModel):
    """One `[[prices]]` entry: what a model's tokens cost, in US dollars per million (docs/usage.md)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    input_per_million: float = Field(ge=0)
    output_per_million: float = Field(ge=0)
    cached_input_per_million: float | None = Field(default=None, ge=0)  # unset: the input price

    def to_price(self) -> Price:
        return Price(self.input_per_million, self.output_per_million, self.cached_input_per_million)


class Settings(BaseSettings):
    """Everything configurable, with its default."""

    model_config = SettingsConfigDict(env_prefix="BACKFILL_", extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    data_dir: Path = Path("./backfill-data")
    database_url: str | None = None
    # PostgreSQL connections a process keeps open (up to twice as many at peaks): budget max_connections for
    # 2 x database_pool_size x processes. SQLite always uses one connection per process.
    database_pool_size: int = Field(default=10, ge=1, le=200)
    # Where file bytes live: "local", files under data_dir/blobs; "s3", objects under s3_bucket/s3_prefix on AWS S3
    # or any S3-compatible server (s3_endpoint_url: MinIO, SeaweedFS, Ceph, ...), which needs backfill[s3].
    # Credentials come from the standard AWS chain: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE and
    # ~/.aws, or the instance's role; never from this file. Uploads larger than s3_part_bytes go up in parts.
    blob_store: Literal["local", "s3"] = "local"
    s3_bucket: str | None = Field(default=None, min_length=1, validate_default=True)
    s3_prefix: str = ""
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_part_bytes: int = Field(default=8 * MiB, ge=5 * MiB, le=5 * 1024 * MiB)  # S3's bounds for a part
    log_level: str = "info"
    # What `backfill serve` runs in this process: "api", the HTTP API (files, batches, message batches, the
    # interactive proxy) without a dispatcher; "worker", the dispatcher (validation, leasing, sending, finalizing,
    # expiry), serving only /healthz, /readyz and /metrics; "all", both. Any number of each may share one
    # PostgreSQL database and one S3 bucket (docs/deploy.md).
    role: Literal["all", "api", "worker"] = "all"
    # Signs the dashboard's session cookies (/ui, docs/dashboard.md). Unset: a random secret per process, so
    # several API replicas behind one load balancer need the same value here (or sticky sessions).
    ui_secret: str | None = Field(default=None, min_length=16)
    # Slow or hostile HTTP clients (http/protocol.py): a request line plus headers over max_header_bytes is a 431;
    # a head not complete header_timeout_s after the connection (or the request's first byte), or a body that
    # pauses longer than body_timeout_s, is a 408. Both close the connection.
    max_header_bytes: int = Field(default=64 * 1024, ge=1024)
    header_timeout_s: float = Field(default=10.0, gt=0)
    body_timeout_s: float = Field(default=30.0, gt=0)

    # Files and validation (SPEC §2, §3)
    max_file_bytes: int = Field(default=200 * MiB, ge=1)
    max_line_bytes: int = Field(default=16 * MiB, ge=1)
    # OpenAI's limit by default; up to 1,000,000 (Mistral's) in flat memory: ~150 MB while such a batch is validated
    # (BENCHMARKS.md, "embeddings"), then what its leases hold.
    max_lines: int = Field(default=50_000, ge=1, le=1_000_000)
    max_embedding_inputs: int = Field(default=50_000, ge=1)
    max_reported_errors: int = Field(default=100, ge=1)
    batch_file_ttl_s: int = Field(default=30 * 86400, ge=1)
    completion_windows: list[str] = ["1h", "24h", "7d"]
    default_enqueued_token_limit: int | None = Field(default=None, ge=1)
    # The batch object's `output_file_id` from the start, as Doubleword's API and autobatcher's partial reads have
    # it, instead of OpenAI's null until the batch ends (docs/partial-results.md). `backfill.output_file_id` has it
    # either way.
    output_file_id_at_start: bool = False
    # The result cache across batches (docs/evals.md): a deterministic line (temperature 0 or a fixed seed;
    # embeddings) whose answer an earlier batch of the same tenant got from the same model identity is answered
    # from it, without a backend. `result_cache`: for batches whose metadata does not say (`backfill_result_cache`);
    # `result_cache_max_entries`: per tenant, least recently used dropped first (checked once a minute).
    result_cache: bool = False
    result_cache_max_entries: int = Field(default=100_000, ge=1)

    # Anthropic Message Batches (SPEC §4). `public_url`: how clients reach this server, for `results_url`; unset,
    # it is read from each request (X-Forwarded-* / Forwarded headers, then Host).
    public_url: str | None = None
    message_batch_max_requests: int = Field(default=100_000, ge=1)
    message_batch_max_bytes: int = Field(default=256 * MiB, ge=1)
    # A create body this large or larger is translated in a worker process, off the event loop's GIL.
    message_batch_offload_bytes: int = Field(default=8 * MiB, ge=0)
    message_batch_window_s: int = Field(default=86400, ge=1)
    message_batch_retention_s: int = Field(default=29 * 86400, ge=1)

    # Dispatcher
    backends: list[BackendSettings] = []
    webhooks: list[WebhookSettings] = []  # endpoints from the config, beside those made through the admin API
    off_peak: list[OffPeakSettings] = []  # per pool (model): batch shares by time of day on harvested endpoints
    # Cost in the usage API (docs/usage.md): prices per model; batch tokens cost `1 - batch_discount` of them.
    prices: list[PriceSettings] = []
    batch_discount: float = Field(default=0.5, ge=0, le=1)
    # The embedded CPU engine, used when no backend is configured and backfill[local] is installed.
    embedded_chat_slots: int = Field(default=8, ge=1, le=64)
    embedded_context_per_slot: int = Field(default=2048, ge=256, le=8192)
    embedded_threads: int | None = Field(default=None, ge=1)
    # The chat model's weights: the shipped Q4_1 GGUF converted once into `embedded_cache_dir` (default
    # $XDG_CACHE_HOME/backfill, else ~/.cache/backfill). q8_0 batches much faster with the same answers; q4_0 is
    # faster still but re-rounds the weights (lower quality); "shipped" loads the file as it comes; "auto": shipped
    # with one slot (a single sequence is faster on the smaller file), q8_0 with several.
    embedded_chat_weights: Literal["auto", "q8_0", "q4_0", "f16", "shipped"] = "auto"
    embedded_cache_dir: Path | None = None
    request_timeout_s: float = Field(default=600.0, gt=0)
    # `service_tier: "flex"` through the proxy (docs/flex.md): a call waits this long for harvested capacity
    # to start it, then is cancelled and answered 429 `resource_unavailable`, as OpenAI's flex tier does.
    flex_timeout_s: float = Field(default=600.0, gt=0)
    max_attempts: int = Field(default=5, ge=1)
    retry_base_s: float = Field(default=1.0, ge=0)
    retry_max_s: float = Field(default=60.0, ge=0)
    lease_ttl_s: float = Field(default=60.0, gt=0)
    cancel_grace_s: float = Field(default=10.0, ge=0)
    # On SIGTERM a worker stops leasing at once, lets lines in flight finish for up to this long (their leases
    # kept alive meanwhile), then aborts the rest and hands them back uncharged for another worker.
    shutdown_grace_s: float = Field(default=30.0, ge=0)
    commit_interval_s: float = Field(default=0.05, gt=0)
    commit_max_results: int = Field(default=512, ge=1)
    poll_interval_s: float = Field(default=0.5, gt=0)
    outlook_interval_s: float = Field(default=5.0, gt=0)  # how often completion estimates are refreshed
    # Hand back young lines of a tenant over its fair share when one short of it has lines waiting and every
    # slot is taken (docs/scheduling.md).
    fair_share_preemption: bool = True
    # An endpoint that is down (nothing listens, or resets / 502-504 / timeouts across lines) is probed again after
    # a backoff that doubles up to this; its batches wait for it until their window ends (DESIGN.md section 6).
    probe_max_s: float = Field(default=30.0, gt=0, le=30.0)
    # How often the queue of backends of flavour vllm/sglang/llamacpp is read from their /metrics.
    engine_metrics_interval_s: float = Field(default=1.0, gt=0)
    # Webhooks (docs/webhooks.md): each try of a delivery gets `webhook_timeout_s`; a failed one waits
    # `webhook_retry_base_s`, doubling up to `webhook_retry_max_s`, until `webhook_retry_for_s` after the event,
    # then is dead-lettered. Workers look for due deliveries every `webhook_poll_interval_s`.
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    webhook_retry_base_s: float = Field(default=5.0, gt=0)
    webhook_retry_max_s: float = Field(default=3600.0, gt=0)
    webhook_retry_for_s: float = Field(default=86400.0, gt=0)
    webhook_poll_interval_s: float = Field(default=1.0, gt=0)

    @field_validator("public_url")
    @classmethod
    def _check_public_url(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("http://", "https://")):
            raise ValueError(f"public_url must start with http:// or https://, got {url!r}")
        return url.rstrip("/") if url is not None else None

    @field_validator("completion_windows")
    @classmethod
    def _check_windows(cls, windows: list[str]) -> list[str]:
        for window in windows:
            parse_duration_s(window)
        if "24h" not in windows:
            raise ValueError("completion_windows must include '24h' (the SDKs' default)")
        return windows

    @field_validator("s3_bucket")
    @classmethod
    def _check_bucket(cls, bucket: str | None, info: ValidationInfo) -> str | None:
        if bucket is None and info.data.get("blob_store") == "s3":
            raise ValueError("blob_store = 's3' needs s3_bucket")
        return bucket

    @model_validator(mode="after")
    def _split_roles_need_backends(self) -> Settings:
        if self.role != "all" and not self.backends:
            raise ValueError(
                f"role {self.role!r} needs [[backends]]: the embedded engine runs inside the one process that "
                "serves it, so it is only available with role 'all'"
            )
        return self

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'backfill.db').resolve()}"

    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"

    @property
    def spool_dir(self) -> Path:
        """Where large request bodies wait, in temporary files, while they are read."""
        return self.data_dir / "spool"

    def window_s(self, window: str) -> int | None:
        """Seconds of an accepted completion window, or None if it is not accepted."""
        return parse_duration_s(window) if window in self.completion_windows else None


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build Settings from a TOML file, the environment and explicit overrides (None values are ignored)."""
    path = config_file or (Path(os.environ["BACKFILL_CONFIG"]) if os.environ.get("BACKFILL_CONFIG") else None)
    file_values: dict[str, Any] = {}
    if path is not None:
        try:
            file_values = tomllib.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc

    class _FromFile(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return init_settings, env_settings, InitSettingsSource(settings_cls, file_values)

    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        return _FromFile(**given)
    except ValidationError as exc:
        sources = Sources(path, file_values, given, os.environ)
        lines = describe(exc.errors(include_url=False), sources, _TABLES).splitlines()
        text = lines[0] if len(lines) == 1 else "".join(f"\n  {line}" for line in lines)
        raise ConfigError(f"invalid settings: {text}") from None


# The model of each table in the config file, for the did-you-mean of an unknown key in it ("": the top level).
_TABLES: dict[str, type[BaseModel]] = {
    "": Settings,
    "backends": BackendSettings,
    "off_peak": OffPeakSettings,
    "prices": PriceSettings,
    "webhooks": WebhookSettings,
    "windows": OffPeakWindow,
}


def config_warnings(environ: Mapping[str, str] | None = None) -> list[str]:
    """What is not wrong enough to refuse to start: `BACKFILL_*` variables that no setting reads."""
    return unknown_variables(os.environ if environ is None else environ, Settings.model_fields)


class ClientSettings(BaseSettings):
    """Where the client commands (`backfill submit`, `status`, …) find the server, and the key they present."""

    model_config = SettingsConfigDict(env_prefix="BACKFILL_", extra="ignore")

    base_url: str = "http://127.0.0.1:8080"
    api_key: str | None = None

    @field_validator("base_url")
    @classmethod
    def _server_root(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"the base URL must start with http:// or https://, got {url!r}")
        return url.rstrip("/").removesuffix("/v1")  # the SDKs' base URL (…/v1) names the same server


def load_client_settings(**overrides: Any) -> ClientSettings:
    """Client settings from explicit values (None is ignored), then `BACKFILL_BASE_URL` / `BACKFILL_API_KEY`."""
    try:
        return ClientSettings(**{key: value for key, value in overrides.items() if value is not None})
    except ValidationError as exc:
        raise ConfigError(f"invalid client settings: {exc.errors()[0]['msg']}") from exc
