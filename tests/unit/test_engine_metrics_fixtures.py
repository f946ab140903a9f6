"""Each flavour's metric names read against /metrics text of the real engine (tests/fixtures/metrics; each file's
header says where it comes from). Expected values are read off the fixture text by hand."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from backfill.backends.engine_metrics import METRIC_NAMES, EngineLoad, Histogram, parse_load

FIXTURES = Path(__file__).parents[1] / "fixtures" / "metrics"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def test_llamacpp_under_load_reads_its_slots_queue_and_every_token() -> None:
    # requests_processing 4, requests_deferred 1; prompt 6230 + cached prompt 19685 + predicted 154
    expected = EngineLoad(running=4, waiting=1, kv_usage=None, ttft=None, tokens=6230 + 19685 + 154)
    assert expected == parse_load(fixture("llamacpp.txt"), METRIC_NAMES["llamacpp"])


def test_llamacpp_idle_reads_zeros() -> None:
    assert EngineLoad(0, 0, None, None, tokens=0) == parse_load(fixture("llamacpp-idle.txt"), METRIC_NAMES["llamacpp"])


def test_llamacpp_tokens_include_the_prompt_tokens_served_from_its_cache() -> None:
    load = parse_load(fixture("llamacpp-after.txt"), METRIC_NAMES["llamacpp"])

    assert load is not None
    # The 18 responses' usage objects reported 27465 prompt tokens (21199 of them cached) and 216 completion tokens;
    # prompt_tokens_total alone is 6266.
    assert 27465 + 216 == load.tokens


def test_a_llamacpp_build_without_the_cached_counter_still_has_a_token_count() -> None:
    text = "".join(line for line in fixture("llamacpp-after.txt").splitlines(keepends=True) if "cached" not in line)
    load = parse_load(text, METRIC_NAMES["llamacpp"])

    assert load is not None
    assert 6266 + 216 == load.tokens


def test_sglang_reads_every_signal_from_its_published_capture() -> None:
    load = parse_load(fixture("sglang.txt"), METRIC_NAMES["sglang"])

    assert load is not None
    assert (162, 2826, 0.28) == (load.running, load.waiting, load.kv_usage)
    assert 8128902 + 7557572 == load.tokens  # cache_hit_rate and num_used_tokens are not counters of work
    ttft = Histogram(
        (
            (0.001, 0.0), (0.005, 0.0), (0.01, 0.0), (0.02, 0.0), (0.04, 1.0), (0.06, 3.0), (0.08, 6.0), (0.1, 6.0),
            (0.25, 6.0), (0.5, 6.0), (0.75, 6.0), (1.0, 27.0), (2.5, 140.0), (5.0, 314.0), (7.5, 941.0),
            (10.0, 1330.0), (15.0, 1970.0), (20.0, 2326.0), (25.0, 2417.0), (30.0, 2513.0), (math.inf, 11008.0),
        ),
        11008.0,
        2.3518979474117756e06,
    )  # fmt: skip
    assert ttft == load.ttft


def test_vllm_sums_its_two_engines_and_takes_the_fuller_cache() -> None:
    load = parse_load(fixture("vllm.txt"), METRIC_NAMES["vllm"])

    assert load is not None
    assert (24 + 19, 3 + 0, 0.6112) == (load.running, load.waiting, load.kv_usage)
    assert load.ttft is not None
    # engine 0 + engine 1, bucket by bucket
    assert (
        (0.001, 0.0), (0.005, 0.0), (0.01, 0.0), (0.02, 4.0), (0.04, 78.0), (0.06, 368.0), (0.08, 768.0),
        (0.1, 1201.0), (0.25, 2975.0), (0.5, 3673.0), (0.75, 3821.0), (1.0, 3880.0), (2.5, 3913.0), (5.0, 3916.0),
        (7.5, 3916.0), (10.0, 3916.0), (20.0, 3916.0), (40.0, 3916.0), (80.0, 3916.0), (160.0, 3916.0),
        (640.0, 3916.0), (2560.0, 3916.0), (math.inf, 3916.0),
    ) == load.ttft.buckets  # fmt: skip
    assert 2004.0 + 1912.0 == load.ttft.count
    assert pytest.approx(712.43 + 655.08) == load.ttft.sum


def test_vllm_tokens_are_whole_prompts_and_generations_without_adding_the_cached_ones_again() -> None:
    load = parse_load(fixture("vllm.txt"), METRIC_NAMES["vllm"])

    assert load is not None
    # prompt_tokens_total already holds the cached tokens (its by-source split adds up to it): 880845 + 794352 of them
    assert 1283456 + 1190233 + 402117 + 377920 == load.tokens
