"""Money stays exact to the end: `--json` money is an exact Decimal string in plan, catalog and
ledger; totals are the sums of the rows shown; percentages come from exact values; and every
variance part keeps the sign of what its explanation says."""
from __future__ import annotations

import json
import re
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from ledger_factory import hand_example, make_offer, make_option, make_plan, make_spec, observed, spec_yaml
from orchestrator.cli import app
from orchestrator.ledger import Ledger
from orchestrator.quote import CENT, MICRO, round_parts
from orchestrator.reconcile import reconcile_job

REPO = Path(__file__).resolve().parents[1]
EXACT = re.compile(r"^-?\d+(\.\d+)?$")   # a plain decimal: no float, no exponent


def spotune(*args: str) -> str:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.output


def exact(value) -> Decimal:
    assert isinstance(value, str) and EXACT.match(value), f"not an exact decimal string: {value!r}"
    return Decimal(value)


def test_plan_json_money_is_exact_and_each_options_cost_is_the_sum_of_its_lines():
    plan = json.loads(spotune("plan", str(REPO / "examples" / "llama8b-qlora.yaml"), "--json"))
    for option in plan["options"]:
        exact(option["price_per_hour"])
        assert exact(option["expected_cost"]) == sum(exact(line["amount"]) for line in option["lines"])
    for quote in plan["managed"]:
        millions = Decimal(plan["total_tokens"]) / 1_000_000
        assert exact(quote["cost"]) == exact(quote["price_per_million_tokens"]) * millions


def test_catalog_json_prices_are_the_catalogs_own_digits():
    from orchestrator.catalog import load_offers

    listed = json.loads(spotune("catalog", "--json", "--no-sky"))["offers"]
    by_key = {(o.provider, o.region, o.instance_type): o for o in load_offers(include_sky=False)}
    for row in listed:
        offer = by_key[(row["provider"], row["region"], row["instance_type"])]
        assert row["price_on_demand"] is None or exact(row["price_on_demand"]) == offer.price_on_demand
        assert row["price_spot"] is None or exact(row["price_spot"]) == offer.price_spot


@pytest.fixture
def ledger_of_two(tmp_path):
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    with Ledger(url) as ledger:
        demo = hand_example(ledger, tmp_path, "demo")
        offer = make_offer("gcp", "europe-west4", "L4", spot_price="0.41783")
        plan = make_plan(make_option(offer=offer, price="0.41783", hours=3.0, overhead=0.25), job="cheap", method="qlora")
        cheap = ledger.create_job(make_spec("cheap", method="qlora"), spec_yaml("cheap", "qlora"), "skypilot", plan, 1)
        # Odd durations at a 5-decimal price: hours x price never end in whole cents.
        ledger.upsert_attempt(cheap, observed(1, 0, 47.123, "preempted", price="0.41783", provider="gcp",
                                              region="europe-west4", gpu="L4"))
        ledger.upsert_attempt(cheap, observed(2, 50.5, 171.77, "finished", price="0.41783", provider="gcp",
                                              region="europe-west4", gpu="L4"))
    return url


def test_ledger_json_attempts_add_up_to_the_actual_and_parts_to_the_variance_exactly(ledger_of_two):
    report = json.loads(spotune("--db", ledger_of_two, "ledger", "--json"))
    for job in report["jobs"]:
        actual, estimate = exact(job["actual"]["cost"]), exact(job["estimate"]["cost"])
        assert actual == sum(exact(a["cost"]) for a in job["attempts"])
        variance = job["variance"]
        assert exact(variance["total"]) == actual - estimate
        assert exact(variance["total"]) == sum(exact(variance[p]) for p in ("price", "throughput", "preemption", "controller"))
        assert variance["percent"] == pytest.approx(float((actual - estimate) / estimate * 100), abs=1e-4)
        assert all(exact(a["price_per_hour"]) for a in job["attempts"])
    totals = report["totals"]
    assert exact(totals["estimate"]) == sum(exact(j["estimate"]["cost"]) for j in report["jobs"])
    assert exact(totals["actual"]) == sum(exact(j["actual"]["cost"]) for j in report["jobs"])
    assert exact(totals["variance"]["total"]) == exact(totals["actual"]) - exact(totals["estimate"])
    for group in ("provider", "gpu", "method", "month"):
        rows = totals[f"by_{group}"]
        assert sum(exact(r["estimate"]) for r in rows) == exact(totals["estimate"])
        assert sum(exact(r["actual"]) for r in rows) == exact(totals["actual"])


def test_ledger_csv_money_is_the_json_money(ledger_of_two):
    import csv
    import io

    report = json.loads(spotune("--db", ledger_of_two, "ledger", "--json"))
    rows = list(csv.DictReader(io.StringIO(spotune("--db", ledger_of_two, "ledger", "--csv"))))
    for job, row in zip(report["jobs"], rows):
        assert (row["estimate_cost"], row["actual_cost"], row["variance"]) == (
            job["estimate"]["cost"], job["actual"]["cost"], job["variance"]["total"])


def test_a_run_slower_than_planned_is_never_shown_a_negative_throughput_part(tmp_path):
    """Planned 0.63 h at $1.15/h; it ran 38 min (0.633 h) at $0.37/h. Exactly: throughput +$0.0038
    (slower), price -$0.494, preemption -$0.0219. Rounding each to the cent and taking throughput as the
    remainder showed -$0.01 throughput beside '0.633 h productive vs 0.630 h planned'."""
    with Ledger(f"sqlite:///{tmp_path / 'l.db'}") as ledger:
        plan = make_plan(make_option(price="1.15", hours=0.63, overhead=0.019))
        job = ledger.create_job(make_spec(), spec_yaml(), "local", plan, 1)
        ledger.upsert_attempt(job, observed(1, 0, 38, "finished", price="0.37"))
        r = reconcile_job(ledger, job)
    assert r.exact.throughput > 0 and r.throughput >= 0
    assert r.price < 0 and r.preemption < 0   # each a cent floor or ceiling of -$0.494 and -$0.0219
    assert r.price + r.throughput + r.preemption + r.controller == r.variance == r.actual_cost - r.estimate_cost
    assert "0.633 h productive vs 0.630 h planned" in r.story()


amounts = st.decimals(min_value=-1000, max_value=1000, places=8, allow_nan=False, allow_infinity=False)


@given(st.lists(amounts, min_size=1, max_size=6), st.sampled_from([CENT, MICRO]), st.integers(-1, 1))
def test_rounded_parts_add_up_and_keep_every_sign(parts, unit, nudge):
    # A total within one unit of the exact sum, as the rounded actual minus the rounded estimate is.
    total = (sum(parts) / unit).to_integral_value() * unit
    if nudge and abs(total + nudge * unit - sum(parts)) < unit:
        total += nudge * unit
    rounded = round_parts(parts, total, unit)
    assert sum(rounded) == total
    for exact_part, shown in zip(parts, rounded):
        assert abs(shown - exact_part) < unit
        assert shown == 0 or (shown > 0) == (exact_part > 0)
