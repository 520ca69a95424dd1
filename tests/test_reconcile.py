"""Actual cost is Σ wall hours × that attempt's $/h, and the variance splits into price, throughput
and preemption parts that add up to the total exactly."""
from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger_factory import at, event, hand_example, make_option, make_plan, make_spec, observed, spec_yaml, write_events
from orchestrator.ledger import Ledger
from orchestrator.quote import money
from orchestrator.reconcile import reconcile, reconcile_job


def test_hand_computed_example_splits_exactly(ledger_url, tmp_path):
    with Ledger(ledger_url) as ledger:
        job_id = hand_example(ledger, tmp_path)
        r = reconcile_job(ledger, job_id)
    assert (r.estimate_cost, r.actual_cost, r.variance) == (Decimal("2.20"), Decimal("3.20"), Decimal("1.00"))
    assert (r.price, r.throughput, r.preemption) == (Decimal("0.40"), Decimal("0.40"), Decimal("0.20"))
    assert r.price + r.throughput + r.preemption == r.variance
    assert r.actual_hours == Decimal("1.4") and r.lost_hours == Decimal("0.2") and r.productive_hours == Decimal("1.2")
    assert [(a.restart_hours, a.rework_hours) for a in r.attempts] == [(0, Decimal("0.1")), (Decimal("0.1"), 0)]
    assert r.tokens == 69_000 and r.preemptions == 1 and not r.open
    assert r.tokens_per_second == pytest.approx((32 * 800.0 + 42 * 1200.0) / 74)
    assert r.story() == (
        "cost $3.20 vs $2.20 estimated (+45.5%): +$0.40 price (ran at $2.0000/h, $2.5000/h vs $2.0000/h planned), "
        "+$0.40 throughput (1.200 h productive vs 1.000 h planned, start-up included; 1,027 tokens/s vs 1,000 planned), "
        "+$0.20 preemption (1 preemption, 0.200 h lost vs 0.100 h planned)")


def test_actual_cost_is_reproducible_from_the_attempts_table_to_the_cent(tmp_path):
    with Ledger(f"sqlite:///{tmp_path / 'l.db'}") as ledger:
        job_id = ledger.create_job(make_spec(), spec_yaml(), "local", make_plan(), 1)
        # GCP-style 5-decimal prices over odd durations
        ledger.upsert_attempt(job_id, observed(1, 0, 47.123, "preempted", price="0.41783"))
        ledger.upsert_attempt(job_id, observed(2, 50.5, 171.77, "finished", price="11.81123"))
        r = reconcile_job(ledger, job_id)
        by_hand = sum(a.price_per_hour * Decimal((a.ended_at - a.started_at).total_seconds()) / 3600
                      for a in ledger.attempts(job_id))
    assert r.actual_cost == money(by_hand)
    assert r.actual_cost == Decimal("24.20")  # 0.41783 x 0.78538 h + 11.81123 x 2.02117 h


def test_an_open_attempt_counts_up_to_now(tmp_path):
    with Ledger(f"sqlite:///{tmp_path / 'l.db'}") as ledger:
        job_id = ledger.create_job(make_spec(), spec_yaml(), "local", make_plan(make_option(price="3.00")), 1)
        ledger.upsert_attempt(job_id, observed(1, 0, price="3.00"))
        half_hour = reconcile_job(ledger, job_id, now=at(30))
        hour = reconcile_job(ledger, job_id, now=at(60))
    assert (half_hour.actual_cost, hour.actual_cost) == (Decimal("1.50"), Decimal("3.00"))
    assert hour.open and hour.story().startswith("so far cost $3.00")


def test_an_attempt_preempted_before_its_first_checkpoint_loses_everything_after_start_up(tmp_path):
    with Ledger(f"sqlite:///{tmp_path / 'l.db'}") as ledger:
        plan = make_plan(make_option(price="1.00", hours=0.5, overhead=0.0))
        job_id = ledger.create_job(make_spec(), spec_yaml(), "local", plan, 1)
        ledger.upsert_attempt(job_id, observed(1, 0, 30, "preempted", price="1.00"))
        ledger.upsert_attempt(job_id, observed(2, 30, 72, "finished", price="1.00"))
        events = tmp_path / "events.jsonl"
        write_events(events, [event("step", 6, 1, step=1, tokens=10), event("step", 36, 2, step=1, tokens=10)])
        ledger.ingest_events(job_id, events)
        r = reconcile_job(ledger, job_id)
    # attempt 1: 6 min start-up (paid once anyway), 24 min of steps lost; attempt 2: 6 min restart
    assert r.lost_hours == Decimal("0.5")
    assert (r.variance, r.price, r.preemption, r.throughput) == (Decimal("0.70"), 0, Decimal("0.50"), Decimal("0.20"))


attempt_shapes = st.lists(st.tuples(
    st.floats(1, 600),                                  # attempt length in minutes (`at` counts minutes)
    st.sampled_from(["preempted", "failed", "finished"]),
    st.integers(10, 999_999),                           # $/h in 1e-5 dollars: GCP-style five decimals
    st.floats(0, 1),                                    # first training step, as a fraction of the attempt
    st.one_of(st.none(), st.floats(0, 1)),              # last checkpoint between first step and end, if any
    st.floats(0, 30),                                   # gap before the next attempt
), min_size=1, max_size=5)


@settings(deadline=None, max_examples=150)
@given(p0_units=st.integers(10, 99_999), hours=st.floats(0.1, 30), overhead=st.floats(0, 3),
       extra_cents=st.integers(0, 500), shapes=attempt_shapes)
def test_parts_always_add_up_to_the_total(p0_units, hours, overhead, extra_cents, shapes):
    """Any prices, durations and checkpoints: the printed parts always sum to the printed total,
    and each part is within a cent of its exact formula."""
    from orchestrator.ledger import AttemptRecord, CheckpointRecord, EstimateRecord, JobRecord, SampleRecord

    p0 = Decimal(p0_units).scaleb(-4)
    hours, overhead = round(hours, 4), round(overhead, 4)
    estimate_cost = p0 * Decimal(str(hours + overhead)) + Decimal(extra_cents).scaleb(-2)
    est = EstimateRecord(plan_json="{}", chosen_rank=1, catalog_snapshot="s", provider="aws", region="r",
                         instance_type="i", gpu="H100", gpu_count=1, spot=True, price_per_hour=p0,
                         tokens_per_second=1000.0, hours=hours, preemption_overhead_hours=overhead,
                         expected_cost=estimate_cost, total_tokens=1, created_at=at(0))
    job = JobRecord("j", "j", "m", "lora", "", "", "running", "local", None, None, None, at(0), at(0), est)
    attempts, checkpoints, samples, t = [], [], [], 0.0
    for n, (length, reason, price_units, first, saved, gap) in enumerate(shapes, start=1):
        reason = "preempted" if reason == "finished" and n == 1 else reason
        attempts.append(AttemptRecord(n=n, provider="aws", region="r", instance_type=None, gpu="H100", gpu_count=1,
                                      spot=True, price_per_hour=Decimal(price_units).scaleb(-5), started_at=at(t),
                                      ended_at=at(t + length), end_reason=reason, external_id=None, tokens=None,
                                      resumed_from_step=None, detail=None))
        first_step = t + first * length
        samples.append(SampleRecord(n, 1, 1, None, None, 1.0, at(first_step)))
        if saved is not None:
            checkpoints.append(CheckpointRecord(n, 1, "p", 1, 1.0, True, at(first_step + saved * (t + length - first_step))))
        t += length + gap
    r = reconcile(job, attempts, checkpoints, samples)
    assert r.price + r.throughput + r.preemption == r.variance == r.actual_cost - r.estimate_cost
    exact_throughput = p0 * (r.productive_hours - Decimal(str(hours))) + (p0 * Decimal(str(hours + overhead)) - estimate_cost)
    assert abs(r.throughput - exact_throughput) <= Decimal("0.02")  # four roundings to the cent


def test_estimate_is_the_chosen_option_not_the_cheapest(tmp_path):
    cheap, chosen = make_option(rank=1, price="1.00"), make_option(rank=2, price="4.00", hours=2.0, overhead=0.0)
    with Ledger(f"sqlite:///{tmp_path / 'l.db'}") as ledger:
        job_id = ledger.create_job(make_spec(), spec_yaml(), "local", make_plan(cheap, chosen), 2)
        ledger.upsert_attempt(job_id, observed(1, 0, 120, "finished", price="4.00"))
        r = reconcile_job(ledger, job_id)
    assert (r.estimate_cost, r.actual_cost, r.variance) == (Decimal("8.00"), Decimal("8.00"), 0)
