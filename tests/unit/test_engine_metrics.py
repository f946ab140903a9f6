"""Reading an engine's queue from its metrics, and what the adaptive limit does with it."""

from __future__ import annotations

from backfill.backends.engine_metrics import WAITING_METRIC, parse_waiting
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
    limit.on_engine_load(1.0, waiting=0, in_flight=128)
    assert 128 == limit.current


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
    limit.on_engine_load(0.0, waiting=0, in_flight=16)
    for i in range(50):
        limit.on_start(i * 0.01, limit.current)
        limit.on_finish(i * 0.01, 1.0, tokens=100, overloaded=False)
    assert 66 == limit.current
