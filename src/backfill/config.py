"""Settings: the only place that reads environment variables and the TOML config file.

Precedence, highest first: command-line options, `BACKFILL_*` environment variables, the TOML file
(`--config` or `BACKFILL_CONFIG`), defaults.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, InitSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from backfill.errors import ConfigError

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

    @field_validator("url")
    @classmethod
    def _strip_slash(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"backend url must start with http:// or https://, got {url!r}")
        return url.rstrip("/")

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None


class Settings(BaseSettings):
    """Everything configurable, with its default."""

    model_config = SettingsConfigDict(env_prefix="BACKFILL_", extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    data_dir: Path = Path("./backfill-data")
    database_url: str | None = None
    log_level: str = "info"

    # Files and validation (SPEC §2, §3)
    max_file_bytes: int = Field(default=200 * MiB, ge=1)
    max_line_bytes: int = Field(default=16 * MiB, ge=1)
    max_lines: int = Field(default=50_000, ge=1)
    max_embedding_inputs: int = Field(default=50_000, ge=1)
    max_reported_errors: int = Field(default=100, ge=1)
    batch_file_ttl_s: int = Field(default=30 * 86400, ge=1)
    completion_windows: list[str] = ["1h", "24h", "7d"]
    default_enqueued_token_limit: int | None = Field(default=None, ge=1)

    # Anthropic Message Batches (SPEC §4). `public_url`: how clients reach this server, for `results_url`; unset,
    # it is read from each request (X-Forwarded-* / Forwarded headers, then Host).
    public_url: str | None = None
    message_batch_max_requests: int = Field(default=100_000, ge=1)
    message_batch_max_bytes: int = Field(default=256 * MiB, ge=1)
    message_batch_window_s: int = Field(default=86400, ge=1)
    message_batch_retention_s: int = Field(default=29 * 86400, ge=1)

    # Dispatcher
    backends: list[BackendSettings] = []
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
    max_attempts: int = Field(default=5, ge=1)
    retry_base_s: float = Field(default=1.0, ge=0)
    retry_max_s: float = Field(default=60.0, ge=0)
    lease_ttl_s: float = Field(default=60.0, gt=0)
    cancel_grace_s: float = Field(default=10.0, ge=0)
    commit_interval_s: float = Field(default=0.05, gt=0)
    commit_max_results: int = Field(default=512, ge=1)
    poll_interval_s: float = Field(default=0.5, gt=0)
    outlook_interval_s: float = Field(default=5.0, gt=0)  # how often completion estimates are refreshed
    # Hand back young lines of a tenant over its fair share when one short of it has lines waiting and every
    # slot is taken (docs/scheduling.md).
    fair_share_preemption: bool = True
    # How often the queue of backends of flavour vllm/sglang/llamacpp is read from their /metrics.
    engine_metrics_interval_s: float = Field(default=1.0, gt=0)

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

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'backfill.db').resolve()}"

    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"

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

    try:
        return _FromFile(**{key: value for key, value in overrides.items() if value is not None})
    except ValidationError as exc:
        raise ConfigError(f"invalid settings: {exc}") from exc


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
