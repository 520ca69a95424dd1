"""The chaos probe's 20-preemption run, kept: twenty preemptions, SIGTERM (a spot notice: checkpoint,
exit 75) and SIGKILL (no notice: the work since the last checkpoint is lost) in turn, and the job
still ends with exactly the weights of an uninterrupted run, every attempt recorded once, and a bill
that is Σ wall hours x price."""
from __future__ import annotations

import subprocess
import sys
from decimal import Decimal

import pytest
from tiny_jobs import REPO, events, supervisor_records, write_spec

from contract.spec import load_spec
from launch.local import LocalBackend
from orchestrator import jobs, watch
from orchestrator.ledger import Ledger
from orchestrator.quote import money
from orchestrator.reconcile import reconcile_job

pytestmark = pytest.mark.slow
PREEMPTIONS = 20
# Each preemption lands a few steps after its trigger (the supervisor reads the step, then signals),
# and those steps are spent: 160 steps leave the last attempts room, so no preemption can come
# after the recipe finished (launch/supervisor.py InjectionPlan keeps a share for the last attempt).
STEPS = 160


def test_twenty_mixed_preemptions_end_with_an_uninterrupted_runs_weights_and_each_attempt_once(tmp_path):
    from safetensors.torch import load_file

    spec_path = write_spec(tmp_path, "tiny-storm", train__max_steps=STEPS, lora__dropout=0.1)  # dropout: RNG restored too
    spec = load_spec(spec_path)
    backend = LocalBackend(restart_seconds=0, simulate_preemptions=PREEMPTIONS, mixed_signals=True, seed=7)
    plan = jobs.make_job_plan(spec, backend)
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    submitted = jobs.submit_job(ledger, spec_path, spec, backend, plan, jobs.choose_option(plan, None), tmp_path / "state")
    final = watch.Watcher(ledger, submitted.job_id, backend, submitted.external_id, poll_seconds=0.5).watch(timeout=3600)
    assert final.job.status == "succeeded", final.job.failure_reason

    attempts = ledger.attempts(submitted.job_id)
    assert [a.n for a in attempts] == list(range(1, PREEMPTIONS + 2))
    assert [a.end_reason for a in attempts] == ["preempted"] * PREEMPTIONS + ["finished"]
    kinds = [a.detail.split(",")[0] for a in attempts[:-1]]
    assert kinds == ["simulated SIGTERM", "simulated SIGKILL"] * (PREEMPTIONS // 2)
    assert [r["attempt"] for r in supervisor_records(submitted.run_dir, "start")] == list(range(1, PREEMPTIONS + 2))
    assert len(events(submitted.run_dir, "start")) == PREEMPTIONS + 1 and len(events(submitted.run_dir, "finished")) == 1

    rec = reconcile_job(ledger, submitted.job_id)
    wall = sum(Decimal(str((a.ended_at - a.started_at).total_seconds())) for a in attempts)
    assert rec.preemptions == PREEMPTIONS and rec.actual_cost == money(wall / 3600 * Decimal("2.73"))

    straight = tmp_path / "uninterrupted"
    subprocess.run([sys.executable, "-m", "recipes.sft", str(spec_path), "--run-dir", str(straight)],
                   cwd=REPO, check=True, capture_output=True, timeout=900)
    got = load_file(submitted.run_dir / "output" / "adapter_model.safetensors")
    want = load_file(straight / "output" / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    assert all((got[name] - want[name]).abs().max().item() == 0 for name in want)  # bit for bit
