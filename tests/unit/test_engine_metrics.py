"""Reading an engine's load from its metrics (every flavour, TTFT interval and quantile math), and what the adaptive
limit does with its queue."""

from __future__ import annotations

import math

import httpx
import pytest

from backfill.backends.engine_metrics import (
    METRIC_NAMES,
    WAITING_METRIC,
    EngineLoad,
    EngineMetrics,
    Histogram,
    MetricNames,
    parse_load,
    parse_samples,
    parse_waiting,
    quantile,
    ttft_between,
)
from backfill.config import BackendSettings
from backfill.policy.limits import AdaptiveConcurrency

VLLM = """# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="a"} 3.0
vllm:num_requests_waiting{model_name="b"} 2.0
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="a"} 7.0
"""


def test_waiting_is_summed_over_models() -> None:
    assert 5 == parse_waiting(VLLM, WAITING_METRIC["vllm"])


def test_each_flavour_has_its_metric() -> None:
    sglang = '# TYPE sglang:num_queue_reqs gauge\nsglang:num_queue_reqs{model_name="m"} 4\n'
    llamacpp = "# TYPE llamacpp:requests_deferred gauge\nllamacpp:requests_deferred 1\n"
    assert 4 == parse_waiting(sglang, WAITING_METRIC["sglang"])
    assert 1 == parse_waiting(llamacpp, WAITING_METRIC["llamacpp"])


def test_absent_or_garbled_metrics_give_nothing() -> None:
    assert parse_waiting(VLLM, WAITING_METRIC["sglang"]) is None
    assert parse_waiting("this is { not prometheus", WAITING_METRIC["vllm"]) is None


def test_a_lasting_queue_in_the_engine_brings_the_limit_down_to_what_it_runs() -> None:
    limit = AdaptiveConcurrency(max_limit=1024, initial=300)
    limit.on_engine_load(0.0, waiting=50, in_flight=300)
    assert 300 == limit.current  # one reading: maybe just a burst of arrivals before the next iteration
    limit.on_engine_load(1.0, waiting=44, in_flight=300)
    assert 300 - 44 + 6 == limit.current  # tolerance: 2% of the limit, at least 2


def test_a_passing_burst_does_not_cut() -> None:
    limit = AdaptiveConcurrency(max_limit=1024, initial=128)
    limit.on_engine_load(0.0, waiting=99, in_flight=128)
    assert 128 == limit.current
    limit.on_engine_load(1.0, waiting=0, in_flight=128)
    assert 256 == limit.current  # a quiet reading while the limit binds: slow start doubles


def test_slow_start_doubles_per_quiet_reading_until_a_lasting_queue() -> None:
    limit = AdaptiveConcurrency(max_limit=1024, initial=16)
    for t in range(4):
        limit.on_engine_load(float(t), waiting=0, in_flight=limit.current)
    assert 256 == limit.current
    limit.on_engine_load(4.0, waiting=40, in_flight=256)
    limit.on_engine_load(5.0, waiting=40, in_flight=256)  # the engine holds about 220 of ours: back to that
    assert 256 - 40 + 5 == limit.current
    limit.on_engine_load(6.0, waiting=0, in_flight=limit.current)
    assert 221 + 22 == limit.current  # after slow start: 10% a quiet second


def test_no_queue_while_the_limit_binds_grows_it() -> None:
    limit = AdaptiveConcurrency(max_limit=1024, initial=100)
    limit.on_engine_load(0.0, waiting=50, in_flight=100)
    limit.on_engine_load(0.5, waiting=50, in_flight=100)  # a lasting queue: ends slow start
    before = limit.current
    limit.on_engine_load(1.0, waiting=0, in_flight=before)
    grown = limit.current
    limit.on_engine_load(2.0, waiting=0, in_flight=10)  # demand below the limit: nothing to learn
    assert (True, grown) == (before < grown, limit.current)


def test_with_engine_reports_slow_start_grows_per_success_without_throughput_rounds() -> None:
    limit = AdaptiveConcurrency(max_limit=1024, initial=16)
    limit.on_engine_load(0.0, waiting=0, in_flight=16)  # a quiet reading: doubled to 32
    for i in range(50):
        limit.on_start(i * 0.01, limit.current)
        limit.on_finish(i * 0.01, 1.0, tokens=100, overloaded=False)
    assert 82 == limit.current


# --- load signals: one scrape, every flavour -------------------------------------------------------------------

LLAMA = 'model_name="meta-llama/Llama-3.1-8B-Instruct"'
TTFT_BOUNDS = ("0.001", "0.005", "0.01", "0.02", "0.04", "0.06", "0.08", "0.1", "0.25", "0.5", "0.75", "1.0", "2.5",
               "5.0", "7.5", "10.0", "+Inf")  # fmt: skip


def histogram_lines(name: str, labels: str, counts: list[int], total_s: float) -> str:
    """A histogram's samples as prometheus_client writes them: _sum, one _bucket per bound (le first), _count."""
    assert len(counts) == len(TTFT_BOUNDS)
    lines = [f"{name}_sum{{{labels}}} {total_s}"]
    lines += [f'{name}_bucket{{le="{le}",{labels}}} {float(n)}' for le, n in zip(TTFT_BOUNDS, counts, strict=True)]
    lines.append(f"{name}_count{{{labels}}} {float(counts[-1])}")
    return "\n".join(lines) + "\n"


ENGINE_0 = [0, 0, 0, 2, 10, 20, 30, 40, 60, 80, 90, 95, 99, 100, 100, 100, 100]
ENGINE_1 = [0, 0, 1, 3, 5, 10, 15, 20, 30, 40, 45, 48, 50, 50, 50, 50, 50]

# vLLM V1 with two data-parallel engines: every sample labelled by engine and model.
VLLM_V1 = (
    "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
    "# TYPE vllm:num_requests_running gauge\n"
    f'vllm:num_requests_running{{engine="0",{LLAMA}}} 12.0\n'
    f'vllm:num_requests_running{{engine="1",{LLAMA}}} 9.0\n'
    "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n"
    "# TYPE vllm:num_requests_waiting gauge\n"
    f'vllm:num_requests_waiting{{engine="0",{LLAMA}}} 3.0\n'
    f'vllm:num_requests_waiting{{engine="1",{LLAMA}}} 0.0\n'
    "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n"
    "# TYPE vllm:kv_cache_usage_perc gauge\n"
    f'vllm:kv_cache_usage_perc{{engine="0",{LLAMA}}} 0.42\n'
    f'vllm:kv_cache_usage_perc{{engine="1",{LLAMA}}} 0.61\n'
    "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.\n"
    "# TYPE vllm:prompt_tokens_total counter\n"
    f'vllm:prompt_tokens_total{{engine="0",{LLAMA}}} 81234.0\n'
    f'vllm:prompt_tokens_total{{engine="1",{LLAMA}}} 40000.0\n'
    "# HELP vllm:generation_tokens_total Number of generation tokens processed.\n"
    "# TYPE vllm:generation_tokens_total counter\n"
    f'vllm:generation_tokens_total{{engine="0",{LLAMA}}} 9000.0\n'
    f'vllm:generation_tokens_total{{engine="1",{LLAMA}}} 4000.0\n'
    "# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.\n"
    "# TYPE vllm:time_to_first_token_seconds histogram\n"
    + histogram_lines("vllm:time_to_first_token_seconds", f'engine="0",{LLAMA}', ENGINE_0, 21.5)
    + histogram_lines("vllm:time_to_first_token_seconds", f'engine="1",{LLAMA}', ENGINE_1, 8.5)
    + "# HELP vllm:e2e_request_latency_seconds Histogram of end to end request latency in seconds.\n"
    "# TYPE vllm:e2e_request_latency_seconds histogram\n"
    + histogram_lines("vllm:e2e_request_latency_seconds", f'engine="0",{LLAMA}', [7] * 17, 99.0)
)

# vLLM's V0 engine (before 0.10) named the KV gauge after the GPU.
VLLM_V0 = (
    "# TYPE vllm:num_requests_running gauge\n"
    f"vllm:num_requests_running{{{LLAMA}}} 4.0\n"
    "# TYPE vllm:num_requests_waiting gauge\n"
    f"vllm:num_requests_waiting{{{LLAMA}}} 0.0\n"
    "# TYPE vllm:num_requests_swapped gauge\n"
    f"vllm:num_requests_swapped{{{LLAMA}}} 0.0\n"
    "# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage.\n"
    "# TYPE vllm:gpu_cache_usage_perc gauge\n"
    f"vllm:gpu_cache_usage_perc{{{LLAMA}}} 0.25\n"
)

# SGLang with --enable-metrics, two tensor-parallel ranks reporting, counters beside the gauges.
SGLANG = (
    "# HELP sglang:prompt_tokens_total Number of prefill tokens processed.\n"
    "# TYPE sglang:prompt_tokens_total counter\n"
    f'sglang:prompt_tokens_total{{{LLAMA},tp_rank="0"}} 8.128902e+06\n'
    "# HELP sglang:num_running_reqs The number of running requests.\n"
    "# TYPE sglang:num_running_reqs gauge\n"
    f'sglang:num_running_reqs{{{LLAMA},tp_rank="0"}} 30.0\n'
    f'sglang:num_running_reqs{{{LLAMA},tp_rank="1"}} 28.0\n'
    "# HELP sglang:token_usage The token usage.\n"
    "# TYPE sglang:token_usage gauge\n"
    f'sglang:token_usage{{{LLAMA},tp_rank="0"}} 0.28\n'
    f'sglang:token_usage{{{LLAMA},tp_rank="1"}} 0.31\n'
    "# HELP sglang:num_queue_reqs The number of requests in the waiting queue.\n"
    "# TYPE sglang:num_queue_reqs gauge\n"
    f'sglang:num_queue_reqs{{{LLAMA},tp_rank="0"}} 5.0\n'
    f'sglang:num_queue_reqs{{{LLAMA},tp_rank="1"}} 2.0\n'
    "# HELP sglang:time_to_first_token_seconds Histogram of time to first token in seconds.\n"
    "# TYPE sglang:time_to_first_token_seconds histogram\n"
    + histogram_lines("sglang:time_to_first_token_seconds", f'{LLAMA},tp_rank="0"', ENGINE_0, 21.5)
)

# llama.cpp's server with --metrics: no labels, counters and gauges, nothing about the KV cache or latency.
LLAMACPP = """# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 33065
# HELP llamacpp:tokens_predicted_total Number of generation tokens processed.
# TYPE llamacpp:tokens_predicted_total counter
llamacpp:tokens_predicted_total 7801
# HELP llamacpp:prompt_tokens_seconds Average prompt throughput in tokens/s.
# TYPE llamacpp:prompt_tokens_seconds gauge
llamacpp:prompt_tokens_seconds 140.262
# HELP llamacpp:requests_processing Number of requests processing.
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 4
# HELP llamacpp:requests_deferred Number of requests deferred.
# TYPE llamacpp:requests_deferred gauge
llamacpp:requests_deferred 2
"""


def test_vllm_load_sums_engines_and_takes_the_fullest_cache() -> None:
    load = parse_load(VLLM_V1, METRIC_NAMES["vllm"])

    assert load is not None
    assert (21, 3, 0.61) == (load.running, load.waiting, load.kv_usage)
    assert load.ttft is not None
    summed = tuple((float(le), float(a + b)) for le, a, b in zip(TTFT_BOUNDS, ENGINE_0, ENGINE_1, strict=True))
    assert Histogram(summed, 150.0, 30.0) == load.ttft


def test_older_vllm_reports_kv_usage_under_its_gpu_name() -> None:
    assert EngineLoad(4, 0, 0.25, None) == parse_load(VLLM_V0, METRIC_NAMES["vllm"])


def test_sglang_load() -> None:
    load = parse_load(SGLANG, METRIC_NAMES["sglang"])

    assert load is not None
    assert (58, 7, 0.31) == (load.running, load.waiting, load.kv_usage)
    assert load.ttft is not None
    assert (100.0, 21.5, (math.inf, 100.0)) == (load.ttft.count, load.ttft.sum, load.ttft.buckets[-1])


def test_llamacpp_load_has_queue_counts_and_tokens_only() -> None:
    assert EngineLoad(4, 2, None, None, tokens=33065 + 7801) == parse_load(LLAMACPP, METRIC_NAMES["llamacpp"])


def test_tokens_add_prompt_and_generation_counters_over_label_sets() -> None:
    load = parse_load(VLLM_V1, METRIC_NAMES["vllm"])
    assert load is not None
    assert load.tokens == 81234 + 40000 + 9000 + 4000


def test_tokens_are_unknown_unless_both_counters_are_reported() -> None:
    text = "# TYPE vllm:prompt_tokens_total counter\nvllm:prompt_tokens_total 10\n"
    load = parse_load(text + "vllm:num_requests_waiting 0\n", METRIC_NAMES["vllm"])
    assert load is not None
    assert load.tokens is None


def test_samples_are_found_by_their_exposed_names() -> None:
    samples = parse_samples(VLLM_V1 + LLAMACPP)

    assert samples is not None
    # The parser names a counter's family without "_total" and a histogram's without its suffixes.
    assert [121234.0, 33065.0] == [
        sum(v for _, v in samples["vllm:prompt_tokens_total"]),
        sum(v for _, v in samples["llamacpp:prompt_tokens_total"]),
    ]
    assert "vllm:prompt_tokens" not in samples
    assert 34 == len(samples["vllm:time_to_first_token_seconds_bucket"])


def test_a_histogram_without_type_lines_is_read_too() -> None:
    untyped = "\n".join(line for line in SGLANG.splitlines() if not line.startswith("#")) + "\n"
    assert parse_load(SGLANG, METRIC_NAMES["sglang"]) == parse_load(untyped, METRIC_NAMES["sglang"])


def test_label_sets_with_different_buckets_are_summed_on_the_bounds_they_share() -> None:
    text = (
        'm_bucket{le="0.1",model_name="a"} 1\nm_bucket{le="0.5",model_name="a"} 2\n'
        'm_bucket{le="+Inf",model_name="a"} 3\n'
        'm_bucket{le="0.5",model_name="b"} 4\nm_bucket{le="+Inf",model_name="b"} 5\n'
        'm_count{model_name="a"} 3\nm_count{model_name="b"} 5\nm_sum{model_name="a"} 1\nm_sum{model_name="b"} 2\n'
    )
    names = MetricNames(running="r", waiting="w", ttft="m")
    assert EngineLoad(None, None, None, Histogram(((0.5, 6.0), (math.inf, 8.0)), 8.0, 3.0)) == parse_load(text, names)


def test_unreadable_or_foreign_text_gives_no_load() -> None:
    html = "<html><head><title>404 Not Found</title></head><body>nginx</body></html>"
    nan = "vllm:num_requests_waiting NaN\nvllm:kv_cache_usage_perc +Inf\n"
    for text in ("this is { not prometheus", html, "\x00\xff garbage", 'x{le="1" 2\n', nan):
        assert parse_load(text, METRIC_NAMES["vllm"]) is None, text
    assert parse_load(LLAMACPP, METRIC_NAMES["vllm"]) is None  # nothing of vLLM's in it
    assert parse_load("", METRIC_NAMES["sglang"]) is None


def test_a_histogram_missing_its_inf_bucket_or_with_a_bad_bound_is_not_used() -> None:
    text = '# TYPE vllm:time_to_first_token_seconds histogram\nvllm:time_to_first_token_seconds_bucket{le="1.0"} 3\n'
    text += 'sglang:time_to_first_token_seconds_bucket{le="a"} 1\n'
    text += "# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting 1\n"
    text += "sglang:num_queue_reqs 2\n"
    assert EngineLoad(None, 1, None, None) == parse_load(text, METRIC_NAMES["vllm"])
    assert EngineLoad(None, 2, None, None) == parse_load(text, METRIC_NAMES["sglang"])


# --- interval and quantile math ------------------------------------------------------------------------------

INF = math.inf


def test_the_interval_histogram_is_the_difference_of_two_scrapes() -> None:
    before = Histogram(((0.1, 10.0), (0.5, 30.0), (INF, 40.0)), 40.0, 9.0)
    after = Histogram(((0.1, 15.0), (0.5, 45.0), (INF, 60.0)), 60.0, 20.0)
    assert Histogram(((0.1, 5.0), (0.5, 15.0), (INF, 20.0)), 20.0, 11.0) == ttft_between(before, after)


def test_a_counter_reset_gives_no_interval() -> None:
    before = Histogram(((0.1, 10.0), (0.5, 30.0), (INF, 40.0)), 40.0, 9.0)
    restarted = Histogram(((0.1, 1.0), (0.5, 2.0), (INF, 3.0)), 3.0, 0.5)
    one_bucket_dips = Histogram(((0.1, 9.0), (0.5, 31.0), (INF, 41.0)), 41.0, 9.5)
    rebucketed = Histogram(((0.2, 20.0), (0.5, 40.0), (INF, 50.0)), 50.0, 12.0)
    assert [None, None, None] == [ttft_between(before, h) for h in (restarted, one_bucket_dips, rebucketed)]


def test_an_idle_interval_is_empty_and_has_no_quantile() -> None:
    h = Histogram(((0.1, 10.0), (INF, 10.0)), 10.0, 0.5)
    idle = ttft_between(h, h)
    assert idle is not None
    assert (0.0, None) == (idle.count, quantile(idle, 0.99))


def test_quantile_interpolates_linearly_within_its_bucket() -> None:
    h = Histogram(((0.1, 10.0), (0.5, 30.0), (1.0, 40.0), (INF, 40.0)), 40.0, 14.0)
    assert 0.3 == pytest.approx(quantile(h, 0.5))  # rank 20: half way through (0.1, 0.5]
    assert 0.98 == pytest.approx(quantile(h, 0.99))  # rank 39.6: 9.6 of the 10 in (0.5, 1.0]
    assert 0.02 == pytest.approx(quantile(h, 0.05))  # the first bucket starts at 0
    assert 1.0 == pytest.approx(quantile(h, 1.0))


def test_a_quantile_in_the_inf_bucket_is_the_highest_finite_bound() -> None:
    h = Histogram(((0.1, 10.0), (0.5, 10.0), (INF, 20.0)), 20.0, 30.0)
    assert 0.5 == quantile(h, 0.9)


def test_quantile_of_a_parsed_scrape() -> None:
    load = parse_load(VLLM_V1, METRIC_NAMES["vllm"])
    assert load is not None
    assert load.ttft is not None
    # 150 observations: rank 75 lies in (0.1, 0.25], which holds 90 - 60 = 30 of them, 15 below the rank.
    assert 0.1 + 0.15 * 15 / 30 == pytest.approx(quantile(load.ttft, 0.5))


def test_quantile_refuses_a_q_outside_0_to_1() -> None:
    with pytest.raises(ValueError, match="between 0 and 1"):
        quantile(Histogram(((1.0, 1.0), (INF, 1.0)), 1.0, 0.5), 1.5)


# --- scraping ------------------------------------------------------------------------------------------------


async def test_load_scrapes_the_metrics_beside_v1() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(200, text=SGLANG)

    settings = BackendSettings(name="s", url="http://engine:30000/v1", models=["m"], flavour="sglang")
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        probe = EngineMetrics(settings, client)
        load = await probe.load()
        waiting = await probe.waiting()

    assert ["http://engine:30000/metrics"] * 2 == seen
    assert (58, 7, 7) == (load.running if load else None, load.waiting if load else None, waiting)


async def test_a_server_without_metrics_gives_no_load() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(501, text="metrics are not enabled")

    settings = BackendSettings(name="l", url="http://engine:8080", models=["m"], flavour="llamacpp")
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        assert await EngineMetrics(settings, client).load() is None
