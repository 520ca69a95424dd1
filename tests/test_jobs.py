"""The job lifecycle against a real SQLite ledger and the real local backend: every attempt is
recorded once however often it is observed, spend is Σ wall hours x price, and the budget guard
stops a job with a checkpoint before the budget is spent."""
from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest
import yaml
from waiting import early_preemption_seed

from launch.local import LocalBackend
from contract.events import read_jsonl
from launch.supervisor import InjectionPlan
from orchestrator import jobs, watch
from contract.errors import UserError
from orchestrator.ledger import Ledger
from orchestrator.quote import money
from orchestrator.reconcile import reconcile_job
from contract.spec import load_spec

DEMO_DATA = Path(__file__).resolve().parents[1] / "recipes" / "sample_data" / "json_demo.jsonl"


def write_spec(directory: Path, *, max_steps: int, price: float = 2.73, budget: float | None = None) -> Path:
    spec = {
        "name": "tiny-jobs", "model": "tiny-llama", "method": "lora",
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"path": str(DEMO_DATA), "format": "alpaca"},
        "seq_len": 256, "epochs": 1, "batch": {"micro": 1, "global": 1},
        "checkpoint": {"every_steps": 2, "keep": 2},
        "train": {"max_steps": max_steps, "log_every_steps": 1, "seed": 1},
        "local": {"price_per_hour": price},
    }
    if budget is not None:
        spec["constraints"] = {"budget": budget}
    path = directory / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def launch_local(tmp_path: Path, spec_path: Path, backend: LocalBackend) -> tuple[Ledger, jobs.Submitted]:
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    spec = load_spec(spec_path)
    plan = jobs.make_job_plan(spec, backend)
    submitted = jobs.submit_job(ledger, spec_path, spec, backend, plan, jobs.choose_option(plan, None), tmp_path / "state")
    return ledger, submitted


@pytest.mark.slow
def test_each_attempt_is_recorded_once_and_billed_by_wall_time(tmp_path):
    ledger, submitted = launch_local(tmp_path, write_spec(tmp_path, max_steps=12),
                                     LocalBackend(restart_seconds=0, simulate_preemptions=1, seed=early_preemption_seed(12)))
    final = watch.Watcher(ledger, submitted.job_id, LocalBackend(), submitted.external_id, poll_seconds=0.3).watch(timeout=600)

    assert final.job.status == "succeeded"
    attempts = ledger.attempts(submitted.job_id)
    assert [(a.n, a.end_reason) for a in attempts] == [(1, "preempted"), (2, "finished")]
    assert attempts[1].resumed_from_step is not None and attempts[1].resumed_from_step >= 1
    assert sum(a.tokens for a in attempts) >= 12 * 256

    # Observing again, from another ledger connection and a watcher rebuilt from the ledger, changes nothing.
    again = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    watcher = watch.attach(again, submitted.job_id)
    watcher.sync()
    watcher.sync()
    assert again.attempts(submitted.job_id) == attempts

    # Actual = Σ wall hours x price, from the supervisor's own attempt records.
    records = read_jsonl(submitted.run_dir / "attempts.jsonl")
    starts = {r["attempt"]: r["time"] for r in records if r["record"] == "start"}
    ends = {r["attempt"]: r["time"] for r in records if r["record"] == "end"}
    expected = sum(Decimal(str(ends[n] - starts[n])) / 3600 * Decimal("2.73") for n in starts)
    assert reconcile_job(again, submitted.job_id).actual_cost == money(expected)


@pytest.mark.slow
def test_budget_guard_stops_with_a_checkpoint_before_the_budget_is_spent(tmp_path):
    # $360/h is 10 cents a second: 100,000 steps would cost far more than the $20 budget on any
    # CPU, while the model load and first steps stay well under it.
    budget = Decimal(20)
    ledger, submitted = launch_local(tmp_path, write_spec(tmp_path, max_steps=100_000, price=360, budget=float(budget)),
                                     LocalBackend(restart_seconds=0))
    final = watch.Watcher(ledger, submitted.job_id, LocalBackend(), submitted.external_id, poll_seconds=0.3).watch(timeout=600)

    assert final.job.status == "over_budget"
    assert "projected" in final.job.failure_reason and "$20.00" in final.job.failure_reason
    attempts = ledger.attempts(submitted.job_id)
    assert [a.end_reason for a in attempts] == ["over_budget"]
    actual = reconcile_job(ledger, submitted.job_id)
    assert not actual.open and actual.actual_cost < budget
    events = [e.event for e in ledger.run_events(submitted.job_id)]
    assert "preempted" in events and "finished" not in events  # stopped early, with a checkpoint
    assert ledger.checkpoints(submitted.job_id)


def test_unknown_backend_is_a_one_line_user_error(tmp_path):
    with pytest.raises(UserError, match=r"unknown backend 'aws' \(choose one of: local, skypilot, ray\)"):
        jobs.make_backend("aws", tmp_path)


def test_simulated_preemptions_only_apply_to_the_local_backend(tmp_path):
    with pytest.raises(UserError, match="--simulate-preemptions does not apply to --backend ray"):
        jobs.make_backend("ray", tmp_path, simulate_preemptions=2)


@pytest.mark.parametrize("reported, gib, canonical", [
    ("NVIDIA H100 80GB HBM3", 79.6, "H100"),
    ("NVIDIA H100 PCIe", 79.6, "H100-PCIE"),
    ("NVIDIA A100-SXM4-80GB", 79.2, "A100-80GB"),
    ("NVIDIA A100-SXM4-40GB", 39.4, "A100"),
    ("NVIDIA GeForce RTX 4090", 23.6, "RTX4090"),
    ("NVIDIA L40S", 44.5, "L40S"),
    ("NVIDIA A10G", 22.0, "A10G"),
    ("NVIDIA H200", 139.8, "H200"),
])
def test_nvidia_smi_names_map_to_the_catalog_gpu_names(reported, gib, canonical):
    assert jobs.canonical_gpu_name(reported, gib) == canonical


def test_projected_cost_is_spent_plus_remaining_tokens_at_measured_speed():
    progress = watch.Progress(step=10, total_steps=100, tokens=1_000, total_tokens=37_000, tokens_per_second=10.0)
    # 36,000 tokens left at 10 tokens/s = 1 hour at $2.50/h
    assert watch.project_cost(Decimal("1.00"), progress, Decimal("2.50")) == Decimal("3.50")
    assert watch.project_cost(Decimal("1.00"), watch.Progress(), Decimal("2.50")) is None


def test_a_job_recorded_but_never_submitted_cannot_be_attached(tmp_path):
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    spec_path = write_spec(tmp_path, max_steps=2)
    spec = load_spec(spec_path)
    plan = jobs.make_job_plan(spec, LocalBackend())
    job_id = ledger.create_job(spec, spec_path.read_text(), "local", plan, 1)
    with pytest.raises(UserError, match="never submitted"):
        watch.attach(ledger, job_id)
    with pytest.raises(UserError, match="no option 7 in the plan"):
        jobs.choose_option(plan, 7)


def two_preemption_seed(total_steps: int) -> int:
    """A seed whose two simulated preemptions both land in the first half of the run.

    The supervisor signals when it reads a step event, up to a tick after the step; on a loaded
    machine a few tiny steps fit in that lag, so a trigger near the end can come after the recipe
    finished. Half a run of margin makes both preemptions certain."""
    for seed in range(1000):
        plan = InjectionPlan(2, seed)
        plan.arm(0, total_steps)
        first = plan.trigger_step
        plan.left -= 1
        plan.arm(first, total_steps)
        if first <= 4 and plan.trigger_step <= total_steps // 2:
            return seed
    raise AssertionError("no such seed")


@pytest.mark.slow
def test_two_preemptions_then_finish_match_an_uninterrupted_run_and_the_money_adds_up(tmp_path):
    import subprocess
    import sys

    from safetensors.torch import load_file

    spec_path = write_spec(tmp_path, max_steps=24)
    ledger, submitted = launch_local(tmp_path, spec_path, LocalBackend(restart_seconds=0, simulate_preemptions=2,
                                                                       seed=two_preemption_seed(24)))
    final = watch.Watcher(ledger, submitted.job_id, LocalBackend(), submitted.external_id, poll_seconds=0.3).watch(timeout=900)

    assert final.job.status == "succeeded"
    attempts = ledger.attempts(submitted.job_id)
    assert [a.end_reason for a in attempts] == ["preempted", "preempted", "finished"]
    assert attempts[1].resumed_from_step and attempts[2].resumed_from_step > attempts[1].resumed_from_step

    # The same spec trained in one go ends with the same adapter weights.
    straight = tmp_path / "uninterrupted"
    subprocess.run([sys.executable, "-m", "recipes.sft", str(spec_path), "--run-dir", str(straight)],
                   check=True, capture_output=True, timeout=900)
    preempted_weights = load_file(submitted.run_dir / "output" / "adapter_model.safetensors")
    straight_weights = load_file(straight / "output" / "adapter_model.safetensors")
    assert preempted_weights.keys() == straight_weights.keys()
    for name, tensor in straight_weights.items():
        assert (preempted_weights[name] - tensor).abs().max().item() <= 1e-5 * max(1.0, tensor.abs().max().item()), name

    # Actual = Σ over attempts of wall hours x price; the variance parts add up to the total.
    rec = reconcile_job(ledger, submitted.job_id)
    wall_seconds = sum(Decimal(str((a.ended_at - a.started_at).total_seconds())) for a in attempts)
    assert rec.actual_cost == money(wall_seconds / 3600 * Decimal("2.73"))
    assert rec.price + rec.throughput + rec.preemption == rec.variance
    assert rec.preemptions == 2
