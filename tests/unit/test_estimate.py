"""Completion estimates: a fluid model of the fair scheduler; promotion and at-risk flags."""

from __future__ import annotations

import math

import pytest

from backfill.domain.estimates import expected_output_tokens, max_output_tokens, prefix_key
from backfill.domain.valid_lines import LineColumns, ValidLine, estimates, group_by_prefix, rows
from backfill.policy.estimate import WorkItem, estimate_completions, outlook, promote_margin_s


def test_one_batch_finishes_after_its_work_at_the_pool_rate() -> None:
    assert {"b": 110.0} == estimate_completions(100.0, [WorkItem("b", "t", 1e9, 1000.0)], 100.0)


def test_two_tenants_share_then_the_survivor_takes_everything() -> None:
    etas = estimate_completions(0.0, [WorkItem("small", "a", 1e9, 100.0), WorkItem("big", "b", 1e9, 900.0)], 10.0)
    assert 20.0 == pytest.approx(etas["small"])  # half of 10/s for 100
    assert 100.0 == pytest.approx(etas["big"])  # all 1000 units at 10/s


def test_within_a_tenant_the_earlier_deadline_runs_first() -> None:
    items = [WorkItem("late", "a", 500.0, 100.0), WorkItem("soon", "a", 100.0, 100.0)]
    etas = estimate_completions(0.0, items, 10.0)
    assert (10.0, 20.0) == (pytest.approx(etas["soon"]), pytest.approx(etas["late"]))


def test_weights_set_the_shares() -> None:
    items = [WorkItem("x", "a", 1e9, 300.0, weight=3.0), WorkItem("y", "b", 1e9, 100.0)]
    etas = estimate_completions(0.0, items, 4.0)
    assert 100.0 == pytest.approx(etas["x"]) == pytest.approx(etas["y"])


def test_no_measured_rate_means_no_estimate() -> None:
    assert math.isinf(estimate_completions(0.0, [WorkItem("b", "t", 1.0, 5.0)], 0.0)["b"])


def test_promotion_margin_and_at_risk() -> None:
    assert 300.0 == promote_margin_s(600)
    assert 360.0 == promote_margin_s(3600)
    assert 8640.0 == promote_margin_s(86_400)
    calm = outlook(eta=1000.0, deadline=5000.0, window_s=3600, finishing_alone_at=900.0)
    assert (False, False) == (calm.promoted, calm.at_risk)
    tight = outlook(eta=4900.0, deadline=5000.0, window_s=3600, finishing_alone_at=2000.0)
    assert (True, False) == (tight.promoted, tight.at_risk)
    hopeless = outlook(eta=9000.0, deadline=5000.0, window_s=3600, finishing_alone_at=6000.0)
    assert (True, True) == (hopeless.promoted, hopeless.at_risk)


def chat(system: str, user: str) -> dict:
    return {"model": "m", "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}


def test_lines_sharing_a_system_prompt_share_a_prefix_key() -> None:
    assert prefix_key(chat("You classify reviews.", "great")) == prefix_key(chat("You classify reviews.", "awful"))
    assert prefix_key(chat("You classify reviews.", "great")) != prefix_key(chat("You summarise.", "great"))


def test_a_single_prompt_keys_on_its_head() -> None:
    doc = "A long shared document. " * 20
    assert prefix_key({"prompt": doc + "Q1?"}) == prefix_key({"prompt": doc + "Q2?"})
    one = {"messages": [{"role": "user", "content": doc + "Q1?"}]}
    two = {"messages": [{"role": "user", "content": [{"type": "text", "text": doc + "Q2?"}]}]}
    assert prefix_key(one) == prefix_key(two)


def test_no_prompt_no_key() -> None:
    assert 0 == prefix_key({"model": "m", "input": ["a", "b"]})
    assert 0 < prefix_key(chat("s", "u")) < 2**63


def test_output_caps_under_every_name() -> None:
    assert 7 == max_output_tokens({"max_completion_tokens": 7, "max_tokens": 9})
    assert 9 == max_output_tokens({"max_tokens": 9})
    assert 5 == max_output_tokens({"max_output_tokens": 5})
    assert max_output_tokens({"max_tokens": True}) is None
    assert 256 == expected_output_tokens(None)
    assert 20 == expected_output_tokens(20)


def test_lease_order_runs_groups_together_with_the_next_leader_one_group_ahead() -> None:
    keys = [7, 0, 9, 7, 5, 9, 7]  # 0: no usable prefix; 5 is shared by no other line
    lines = [ValidLine(n, f"c{n}", 0, 1, 1, prefix_key=key) for n, key in enumerate(keys, start=1)]
    ranked = group_by_prefix(lines)
    order = sorted(ranked, key=lambda line: (line.prefix_group, line.number))
    # groups by first appearance: 7 (1, 4, 7), 0 (2), 9 (3, 6), 5 (5)
    assert [1, 2, 4, 7, 3, 5, 6] == [line.number for line in order]
    assert len(lines) == len({line.prefix_group for line in ranked})


def test_lease_order_without_shared_prefixes_is_input_order() -> None:
    lines = [ValidLine(n, f"c{n}", 0, 1, 1, prefix_key=n * 11) for n in range(1, 6)]
    assert [0, 1, 2, 3, 4] == [line.prefix_group for line in group_by_prefix(lines)]


def test_line_columns_give_back_the_lines_and_the_ranks_of_a_list() -> None:
    keys = [7, 0, 9, 7, 5, 9, 7]
    lines = [ValidLine(n, f"c{n}", 10 * n, n, 3, None if n % 2 else n, key) for n, key in enumerate(keys, start=1)]
    columns = LineColumns()
    for line in lines:
        columns.append(line)
    assert list(group_by_prefix(lines)) == list(group_by_prefix(columns))
    assert lines[2:5] == columns[2:5]
    assert estimates(lines) == estimates(columns)
    # What the store inserts, straight from the columns: the same rows as from the objects, ranked or not.
    assert rows(lines, 2, 5) == rows(columns, 2, 5)
    ranked = group_by_prefix(lines)
    assert rows(ranked, 0, 99) == rows(group_by_prefix(columns), 0, 99)
    assert (3, "c3", 30, 3, 3, None, 0) == rows(columns, 2, 3)[0]  # an odd line has no cap; unranked: group 0


def test_lines_without_prefix_keys_rank_in_input_order() -> None:
    columns = LineColumns()
    for n in range(1, 4):
        columns.append(ValidLine(n, f"c{n}", 0, 1, 1))
    assert [0, 1, 2] == [line.prefix_group for line in group_by_prefix(columns)]
