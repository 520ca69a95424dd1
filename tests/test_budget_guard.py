"""The budget holds with no one watching: the local supervisor stops a detached job before its next
checkpoint interval would pass the budget, the recipe does the same on a node from its spend file,
and the ledger records `over_budget` whoever stopped the job."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest
from tiny_jobs import REPO, events, ledger_of, spotune, supervisor_records, the_job, write_spec
from waiting import wait_until

from contract import budget as rule
from contract.backend import Observation, ObservedAttempt
from contract.placement import Placement
from launch.budget import BudgetGuard
from launch.local import supervisor_alive
from orchestrator.ledger import Ledger
from orchestrator.reconcile import reconcile_job
from orchestrator.watch import Watcher


# ---- the rule ------------------------------------------------------------------------------------

def test_the_next_interval_is_the_sooner_checkpoint_plus_what_stopping_costs():
    # every 10 steps at 3 s a step comes before every 5 minutes; then one more save and an exit
    # as long as the start-up
    assert rule.interval_seconds(5, 10, 3.0, save_seconds=2.0, startup_seconds=20.0) == 30 + 2 + 20
    assert rule.interval_seconds(0.25, 10, 3.0, save_seconds=2.0, startup_seconds=20.0) == 15 + 2 + 20
    # no step measured yet: the step-count checkpoint may come long before the 15 minutes
    assert rule.interval_seconds(15, 10, None, save_seconds=1.0, startup_seconds=7.0) == 8.0
    assert rule.seconds_per_step([(1, 10.0), (2, 11.0), (4, 13.0), (5, 20.0)]) == 1.0  # one slow step does not count


def test_a_job_stops_once_spent_plus_the_next_interval_would_pass_the_budget():
    budget = Decimal("1.00")
    assert rule.over_budget(Decimal("0.60"), Decimal("0.40"), budget) is None  # exactly the budget still fits
    why = rule.over_budget(Decimal("0.60"), Decimal("0.41"), budget)
    assert why == ("over budget: spent $0.6000 + $0.4100 to reach the next checkpoint and stop would pass "
                   "the budget of $1.00")
    assert rule.over_budget(Decimal("5"), Decimal("5"), None) is None


def test_the_supervisor_counts_every_attempt_in_its_records_as_the_ledger_bills_them():
    price = Decimal("36")  # a cent a second
    records = [{"record": "start", "attempt": 1, "time": 1000.0}, {"record": "end", "attempt": 1, "time": 1030.0},
               {"record": "start", "attempt": 2, "time": 1040.0}, {"record": "end", "attempt": 2, "time": 1070.0}]
    guard = BudgetGuard("1.00", price, records, every_minutes=None, every_steps=2)
    assert guard.spent(2000.0) == Decimal("0.60")  # the gap between attempts is not billed
    guard.attempt_started(2000.0)
    guard.saw({"event": "start", "time": 2005.0})
    for step in range(1, 4):
        guard.saw({"event": "step", "step": step, "time": 2005.0 + step})
    guard.saw({"event": "checkpoint", "step": 2, "seconds": 1.0})
    assert guard.spent(2020.0) == Decimal("0.80")
    # next: 2 steps x 1 s + a 1 s save + a 5 s start-up = 8 s = $0.08 -> $0.88 still fits
    assert guard.over(2020.0) is None
    assert guard.over(2033.0).startswith("over budget: spent $0.9300 + $0.0800")


def test_a_spend_file_gets_one_entry_per_attempt_process_and_a_torn_one_counts_as_nothing():
    assert rule.parse_spend(None) == [] and rule.parse_spend('{"attempts": [{"key": "a", "ho') == []
    text = rule.with_entry([], {"key": "attempt-1-aa", "attempt": 1, "hours": 0.5, "price_per_hour": "2.00"})
    text = rule.with_entry(rule.parse_spend(text), {"key": "attempt-2-bb", "attempt": 2, "hours": 0.25,
                                                    "price_per_hour": "4.00"})
    text = rule.with_entry(rule.parse_spend(text), {"key": "attempt-2-bb", "attempt": 2, "hours": 0.5,
                                                    "price_per_hour": "4.00"})  # the same process, later
    assert rule.spent(rule.parse_spend(text)) == Decimal("3.00")


# ---- the ledger records over_budget, whoever stopped it ---------------------------------------------

class NodeReportsOnly:
    """A cloud backend as the watcher sees it after the node stopped itself: the job failed (the
    recipe's exit 80 is a failure to SkyPilot), and the recipe's events came home."""

    name, pricing, options, poll_seconds = "skypilot", "catalog", (), 0.01

    def __init__(self, events_path: Path, placement: Placement):
        self.events_path, self.placement = events_path, placement

    def poll(self, external_id):
        t0 = datetime(2026, 12, 1, 9, tzinfo=timezone.utc)
        attempt = ObservedAttempt(n=1, placement=self.placement, started_at=t0, ended_at=t0 + timedelta(minutes=30),
                                  end_reason="failed", external_id="7", detail="exit 80")
        return Observation(state="failed", attempts=(attempt,), detail="job failed", events_path=self.events_path)


def test_a_stop_by_the_node_itself_is_recorded_as_over_budget(tmp_path):
    from ledger_factory import make_plan, make_spec, spec_yaml

    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    job_id = ledger.create_job(make_spec(budget=1.0), spec_yaml(), "skypilot", make_plan(), 1)
    placement = ledger.get_job(job_id).estimate.placement
    message = "over budget: spent $0.9000 + $0.2000 to reach the next checkpoint and stop would pass the budget of $1.00"
    lines = [{"event": "start", "time": 1795e6, "attempt": 1, "resumed_from_step": None, "total_steps": 100},
             {"event": "step", "time": 1795e6 + 60, "attempt": 1, "step": 40, "tokens": 4000, "loss": 1.0, "lr": 1e-4,
              "tokens_per_second": 100.0},
             {"event": "checkpoint", "time": 1795e6 + 61, "attempt": 1, "step": 40, "path": "s3://b/step-40",
              "seconds": 1.0, "bytes": 10},
             {"event": "over_budget", "time": 1795e6 + 62, "attempt": 1, "step": 40, "spent": 0.9, "budget": 1.0,
              "price_per_hour": 1.8, "next_interval_cost": 0.2, "message": message}]
    events_path = tmp_path / "events.jsonl"
    events_path.write_text("".join(json.dumps(line) + "\n" for line in lines))

    Watcher(ledger, job_id, NodeReportsOnly(events_path, placement), "7").sync()
    job = ledger.get_job(job_id)
    assert (job.status, job.failure_reason) == ("over_budget", message)
    assert [a.end_reason for a in ledger.attempts(job_id)] == ["over_budget"]


# ---- the local supervisor, with no CLI ------------------------------------------------------------

@pytest.mark.slow
def test_a_detached_job_is_stopped_by_its_budget_with_no_cli_watching(tmp_path):
    # $36/h is a cent a second: the endless job must stop within 60 seconds of its start, however
    # slow this machine is, and keep what it trained in a checkpoint.
    budget = Decimal("0.60")
    spec = write_spec(tmp_path, "tiny-budget", train__max_steps=100_000, checkpoint__every_steps=2,
                      local={"price_per_hour": 36.0}, constraints={"budget": float(budget)})
    state = tmp_path / "state"
    launched = spotune(state, "launch", str(spec), "--detach")
    assert launched.returncode == 0, launched.stderr
    run_dir = next((state / "runs").iterdir())

    # Nothing watches: the CLI has exited. The supervisor alone stops the job and exits.
    wait_until(lambda: supervisor_records(run_dir, "job_end"), timeout=600)
    wait_until(lambda: not supervisor_alive(run_dir), timeout=60)
    (end,) = supervisor_records(run_dir, "job_end")
    assert end["state"] == "over_budget" and "would pass the budget of $0.6000" in end["detail"]

    shown = spotune(state, "status")  # the next command brings the ledger up to date
    assert shown.returncode == 0, shown.stderr
    ledger = ledger_of(state)
    job = the_job(ledger)
    assert job.status == "over_budget" and job.failure_reason == end["detail"]
    assert [a.end_reason for a in ledger.attempts(job.id)] == ["over_budget"]
    assert reconcile_job(ledger, job.id).actual_cost_exact <= budget
    assert not events(run_dir, "finished")
    stopped_at = max(e["step"] for e in events(run_dir, "step"))
    assert stopped_at >= 1 and any(e["step"] == stopped_at for e in events(run_dir, "checkpoint"))


# ---- the node, from its spend file ----------------------------------------------------------------

def run_recipe(spec: Path, run_dir: Path, attempt: int, price: str) -> subprocess.CompletedProcess:
    env = {**os.environ, rule.PRICE_ENV: price}
    return subprocess.run([sys.executable, "-m", "recipes.sft", str(spec), "--run-dir", str(run_dir),
                           "--attempt", str(attempt)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_the_recipe_stops_itself_with_a_checkpoint_when_its_spend_file_says_the_budget_is_spent(tmp_path):
    spec = write_spec(tmp_path, "tiny-node-budget", train__max_steps=100_000, checkpoint__every_steps=2,
                      constraints={"budget": 0.60})
    run_dir = tmp_path / "run"
    first = run_recipe(spec, run_dir, 1, price="36")
    assert first.returncode == 80, first.stderr
    (stop,) = events(run_dir, "over_budget")
    assert stop["spent"] + stop["next_interval_cost"] > 0.60 and stop["spent"] <= 0.60
    assert stop["step"] >= 1 and any(e["step"] == stop["step"] for e in events(run_dir, "checkpoint"))
    assert "stopped with a checkpoint at step" in first.stderr

    # Another node, later: the earlier attempt's hours travel with the checkpoints.
    spend_file = run_dir / "checkpoints" / rule.SPEND_FILE
    (entry,) = json.loads(spend_file.read_text())["attempts"]
    assert entry["attempt"] == 1 and entry["price_per_hour"] == "36"
    earlier = json.loads(spend_file.read_text())
    earlier["attempts"][0]["hours"] = 0.6 / 36  # as if attempt 1 had used all of it
    spend_file.write_text(json.dumps(earlier))
    second = run_recipe(spec, run_dir, 2, price="36")
    assert second.returncode == 80, second.stderr
    stop = events(run_dir, "over_budget")[-1]
    assert stop["attempt"] == 2 and stop["spent"] >= 0.60 and "nothing trained" not in stop["message"]
    assert not [e for e in events(run_dir, "step") if e["attempt"] == 2]  # it stopped before training
    assert len(json.loads(spend_file.read_text())["attempts"]) == 2


def test_the_spend_file_travels_in_the_object_store_with_the_checkpoints(tmp_path, monkeypatch):
    pytest.importorskip("s3fs")
    import s3fs
    from s3_server import moto_s3, new_bucket, s3_env

    from recipes.guards import NodeBudget

    with moto_s3() as endpoint:
        for name, value in s3_env(endpoint).items():
            monkeypatch.setenv(name, value)
        s3fs.S3FileSystem.clear_instance_cache()
        where = f"s3://{new_bucket(endpoint)}/job-1/checkpoints"
        price, budget = Decimal("36"), Decimal("1.00")  # a cent a second
        micro = lambda amount: amount.quantize(Decimal("0.000001"))  # noqa: E731  (hours are floats)
        first = NodeBudget(budget, price, where, attempt=1, every_minutes=None, every_steps=None, started=1000.0)
        first.record(now=1030.0)            # 30 s on the first node
        second = NodeBudget(budget, price, where, attempt=2, every_minutes=None, every_steps=None, started=5000.0)
        assert micro(second.earlier) == Decimal("0.30")
        second.saw_start(5010.0)            # a 10 s start-up: stopping is counted as costing as much again
        assert second.over(now=5050.0) is None                  # $0.30 + $0.50 + $0.10 to stop fits in $1.00
        assert second.over(now=5070.0).startswith("over budget: spent $1.0000 + $0.1000")
        second.record(now=5070.0)
        third = NodeBudget(budget, price, where, attempt=3, every_minutes=None, every_steps=None, started=9000.0)
        assert micro(third.earlier) == Decimal("1.00") and third.over(now=9001.0) is not None
