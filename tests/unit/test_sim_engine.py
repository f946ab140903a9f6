"""The engine simulator's pure model: scheduling, KV blocks, prefix cache, preemption, iteration times."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest

from backfill.sim.engine import EngineModel, SimRequest, StepResult, TokenEvent
from backfill.sim.profile import EngineProfile


def small_profile(**overrides: Any) -> EngineProfile:
    values: dict[str, Any] = {
        "max_num_seqs": 4,
        "max_num_batched_tokens": 64,
        "block_size": 4,
        "num_gpu_blocks": 128,
        "iteration_base_s": 0.01,
        "prefill_token_s": 0.001,
        "decode_seq_s": 0.0001,
        "kv_token_s": 0.00001,
    }
    values.update(overrides)
    values.setdefault("max_model_len", min(256, values["num_gpu_blocks"] * values["block_size"]))
    return EngineProfile(**values)


def hashes(tag: str, count: int) -> tuple[int, ...]:
    """Stand-ins for chained block hashes: equal tags give equal blocks."""
    return tuple(hash((tag, index)) for index in range(count))


def request(request_id: str, prompt: int = 8, output: int = 4, **fields: Any) -> SimRequest:
    return SimRequest(request_id, prompt, fields.pop("prefix_blocks", ()), output, **fields)


def run(model: EngineModel, max_steps: int = 100_000) -> list[StepResult]:
    steps = []
    while (result := model.step()) is not None:
        steps.append(result)
        assert len(steps) < max_steps, "the engine does not finish"
    return steps


def events_of(steps: list[StepResult], request_id: str) -> list[tuple[int, TokenEvent]]:
    """(step index, event) for one request."""
    return [
        (index, event) for index, step in enumerate(steps) for event in step.events if event.request_id == request_id
    ]


def first_token_step(steps: list[StepResult], request_id: str) -> int:
    return next(index for index, event in events_of(steps, request_id) if event.is_first_token)


def finish_step(steps: list[StepResult], request_id: str) -> int:
    return next(index for index, event in events_of(steps, request_id) if event.finished)


def test_an_idle_engine_has_no_step() -> None:
    model = EngineModel(small_profile())

    assert model.step() is None
    assert model.is_idle()


def test_step_duration_follows_the_formula() -> None:
    model = EngineModel(small_profile())
    model.submit(request("r", prompt=10, output=3))

    prefill, decode1, decode2 = run(model)

    assert (10, 0, 0) == (prefill.prefill_tokens, prefill.decode_seqs, prefill.context_tokens)
    assert 0.01 + 0.001 * 10 == pytest.approx(prefill.duration_s)
    assert (0, 1, 10) == (decode1.prefill_tokens, decode1.decode_seqs, decode1.context_tokens)
    assert 0.01 + 0.0001 + 0.00001 * 10 == pytest.approx(decode1.duration_s)
    assert 0.01 + 0.0001 + 0.00001 * 11 == pytest.approx(decode2.duration_s)
    assert sum(step.duration_s for step in (prefill, decode1, decode2)) == pytest.approx(model.totals.busy_s)


def test_every_request_gets_exactly_its_output_tokens_and_one_last_event() -> None:
    rng = random.Random(7)
    model = EngineModel(small_profile(num_gpu_blocks=48))
    wanted = {f"r{i}": (rng.randint(1, 100), rng.randint(1, 60)) for i in range(40)}
    for request_id, (prompt, output) in wanted.items():
        model.submit(request(request_id, prompt, output, finish_reason=rng.choice(["stop", "length"])))

    steps = run(model)

    for request_id, (_, output) in wanted.items():
        events = [event for _, event in events_of(steps, request_id)]
        assert output == sum(event.num_tokens for event in events)
        assert [True] + [False] * (output - 1) == [event.is_first_token for event in events]
        assert [False] * (output - 1) + [True] == [event.finished for event in events]
    assert sum(output for _, output in wanted.values()) == model.totals.generation_tokens
    assert sum(prompt for prompt, _ in wanted.values()) == model.totals.prompt_tokens
    assert 40 == model.totals.finished_stop + model.totals.finished_length
    assert (0, 0, 0.0) == (model.num_running, model.num_waiting, model.kv_cache_usage)


def test_iterations_respect_the_token_budget_and_max_num_seqs() -> None:
    model = EngineModel(small_profile(max_num_seqs=3, max_num_batched_tokens=32))
    for index in range(12):
        model.submit(request(f"r{index}", prompt=50, output=20))

    while (step := model.step()) is not None:
        assert step.prefill_tokens + step.decode_seqs <= 32
        assert len(step.events) <= 3
        assert model.num_running <= 3


def test_a_long_prompt_is_prefilled_in_chunks_and_the_first_token_ends_the_prefill() -> None:
    model = EngineModel(small_profile(max_num_batched_tokens=64))
    model.submit(request("long", prompt=150, output=2))

    steps = run(model)

    assert [64, 64, 22, 0] == [step.prefill_tokens for step in steps]
    assert [(), (), ("long",), ("long",)] == [tuple(e.request_id for e in step.events) for step in steps]
    assert 2 == first_token_step(steps, "long")


def test_a_prefill_only_request_finishes_with_its_prompt() -> None:
    model = EngineModel(small_profile())
    model.submit(request("embed", prompt=20, output=0))

    (step,) = run(model)

    assert [TokenEvent("embed", 0, False, "stop", 0)] == list(step.events)
    assert (20, 0) == (model.totals.prompt_tokens, model.totals.generation_tokens)


def test_a_shared_prefix_is_served_from_the_cache() -> None:
    model = EngineModel(small_profile())
    model.submit(request("a", prompt=40, output=2, prefix_blocks=hashes("system", 8) + hashes("a", 2)))
    run(model)
    model.submit(request("b", prompt=40, output=2, prefix_blocks=hashes("system", 8) + hashes("b", 2)))

    steps = run(model)

    assert 40 - 32 == steps[0].prefill_tokens
    assert 32 == steps[0].context_tokens  # the cached blocks are attended to like computed ones
    assert 32 == steps[0].events[0].cached_tokens
    assert (80, 32) == (model.totals.prefix_cache_queries, model.totals.prefix_cache_hits)


def test_a_fully_cached_prompt_still_computes_its_last_token() -> None:
    model = EngineModel(small_profile())
    prompt = request("a", prompt=40, output=1, prefix_blocks=hashes("same", 10))
    model.submit(prompt)
    run(model)
    model.submit(prompt)

    (step,) = run(model)

    assert (4, 36) == (step.prefill_tokens, step.events[0].cached_tokens)


def test_running_requests_with_the_same_prefix_hold_its_blocks_once() -> None:
    model = EngineModel(small_profile(num_gpu_blocks=100, max_num_batched_tokens=128))
    for name in ("a", "b"):
        model.submit(request(name, prompt=64, output=8, prefix_blocks=hashes("shared", 16)))

    model.step()  # both prefill the same 16 blocks in one iteration: b's copy is freed for a's
    after_prefill = model.kv_cache_usage
    model.step()  # each stores its first token in a block of its own

    assert (0.16, 0.18) == (after_prefill, model.kv_cache_usage)
    assert 16 == model.num_cached_blocks


def test_with_prefix_caching_off_nothing_is_cached() -> None:
    model = EngineModel(small_profile(enable_prefix_caching=False))
    prompt = request("a", prompt=40, output=1, prefix_blocks=hashes("same", 10))
    model.submit(prompt)
    run(model)
    model.submit(prompt)

    (step,) = run(model)

    assert (40, 0, 0) == (step.prefill_tokens, step.events[0].cached_tokens, model.num_cached_blocks)
    assert (0, 0) == (model.totals.prefix_cache_queries, model.totals.prefix_cache_hits)


def test_the_cache_evicts_the_least_recently_freed_blocks_first() -> None:
    model = EngineModel(small_profile(num_gpu_blocks=24))
    a, b = (request(tag, prompt=32, output=1, prefix_blocks=hashes(tag, 8)) for tag in "ab")
    for prompt in (a, b):
        model.submit(prompt)
        run(model)
    # 16 cached blocks, 8 never used: c needs 12, so the 4 least recently freed go, a's last 4 (tails go first).
    model.submit(request("c", prompt=48, output=1, prefix_blocks=hashes("c", 12)))
    run(model)

    model.submit(b)
    (b_again,) = run(model)
    model.submit(a)
    a_again = run(model)[0]

    assert 28 == b_again.events[0].cached_tokens  # all but the last token: nothing of b was evicted
    assert 12 == a_again.events[0].cached_tokens  # a's head survived c; b's one new block took a3, the next LRU


def test_a_decode_without_free_blocks_preempts_the_latest_request() -> None:
    model = EngineModel(small_profile(num_gpu_blocks=8, enable_prefix_caching=False))
    model.submit(request("first", prompt=8, output=12))
    model.submit(request("second", prompt=8, output=12))

    steps = run(model)

    assert 1 <= model.totals.preemptions
    assert finish_step(steps, "first") < finish_step(steps, "second")
    for name in ("first", "second"):
        assert 12 == sum(event.num_tokens for _, event in events_of(steps, name))
    # The preempted request recomputes its prompt and the tokens it had generated, in one chunk.
    assert any(step.prefill_tokens > 8 for step in steps)


def test_priority_policy_admits_lower_values_first() -> None:
    model = EngineModel(small_profile(scheduling_policy="priority", max_num_seqs=1))
    model.submit(request("background", output=3, priority=5, arrival_s=0.0))
    model.submit(request("urgent", output=3, priority=0, arrival_s=1.0))
    model.submit(request("urgent-later", output=3, priority=0, arrival_s=2.0))

    steps = run(model)

    order = sorted(("urgent", "urgent-later", "background"), key=lambda name: first_token_step(steps, name))
    assert ["urgent", "urgent-later", "background"] == order


def test_a_waiting_higher_priority_request_preempts_a_running_one() -> None:
    model = EngineModel(small_profile(scheduling_policy="priority", max_num_seqs=1))
    model.submit(request("background", output=10, priority=5))
    model.step()
    model.step()
    model.submit(request("urgent", output=3, priority=0, arrival_s=1.0))

    steps = run(model)

    assert 1 == model.totals.preemptions
    assert 0 == first_token_step(steps, "urgent")
    assert finish_step(steps, "urgent") < finish_step(steps, "background")
    assert 10 - 2 == sum(event.num_tokens for _, event in events_of(steps, "background"))


def test_under_the_priority_policy_kv_pressure_preempts_the_lowest_priority() -> None:
    model = EngineModel(small_profile(scheduling_policy="priority", num_gpu_blocks=8, enable_prefix_caching=False))
    model.submit(request("background", prompt=8, output=12, priority=5))
    model.step()
    model.submit(request("urgent", prompt=8, output=12, priority=0, arrival_s=1.0))  # admitted second

    steps = run(model)

    assert 1 <= model.totals.preemptions
    assert finish_step(steps, "urgent") < finish_step(steps, "background")


def test_abort_frees_the_blocks_and_drops_the_request() -> None:
    model = EngineModel(small_profile(max_num_seqs=1))
    model.submit(request("running", prompt=40, output=50))
    model.submit(request("waiting", prompt=40, output=50))
    model.step()
    assert 0 < model.kv_cache_usage

    assert model.abort("running")
    assert model.abort("waiting")
    assert not model.abort("waiting")
    assert not model.abort("never-seen")

    assert (0.0, 0, 0, 2) == (model.kv_cache_usage, model.num_running, model.num_waiting, model.totals.aborted)
    assert model.step() is None


def test_an_aborted_waiting_request_is_skipped() -> None:
    model = EngineModel(small_profile(max_num_seqs=1))
    for name in ("a", "b", "c"):
        model.submit(request(name, output=2))
    model.abort("b")

    steps = run(model)

    assert Counter({"a": 2, "c": 2}) == Counter(event.request_id for step in steps for event in step.events)


def test_submit_rejects_duplicates_and_requests_that_could_never_fit() -> None:
    model = EngineModel(small_profile(num_gpu_blocks=64, block_size=4))
    model.submit(request("a"))

    with pytest.raises(ValueError, match="already"):
        model.submit(request("a"))
    with pytest.raises(ValueError, match="KV cache"):
        model.submit(request("huge", prompt=250, output=10))
    with pytest.raises(ValueError, match="prefix"):
        model.submit(request("odd", prompt=8, prefix_blocks=hashes("x", 3)))
