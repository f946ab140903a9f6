"""The usage use cases on the in-memory store: parameters checked as OpenAI's, a tenant scoped to its own rows,
pages followed to the end."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from backfill.config import Settings
from backfill.domain.usage_report import UsageCounts, UsageKey, UsageKind
from backfill.errors import InvalidRequest
from backfill.testing import InMemoryStore
from backfill.usecases import usage as uc

HOUR = 3600
T0 = 1_700_000_000 // 86_400 * 86_400


@dataclass
class Deps:
    store: InMemoryStore = field(default_factory=InMemoryStore)
    settings: Settings = field(default_factory=Settings)
    at: int = T0 + 10 * HOUR

    def now(self) -> int:
        return self.at


async def _deps() -> tuple[Deps, str, str]:
    deps = Deps()
    one = await deps.store.ensure_tenant("one", T0)
    two = await deps.store.ensure_tenant("two", T0)
    await deps.store.add_usage(
        {
            UsageKey(one, "m", T0 + 60, UsageKind.BATCH): UsageCounts(1, 10, 0, 1),
            UsageKey(two, "m", T0 + 5 * HOUR, UsageKind.INTERACTIVE): UsageCounts(2, 20, 0, 2),
        }
    )
    return deps, one, two


@pytest.mark.parametrize(
    ("query", "param"),
    [
        (uc.ReportQuery(start_time=T0, bucket_width="2h"), "bucket_width"),
        (uc.ReportQuery(start_time=T0, bucket_width="1d", limit=32), "limit"),
        (uc.ReportQuery(start_time=T0, end_time=T0), "end_time"),
        (uc.ReportQuery(start_time=T0, group_by=["user_id"]), "group_by"),
        (uc.ReportQuery(start_time=T0, page="abc"), "page"),
    ],
)
async def test_bad_parameters_are_refused_naming_the_parameter(query: uc.ReportQuery, param: str) -> None:
    deps, _, _ = await _deps()

    with pytest.raises(InvalidRequest) as refused:
        await uc.completions_usage(deps, None, query)

    assert param == refused.value.param


async def test_a_tenant_sees_only_its_own_rows() -> None:
    deps, one, _ = await _deps()

    page = await uc.completions_usage(deps, one, uc.ReportQuery(start_time=T0, group_by=["project_id"]))

    results = [result for bucket in page["data"] for result in bucket["results"]]
    assert [("one", 1)] == [(result["project_id"], result["num_model_requests"]) for result in results]


async def test_pages_follow_to_the_end_of_the_window() -> None:
    deps, _, _ = await _deps()
    query = uc.ReportQuery(start_time=T0, bucket_width="1h", limit=4)

    first = await uc.completions_usage(deps, None, query)
    second = await uc.completions_usage(deps, None, uc.ReportQuery(**{**query.__dict__, "page": first["next_page"]}))
    third = await uc.completions_usage(deps, None, uc.ReportQuery(**{**query.__dict__, "page": second["next_page"]}))

    assert (True, True, False) == (first["has_more"], second["has_more"], third["has_more"])
    requests = [
        sum(result["num_model_requests"] for bucket in page["data"] for result in bucket["results"])
        for page in (first, second, third)
    ]
    assert [1, 2, 0] == requests
    assert 10 == sum(len(page["data"]) for page in (first, second, third))
