"""`spotune launch | status | logs | cancel | resume` as a user runs them: real processes, a real
SQLite ledger, the real recipe on the tiny model."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from waiting import early_preemption_seed, wait_until

from contract.events import read_jsonl
from orchestrator.ledger import Ledger

DEMO_DATA = Path(__file__).resolve().parents[1] / "recipes" / "sample_data" / "json_demo.jsonl"


def write_spec(directory: Path, name: str = "tiny-cli", *, max_steps: int = 3) -> Path:
    spec = {
        "name": name, "model": "tiny-llama", "method": "lora",
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"path": str(DEMO_DATA), "format": "alpaca"},
        "seq_len": 256, "epochs": 1, "batch": {"micro": 1, "global": 1},
        "checkpoint": {"every_steps": 2, "keep": 2},
        "train": {"max_steps": max_steps, "log_every_steps": 1, "seed": 1},
        "local": {"price_per_hour": 2.73},
    }
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def spotune_cmd(state: Path, *args: str) -> list[str]:
    # The console script's entry point, as a user runs it.
    return [sys.executable, "-c", "from orchestrator.cli import main; main()", "--state-dir", str(state), *args]


ENV = {**os.environ, "COLUMNS": "200"}


def spotune(state: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(spotune_cmd(state, *args), capture_output=True, text=True, timeout=timeout, env=ENV)


def only_run_dir(state: Path) -> Path:
    runs = list((state / "runs").glob("*")) if (state / "runs").exists() else []
    return runs[0] if len(runs) == 1 else None


def has_step(run_dir: Path) -> bool:
    return any(e["event"] == "step" for e in read_jsonl(run_dir / "events.jsonl"))


def ledger_of(state: Path) -> Ledger:
    return Ledger(f"sqlite:///{state / 'ledger.db'}")


def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path):
    state = tmp_path / "state"
    spec = write_spec(tmp_path)
    for args, message in [
        (("launch", str(tmp_path / "missing.yaml")), "spec file not found"),
        (("launch", str(spec), "--backend", "aws"), "unknown backend 'aws'"),
        (("launch", str(spec), "--option", "5"), "no option 5 in the plan"),
        (("launch", str(spec), "--backend", "skypilot", "--simulate-preemptions", "2"), "--simulate-preemptions does not apply to --backend skypilot"),
    ]:
        result = spotune(state, *args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert result.stderr.strip().count("\n") == 0 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr + result.stdout
    assert not (state / "ledger.db").exists() and not (state / "runs").exists()

    for command in ("status", "logs", "cancel", "resume"):
        result = spotune(state, command, "no-such-job")
        assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
        assert result.stderr.startswith("error: no job matching 'no-such-job' in the ledger (ledger "), result.stderr
    assert not (state / "ledger.db").exists()  # looking for a job creates no ledger


def test_dry_run_prints_what_would_run_and_writes_nothing(tmp_path):
    state = tmp_path / "state"
    result = spotune(state, "launch", str(write_spec(tmp_path)), "--dry-run", "--price-per-hour", "1.5")
    assert result.returncode == 0, result.stderr
    # stdout is what would run, alone (a SkyPilot task YAML can be piped to a file); the plan goes to stderr.
    assert "dry run" in result.stderr and "dry run" not in result.stdout
    assert "local/this-machine" in result.stdout and "$1.50/h" in result.stdout
    assert not state.exists()


@pytest.mark.slow
def test_two_launches_at_once_on_one_sqlite_ledger_are_both_recorded(tmp_path):
    state = tmp_path / "state"
    specs = [write_spec(tmp_path, "tiny-a"), write_spec(tmp_path, "tiny-b")]
    procs = [subprocess.Popen(spotune_cmd(state, "launch", str(s), "--poll-seconds", "0.3"), env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for s in specs]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, out + err
        assert "Estimate vs actual" in out

    jobs = ledger_of(state).list_jobs()
    assert sorted(j.name for j in jobs) == ["tiny-a", "tiny-b"]
    assert len({j.id for j in jobs}) == 2 and all(j.status == "succeeded" for j in jobs)
    for j in jobs:
        assert [(a.n, a.end_reason) for a in ledger_of(state).attempts(j.id)] == [(1, "finished")]


@pytest.mark.slow
def test_resume_after_the_watching_cli_was_killed_records_every_attempt_once(tmp_path):
    state = tmp_path / "state"
    seed = early_preemption_seed(12)
    cli = subprocess.Popen(spotune_cmd(state, "launch", str(write_spec(tmp_path, max_steps=12)), "--simulate-preemptions", "1",
                                       "--seed", str(seed), "--restart-seconds", "0", "--poll-seconds", "0.3"),
                           env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_dir = wait_until(lambda: only_run_dir(state))
    wait_until(lambda: has_step(run_dir))
    cli.send_signal(signal.SIGKILL)
    cli.wait()
    job_id = run_dir.name

    result = spotune(state, "resume", job_id, "--poll-seconds", "0.3")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"re-attached to {job_id}" in result.stdout and "Estimate vs actual" in result.stdout

    ledger = ledger_of(state)
    assert ledger.get_job(job_id).status == "succeeded"
    recorded = [(a.n, a.end_reason) for a in ledger.attempts(job_id)]
    supervised = [(r["attempt"], r["reason"]) for r in read_jsonl(run_dir / "attempts.jsonl") if r["record"] == "end"]
    assert recorded == supervised == [(1, "preempted"), (2, "finished")]

    status = spotune(state, "status")
    assert status.returncode == 0 and job_id in status.stdout and "succeeded" in status.stdout
    logs = spotune(state, "logs", job_id)
    assert logs.returncode == 0 and "── attempt 2 ──" in logs.stdout


@pytest.mark.slow
def test_cancel_checkpoints_first_then_marks_the_job_cancelled(tmp_path):
    state = tmp_path / "state"
    launched = spotune(state, "launch", str(write_spec(tmp_path, max_steps=500)), "--detach")
    assert launched.returncode == 0, launched.stderr
    run_dir = only_run_dir(state)
    wait_until(lambda: has_step(run_dir))

    result = spotune(state, "cancel", run_dir.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "cancelled" in result.stdout
    ledger = ledger_of(state)
    assert ledger.get_job(run_dir.name).status == "cancelled"
    assert [a.end_reason for a in ledger.attempts(run_dir.name)] == ["cancelled"]
    events = ledger.run_events(run_dir.name)
    assert events[-1].event == "preempted" and ledger.checkpoints(run_dir.name)[-1].step == events[-1].step
