"""What the simulated engine is: its limits, its iteration-time model and its output lengths, loaded from TOML.

The defaults describe **an H100 80GB (SXM) serving Llama-3-8B-Instruct in bf16 under vLLM** with default
settings. They are first-principles estimates cross-checked against commonly published vLLM figures, not
measurements of ours; refit the four timing coefficients from a benchmark of your own engine before using the
simulator for capacity planning (docs/simulator.md says how).

Iteration time, for one engine step that prefills ``prefill_tokens`` prompt tokens (chunks of several
requests), decodes one token for each of ``decode_seqs`` sequences, and attends over ``context_tokens`` tokens
already in the KV cache (summed over every scheduled sequence)::

    t = iteration_base_s + prefill_token_s * prefill_tokens + decode_seq_s * decode_seqs
        + kv_token_s * context_tokens

- ``iteration_base_s`` = 7 ms: every step reads all weights once, 16.1 GB / 3.35 TB/s = 4.8 ms at peak HBM
  bandwidth; with ~75% achieved bandwidth, the scheduler and the sampler a batch-of-one step takes 6-8 ms,
  the inter-token latency vLLM reports for 8B models on an H100 at concurrency 1.
- ``decode_seq_s`` = 35 us: a token costs 2 x 8.0e9 = 16 GFLOP of matmuls, ~33 us at the ~480 TFLOPS a large
  batch reaches (about half of the 989 TFLOPS bf16 peak), plus per-sequence sampling and bookkeeping.
- ``kv_token_s`` = 40 ns: attention reads each cached token's K and V once per step, 32 layers x 8 KV heads
  x 128 dims x 2 (K, V) x 2 bytes = 128 KiB, which takes 39 ns at 3.35 TB/s.
  Together: 256 sequences with 1k-token contexts step in 7 + 9 + 10.5 = 26.5 ms (~9.7k output tokens/s).
- ``prefill_token_s`` = 65 us: ~15k prompt tokens/s, the prefill throughput reported for 8B models on one
  H100 (a 2k-token prompt's time to first token is ~0.14 s); an 8192-token chunk takes ~0.54 s.

KV cache: vLLM gives the cache ``gpu_memory_utilization`` (0.9) x 80 GiB minus the 15 GiB of weights and
~1-2 GiB of activations, ~56 GiB; at 128 KiB per token that is ~450k tokens, 28,000 blocks of 16.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from backfill.errors import ConfigError

SchedulingPolicy = Literal["fcfs", "priority"]
OutputLenDist = Literal["exponential", "uniform", "fixed"]


@dataclass(frozen=True, slots=True)
class EngineProfile:
    """Parameters of a simulated engine; invalid values raise ConfigError."""

    model: str = "sim-8b"
    # Where the weights come from, as vLLM's GET /v1/models shows it (`root`; "": the model's name). Serving the
    # same name from other weights changes it, as `--served-model-name` does on vLLM.
    root: str = ""
    max_model_len: int = 8192  # Llama-3-8B's context window: prompt + output tokens of one request
    # Scheduler limits, under vLLM's names. vLLM's API server on a >= 70 GiB GPU defaults to 8192 batched tokens
    # and 1024 sequences; 256 sequences (its default elsewhere) is the more common production setting.
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192  # token budget of one iteration; longer prompts are prefilled in chunks
    block_size: int = 16
    num_gpu_blocks: int = 28_000
    enable_prefix_caching: bool = True
    scheduling_policy: SchedulingPolicy = "fcfs"
    # Iteration time (module docstring).
    iteration_base_s: float = 0.007
    prefill_token_s: float = 65e-6
    decode_seq_s: float = 35e-6
    kv_token_s: float = 40e-9
    # Length of an answer when the request does not set ignore_eos: drawn from this distribution, then capped
    # by max_tokens. "exponential" has this mean; "uniform" is 1 .. 2 x mean - 1; "fixed" is always the mean.
    output_len_mean: int = 256
    output_len_dist: OutputLenDist = "exponential"
    seed: int = 0
    # Real-time server only: it sleeps each iteration's duration x time_scale (0: no sleep at all). Latency
    # metrics are reported in modelled seconds (wall seconds / time_scale).
    time_scale: float = 1.0
    # Synthetic tokenizer: one token per this many characters of text (~4 for English with Llama-3's).
    chars_per_token: int = 4
    embedding_dim: int = 16

    def __post_init__(self) -> None:
        for name in _POSITIVE_INTS:
            if getattr(self, name) < 1:
                raise ConfigError(f"engine profile: {name} must be at least 1, got {getattr(self, name)}")
        for name in _NON_NEGATIVE_FLOATS:
            if getattr(self, name) < 0:
                raise ConfigError(f"engine profile: {name} must not be negative, got {getattr(self, name)}")
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise ConfigError(f"engine profile: {name} must be one of {', '.join(choices)}")
        if not self.model:
            raise ConfigError("engine profile: model must not be empty")
        # Otherwise one request could need more KV blocks than exist, and the engine would wait for it forever.
        if self.max_model_len > self.kv_capacity_tokens:
            raise ConfigError(
                f"engine profile: max_model_len ({self.max_model_len}) exceeds the KV cache "
                f"({self.num_gpu_blocks} blocks x {self.block_size} = {self.kv_capacity_tokens} tokens)"
            )

    @property
    def kv_capacity_tokens(self) -> int:
        return self.num_gpu_blocks * self.block_size


_POSITIVE_INTS = (
    "max_model_len", "max_num_seqs", "max_num_batched_tokens", "block_size", "num_gpu_blocks",
    "output_len_mean", "chars_per_token", "embedding_dim",
)  # fmt: skip
_CHOICES = {"scheduling_policy": typing.get_args(SchedulingPolicy), "output_len_dist": typing.get_args(OutputLenDist)}
_NON_NEGATIVE_FLOATS = ("iteration_base_s", "prefill_token_s", "decode_seq_s", "kv_token_s", "time_scale")


def load_profile(path: Path | None) -> EngineProfile:
    """The profile in the TOML file at ``path`` (top-level keys named like the fields), or the defaults."""
    if path is None:
        return EngineProfile()
    try:
        with path.open("rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"cannot read engine profile {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"engine profile {path} is not valid TOML: {exc}") from None
    return profile_from_dict(data, source=str(path))


def profile_from_dict(data: dict[str, Any], source: str = "engine profile") -> EngineProfile:
    """Check each value's type (TOML integers are accepted for float fields) and build the profile."""
    hints = typing.get_type_hints(EngineProfile)
    known = {field.name for field in dataclasses.fields(EngineProfile)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
    for name, value in data.items():
        if not _has_type(value, hints[name]):
            raise ConfigError(f"{source}: {name} must be {_type_name(hints[name])}, got {value!r}")
    values: dict[str, Any] = {name: float(value) if hints[name] is float else value for name, value in data.items()}
    return EngineProfile(**values)


def _has_type(value: object, hint: Any) -> bool:
    if typing.get_origin(hint) is Literal:
        return value in typing.get_args(hint)
    if isinstance(value, bool):  # bool is an int subclass, and `true` is no number of blocks
        return hint is bool
    if hint is float:
        return isinstance(value, int | float)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(choice) for choice in typing.get_args(hint))
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[hint]
