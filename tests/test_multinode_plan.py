"""Plans that span nodes (constraints.max_nodes): N instances of one type at N x its price, memory
sharded over all N x G GPUs, speed and spot risk as the calibration's scaling figures say, and the
fewest nodes that fit and meet the deadline chosen. Pure planner over the bundled catalog."""
from __future__ import annotations

import dataclasses
import json
import math
from decimal import Decimal
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings, strategies as st
from jsonschema import Draft202012Validator
from typer.testing import CliRunner

from contract.backend import Feasibility
from contract.spec import parse_spec
from launch.local import LocalBackend
from orchestrator.catalog import load_offers
from orchestrator.cli import app
from orchestrator.estimate import load_calibration
from orchestrator.estimate.figures import InterNodeScaling, PreemptionRisk
from orchestrator.estimate.preemption import preemption_overhead_hours
from orchestrator.execution import PinnedExecutionError
from orchestrator.launchable import launchable_plan
from orchestrator.planner import NoFeasibleOption, explain_nodes, make_plan
from orchestrator.quote import Offer

ROOT = Path(__file__).resolve().parents[1]
SPEC_70B = ROOT / "recipes" / "configs" / "llama3.1-70b-full-multinode.yaml"
SCHEMA = json.loads((ROOT / "docs" / "spotune.schema.json").read_text())
OFFERS = load_offers(include_sky=False)
ALL = 100_000   # keep every feasible option


def spec_70b(**constraints):
    raw = yaml.safe_load(SPEC_70B.read_text())
    raw["constraints"].update(constraints)
    raw["data"].pop("path")   # planned from its sizes, as before the data exists
    return parse_spec(raw)


def eight_h100(on_demand="20.00", spot="8.00", provider="aws") -> Offer:
    return Offer(provider=provider, region="us-east-1", instance_type="p5.48xlarge", gpu="H100", gpu_count=8,
                 vram_gb_per_gpu=80.0, price_on_demand=Decimal(on_demand), price_spot=Decimal(spot), read_on="2026-11-22")


def test_a_70b_full_fine_tune_fits_on_several_nodes_and_on_one_does_not():
    plan = make_plan(spec_70b(), OFFERS, keep=ALL)
    assert plan.options and min(o.num_nodes for o in plan.options) >= 2
    best = plan.best
    assert best.execution.sharding == "fsdp" and best.memory_gb_per_gpu <= best.offer.vram_gb_per_gpu
    with pytest.raises(NoFeasibleOption) as one_node:
        make_plan(spec_70b(max_nodes=1), OFFERS)
    message = str(one_node.value)
    assert "GB across GPUs" in message and "the largest allowed option has 640 GB" in message
    assert "constraints.max_nodes > 1" in message


def test_every_option_prices_n_instances_and_runs_as_the_recipe_requires():
    spec = spec_70b()
    for o in make_plan(spec, OFFERS, keep=ALL).options:
        n, placement, ex = o.num_nodes, o.placement, o.execution
        assert o.price_per_hour == o.offer.price(o.spot) * n == placement.price_per_hour
        assert placement.num_nodes == n and placement.node_price_per_hour == o.offer.price(o.spot)
        assert (ex.num_nodes, ex.gpu_count, ex.world_size) == (n, o.offer.gpu_count, n * o.offer.gpu_count)
        assert ex.grad_accum * ex.micro_batch * ex.world_size == spec.batch.global_
        # The node spec carrying this config passes the recipe's own checks (contract/spec.py).
        node = parse_spec(spec.node_spec(execution=ex))
        assert node.execution == ex
        assert o.to_json()["num_nodes"] == n and o.to_json()["execution"]["num_nodes"] == n


def test_the_cheapest_node_count_meets_the_deadline_and_a_tighter_deadline_takes_more_nodes():
    plan = make_plan(spec_70b(), OFFERS, keep=ALL)
    best, deadline = plan.best, spec_70b().constraints.deadline_hours
    assert best.expected_hours <= deadline
    nodes = plan.assumptions["nodes"]
    assert nodes["chosen"] == best.num_nodes and nodes["max_nodes"] == 4
    by_count = {c["num_nodes"]: c for c in nodes["by_count"]}
    assert by_count[1]["verdict"] == "does_not_fit_memory"
    assert all(by_count[n]["verdict"] != "feasible" for n in by_count if n < best.num_nodes)
    assert nodes["not_priced"] == [3]   # 24 GPUs do not split batch.global 32

    # A deadline the chosen count misses: the planner goes to more nodes, at a higher cost.
    tighter = make_plan(spec_70b(deadline_hours=best.expected_hours * 0.9), OFFERS, keep=ALL)
    assert tighter.best.num_nodes > best.num_nodes
    assert tighter.best.expected_cost > best.expected_cost
    assert tighter.best.expected_hours <= best.expected_hours * 0.9
    why = tighter.assumptions["nodes"]["why"]
    assert why.startswith(f"{tighter.best.num_nodes} nodes: 1 node does not fit (needs ")
    assert " h, over the " in why and " h deadline" in why


def test_for_one_offer_time_falls_and_cost_rises_with_nodes_as_the_calibration_says():
    cal = load_calibration()
    spec = spec_70b(gpus=None, deadline_hours=None)
    plan = make_plan(spec, [eight_h100()], keep=ALL)
    for spot in (False, True):
        by_n = sorted((o for o in plan.options if o.spot == spot), key=lambda o: o.num_nodes)
        assert [o.num_nodes for o in by_n] == [2, 4]
        two, four = by_n
        assert four.expected_hours < two.expected_hours and four.expected_cost > two.expected_cost
        # 4 nodes over 2: twice the nodes, and one more doubling's inter-node efficiency (the
        # micro-batch changes with the world size; checkpointing, and so FLOPs per token, does not).
        assert four.gradient_checkpointing == two.gradient_checkpointing
        expected = 2 * cal.inter_node.per_doubling ** (math.log2(4) - math.log2(2))
        assert four.tokens_per_second / two.tokens_per_second == pytest.approx(expected, rel=1e-9)


@settings(max_examples=25, deadline=None)
@given(per_doubling=st.floats(0.51, 1.0), rate=st.floats(0.0, 0.5), gpus=st.sampled_from([1, 2, 4, 8]),
       on_demand=st.decimals("0.5", "100", places=2))
def test_property_more_nodes_are_faster_on_demand_and_cost_more_either_way(per_doubling, rate, gpus, on_demand):
    """Any inter-node figure above 0.5 and any preemption rate: over N = 1, 2, 4, 8 nodes of one offer,
    on-demand hours strictly fall and on-demand and spot costs strictly rise. (Checkpoint writes are
    counted whole, one per interval, so the spec writes once at the end to keep to the scaling model.)"""
    cal = dataclasses.replace(
        load_calibration(), inter_node=InterNodeScaling(per_doubling=per_doubling, assumed=True, source="test"),
        preemption_providers={"aws": PreemptionRisk(rate_per_hour=rate, restart_minutes=10, source="test")})
    spec = parse_spec({"name": "p", "model": "meta-llama/Llama-3.2-1B", "method": "lora",
                       "data": {"examples": 2000, "tokens_per_example": 1024}, "seq_len": 1024,
                       "batch": {"micro": 1, "global": 64}, "train": {"gradient_checkpointing": True},
                       "checkpoint": {"every_minutes": None}, "constraints": {"max_nodes": 8}})
    offer = dataclasses.replace(eight_h100(), gpu_count=gpus, price_on_demand=on_demand, price_spot=on_demand / 2)
    plan = make_plan(spec, [offer], calibration=cal, keep=ALL)
    for spot in (False, True):
        by_n = sorted((o for o in plan.options if o.spot == spot), key=lambda o: o.num_nodes)
        assert [o.num_nodes for o in by_n] == [1, 2, 4, 8]
        costs = [o.expected_cost for o in by_n]
        assert costs == sorted(set(costs))
        if not spot:
            hours = [o.expected_hours for o in by_n]
            assert hours == sorted(set(hours), reverse=True)


def test_max_nodes_1_plans_exactly_what_one_node_plans_among_more():
    spec = parse_spec({"name": "e", "model": "meta-llama/Llama-3.1-8B", "method": "full",
                       "data": {"examples": 20000, "tokens_per_example": 1000}, "batch": {"global": 32},
                       "constraints": {"deadline_hours": 48}})
    one = make_plan(spec, OFFERS, keep=ALL)
    assert one.to_json() == make_plan(spec.model_copy(update={"constraints": spec.constraints.model_copy(
        update={"max_nodes": 1})}), OFFERS, keep=ALL).to_json()
    assert {o.num_nodes for o in one.options} == {1} and "nodes" not in one.assumptions
    assert all("num_nodes" not in o.to_json()["execution"] for o in one.options)
    more = make_plan(spec.model_copy(update={"constraints": spec.constraints.model_copy(update={"max_nodes": 4})}),
                     OFFERS, keep=ALL)
    assert {o.num_nodes for o in more.options} > {1}
    # Pricing more node counts changes nothing about any one-node option, nor their order.
    single = [dataclasses.replace(o, rank=0) for o in more.options if o.num_nodes == 1]
    assert single == [dataclasses.replace(o, rank=0) for o in one.options]


def test_a_spot_job_on_n_nodes_is_preempted_n_times_as_often():
    cal = load_calibration()
    one = preemption_overhead_hours("aws", run_hours=10, interval_hours=0.5, cal=cal)
    three = preemption_overhead_hours("aws", run_hours=10, interval_hours=0.5, cal=cal, num_nodes=3)
    assert three.hours == pytest.approx(3 * one.hours) and three.rate_per_hour == pytest.approx(3 * one.rate_per_hour)
    plan = make_plan(spec_70b(gpus=None, deadline_hours=None), [eight_h100()], keep=ALL)
    spot = next(o for o in plan.options if o.spot and o.num_nodes == 2)
    line = next(l for l in spot.lines if l.item.startswith("preemption"))
    assert line.formula.startswith(f"2 nodes x {one.rate_per_hour:g}/h x ")


def test_adapters_keep_the_whole_base_on_every_gpu_so_nodes_add_speed_not_memory():
    spec = parse_spec({"name": "l", "model": "meta-llama/Llama-3.1-8B", "method": "lora",
                       "data": {"examples": 20000, "tokens_per_example": 1000}, "batch": {"global": 32},
                       "constraints": {"max_nodes": 2}})
    options = make_plan(spec, [eight_h100()], keep=ALL).options
    one, two = (next(o for o in options if not o.spot and o.num_nodes == n) for n in (1, 2))
    assert two.execution.sharding == "ddp" and two.memory_gb_per_gpu >= one.memory_gb_per_gpu * 0.99
    assert two.tokens_per_second > one.tokens_per_second


def test_a_pinned_node_count_is_priced_alone_and_must_be_within_max_nodes():
    spec = spec_70b()
    pinned = make_plan(spec, OFFERS, keep=ALL).best.execution
    plan = make_plan(parse_spec({**spec.to_dict(), "execution": pinned.to_json()}), OFFERS, keep=ALL)
    assert {o.num_nodes for o in plan.options} == {pinned.num_nodes}
    with pytest.raises(PinnedExecutionError, match="execution.num_nodes 2 is over constraints.max_nodes 1"):
        make_plan(parse_spec({**spec.to_dict(), "execution": pinned.to_json(),
                              "constraints": {**spec.constraints.model_dump(), "max_nodes": 1}}), OFFERS)


def test_the_local_backend_turns_down_options_spanning_nodes_with_its_reason(tmp_path):
    spec = parse_spec({"name": "l", "model": "meta-llama/Llama-3.1-8B", "method": "lora",
                       "data": {"examples": 20000, "tokens_per_example": 1000}, "batch": {"global": 32},
                       "constraints": {"max_nodes": 2}})
    plan = make_plan(spec, OFFERS)
    assert {o.num_nodes for o in plan.options} == {1, 2}
    local = launchable_plan(spec, LocalBackend(tmp_path), plan, lambda n: make_plan(spec, OFFERS, keep=n), keep=100)
    assert local.options and {o.num_nodes for o in local.options} == {1}
    ranking = make_plan(spec, OFFERS, keep=ALL).options
    assert [o.placement for o in local.options] == [o.placement for o in ranking if o.num_nodes == 1][:100]
    refused = [r for r in local.rejected if r.reason == "not_launchable"]
    assert refused and all(r.num_nodes == 2 for r in refused)
    assert refused[0].detail == "the local backend runs on 1 node; 2 nodes need a multi-node backend (skypilot or ray)"


def test_the_json_plan_carries_the_node_count_and_matches_the_schema():
    document = make_plan(spec_70b(), OFFERS).to_json()
    validator = Draft202012Validator({**SCHEMA, "$ref": "#/$defs/plan"})
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(document)]
    assert not errors, errors[:5]
    assert document["options"][0]["num_nodes"] == document["assumptions"]["nodes"]["chosen"] >= 2
    assert document["assumptions"]["calibration"]["scaling"]["inter_node"]["assumed"] is True


def test_plan_explain_names_the_node_count_the_reason_and_the_assumed_scaling():
    def plan(*args):
        result = CliRunner().invoke(app, ["plan", str(SPEC_70B), *args], catch_exceptions=False,
                                    env={"COLUMNS": "200", "HF_HUB_OFFLINE": "1", "SKY_RUNTIME_DIR": str(ROOT)})
        assert result.exit_code == 0, result.output
        return result.stdout

    nodes = json.loads(plan("--json"))["assumptions"]["nodes"]
    n, one = nodes["chosen"], nodes["by_count"][0]
    out = plan("--explain", "--top", "3")
    assert f"H100 x8 x {n} nodes" in out
    assert f"nodes: {n} nodes: 1 node does not fit (needs {one['needs_gb_per_gpu']:.1f} GB per GPU, has 80)" in out
    assert f"model states sharded over {n} nodes x 8 = {8 * n} GPUs (FSDP)" in out
    per_doubling = load_calibration().inter_node.per_doubling
    efficiency = per_doubling ** math.log2(n)
    assert (f"inter-node scaling {per_doubling:g} per doubling ({efficiency:.3g} on {n} nodes; scaling.inter_node): "
            "assumed, not measured") in out
    assert f"x {n} nodes x {efficiency:.3g} inter-node scaling, assumed" in out   # the training line's formula


class RefusesProvider:
    """A catalog-priced backend that cannot start anything on one provider (what SkyPilot answers for
    a cloud `sky check` did not enable is tests/test_sky_feasibility.py)."""

    name, pricing, options, poll_seconds = "stand-in", "catalog", (), 1.0

    def __init__(self, provider: str):
        self.provider = provider

    def feasible(self, spec, placements):
        return Feasibility(tuple(p for p in placements if p.provider != self.provider),
                           tuple((p, "not enabled") for p in placements if p.provider == self.provider))


def test_when_the_backend_cannot_launch_the_best_its_own_best_gets_its_node_choice_explained():
    spec = spec_70b()
    plan = make_plan(spec, OFFERS)
    launched = launchable_plan(spec, RefusesProvider(plan.best.offer.provider), plan,
                               lambda n: make_plan(spec, OFFERS, keep=n), keep=100)
    assert launched.best.offer.provider != plan.best.offer.provider
    assert "nodes" not in launched.assumptions   # it described an option this backend cannot launch
    nodes = explain_nodes(spec, launched.best)
    assert nodes["chosen"] == launched.best.num_nodes
    mine = next(c for c in nodes["by_count"] if c["num_nodes"] == launched.best.num_nodes)
    assert mine["verdict"] == "feasible"
    assert Decimal(mine["expected_cost"]) == pytest.approx(launched.best.expected_cost, abs=Decimal("0.00001"))
