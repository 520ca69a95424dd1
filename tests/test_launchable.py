"""A plan cut down to what the backend can launch (orchestrator/launchable.py), over the real planner.

The backend here is a stand-in that answers Backend.feasible by provider: what SkyPilot answers
is tests/test_sky_feasibility.py; this pins what the orchestrator does with any answer."""
from __future__ import annotations


import pytest
import yaml
from sky_catalog import catalog_offers, other_offers

from contract.backend import Feasibility
from contract.spec import load_spec
from orchestrator.launchable import launchable_plan
from orchestrator.planner import make_plan

OFFERS = catalog_offers() + other_offers("runpod", "vast")


class RefusesProviders:
    """A catalog-priced backend that cannot start anything on `refused`, and says why."""

    name, pricing, options, poll_seconds = "stand-in", "catalog", (), 1.0

    def __init__(self, *refused: str):
        self.refused = set(refused)
        self.asked: list[int] = []

    def feasible(self, spec, placements):
        self.asked.append(len(placements))
        return Feasibility(tuple(p for p in placements if p.provider not in self.refused),
                           tuple((p, f"{p.provider} is not enabled") for p in placements if p.provider in self.refused))


@pytest.fixture
def spec(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"name": "big", "model": "meta-llama/Llama-3.1-8B", "method": "qlora",
                                    "data": {"examples": 20000, "tokens_per_example": 512}}))
    return load_spec(path)


def plan_on(spec, backend, keep=100):
    plan = make_plan(spec, OFFERS, keep=keep)
    return plan, launchable_plan(spec, backend, plan, lambda n: make_plan(spec, OFFERS, keep=n), keep=keep)


def test_options_the_backend_refuses_become_rejections_with_its_reason_and_the_rest_rank_from_one(spec):
    full, plan = plan_on(spec, RefusesProviders("runpod", "vast"))
    assert {o.offer.provider for o in full.options[:5]} & {"runpod", "vast"}
    assert [o.rank for o in plan.options] == list(range(1, len(plan.options) + 1))
    assert not {o.offer.provider for o in plan.options} & {"runpod", "vast"}
    everything = make_plan(spec, OFFERS, keep=10_000)
    kept = [o.placement for o in everything.options if o.offer.provider not in ("runpod", "vast")]
    assert [o.placement for o in plan.options] == kept[:100]  # the ranking's order, nothing re-priced
    refused = [r for r in plan.rejected if r.reason == "not_launchable"]
    assert {r.detail for r in refused} == {"runpod is not enabled", "vast is not enabled"}
    assert len([r for r in refused if r.detail == "vast is not enabled"]) == 3  # the cheapest few per reason
    assert plan.assumptions["rejected_counts"]["not_launchable"] >= len(refused)
    costs = [r.expected_cost for r in plan.rejected if r.expected_cost is not None]
    assert costs == sorted(costs)  # cheapest rejected first, among the planner's own


def test_a_backend_that_refuses_nothing_gets_the_plan_unchanged(spec):
    full, plan = plan_on(spec, RefusesProviders())
    assert plan is full


def test_when_the_first_ranks_are_all_refused_the_whole_ranking_is_searched_for_launchable_ones(spec):
    """Keep only 5 options: all are on clouds this backend refuses, the ones it can launch rank lower."""
    full = make_plan(spec, OFFERS, keep=5)
    refused = {o.offer.provider for o in full.options}
    backend = RefusesProviders(*refused)
    _, plan = plan_on(spec, backend, keep=5)
    assert len(plan.options) == 5 and not {o.offer.provider for o in plan.options} & refused
    everything = make_plan(spec, OFFERS, keep=10_000)
    allowed = [o.placement for o in everything.options if o.offer.provider not in refused]
    assert [o.placement for o in plan.options] == allowed[:5]
    assert backend.asked[0] == 5 and len(backend.asked) >= 2  # asked again, in chunks, after planning again


def test_nothing_launchable_leaves_no_options_and_the_launch_says_why(spec):
    from orchestrator.jobs import JobError, choose_option

    _, plan = plan_on(spec, RefusesProviders(*{o.provider for o in OFFERS}))
    assert plan.options == ()
    with pytest.raises(JobError, match=r"no feasible option for big: .*not_launchable: \w+ is not enabled"):
        choose_option(plan, None)
