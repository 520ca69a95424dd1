"""Write-ahead: a launch killed in any of its windows leaves a job that `status`, `resume` and
`cancel` find and settle, and a job whose supervisor was killed goes on from its last checkpoint.

Each window is a kill point in the real launch path (contract/faults.py): the CLI SIGKILLs itself
there, exactly as a closed laptop or an OOM kill would end it."""
from __future__ import annotations

import os
import signal

import pytest
from tiny_jobs import error_lines, events, ledger_of, spotune, supervisor_records, the_job, write_spec
from waiting import wait_until

from contract.faults import KILL_AT_ENV

pytestmark = pytest.mark.slow

# In launch order: ledger row (with its run dir) -> launch intent -> run dir and supervisor.json ->
# supervisor started -> submit returned -> external id recorded.
STARTED_WINDOWS = ["launch:intent-written", "local:run-dir-written", "local:supervisor-started", "launch:submitted",
                   "launch:external-id-recorded"]


def launch_killed_at(tmp_path, point: str):
    state = tmp_path / "state"
    killed = spotune(state, "launch", str(write_spec(tmp_path)), "--detach", env={KILL_AT_ENV: point})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    return state, the_job(ledger_of(state))


@pytest.mark.parametrize("point", STARTED_WINDOWS)
def test_a_launch_killed_after_its_job_was_recorded_is_found_and_finished_by_resume(tmp_path, point):
    state, job = launch_killed_at(tmp_path, point)
    assert job.run_dir is not None  # written with the job, before anything started

    shown = spotune(state, "status", job.id)
    assert shown.returncode == 0 and "Traceback" not in shown.stderr, shown.stderr
    resumed = spotune(state, "resume", job.id)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr

    ledger = ledger_of(state)
    job = ledger.get_job(job.id)
    assert (job.status, job.external_id) == ("succeeded", job.run_dir)
    attempts = ledger.attempts(job.id)
    assert [a.n for a in attempts] == sorted({a.n for a in attempts})  # each attempt once
    assert attempts[-1].end_reason == "finished"
    assert len(events(job.run_dir, "finished")) == 1


def test_a_launch_killed_before_anything_started_is_settled_as_failed_by_resume(tmp_path):
    state, job = launch_killed_at(tmp_path, "launch:recorded")
    assert (job.status, job.external_id) == ("pending", None)

    resumed = spotune(state, "resume", job.id)
    assert resumed.returncode == 2
    (line,) = error_lines(resumed.stderr)
    assert line.startswith(f"error: job {job.id}: its launch was interrupted before anything was started")
    job = ledger_of(state).get_job(job.id)
    assert job.status == "failed" and "nothing ran" in job.failure_reason
    assert not (state / "runs" / job.id / "attempts.jsonl").exists()


def test_cancel_settles_a_launch_killed_before_its_supervisor_started_and_nothing_runs_later(tmp_path):
    state, job = launch_killed_at(tmp_path, "launch:intent-written")
    cancelled = spotune(state, "cancel", job.id)
    assert cancelled.returncode == 0, cancelled.stderr
    job = ledger_of(state).get_job(job.id)
    assert (job.status, job.failure_reason) == ("cancelled", "cancelled before anything was started")
    again = spotune(state, "resume", job.id)  # an ended job is shown, never started
    assert not (state / "runs" / job.id / "attempts.jsonl").exists(), again.stdout


def test_a_job_whose_supervisor_was_killed_goes_on_from_its_last_checkpoint_after_resume(tmp_path):
    state = tmp_path / "state"
    launched = spotune(state, "launch", str(write_spec(tmp_path, train__max_steps=40)), "--detach")
    assert launched.returncode == 0, launched.stderr
    job = the_job(ledger_of(state))
    run_dir = job.run_dir
    wait_until(lambda: any(e["step"] >= 2 for e in events(run_dir, "checkpoint")), timeout=600)
    os.kill(int((state / "runs" / job.id / "supervisor.lock").read_text().split()[0]), signal.SIGKILL)

    shown = spotune(state, "status", job.id)  # reported, not hidden
    assert shown.returncode == 0 and "supervisor died" in shown.stdout, shown.stdout
    resumed = spotune(state, "resume", job.id)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "started a new one, resuming from the last checkpoint" in resumed.stdout

    ledger = ledger_of(state)
    job = ledger.get_job(job.id)
    assert (job.status, job.failure_reason) == ("succeeded", None)
    first, second = ledger.attempts(job.id)
    assert (first.end_reason, first.detail, second.end_reason) == ("failed", "supervisor died", "finished")
    saved_by_first = [e["step"] for e in events(run_dir, "checkpoint") if e["attempt"] == 1]
    assert second.resumed_from_step == max(saved_by_first)  # the orphaned recipe's goodbye checkpoint
    assert [r["attempt"] for r in supervisor_records(run_dir, "end")] == [1, 2]
