"""The local backend with the real recipe on the tiny model: the supervisor restarts after
simulated spot preemptions (SIGTERM: checkpoint and exit 75; SIGKILL: no warning), gives up on a
recipe that keeps crashing, fails bad input at once, and a dead supervisor is noticed."""
from __future__ import annotations

import os
import signal
from decimal import Decimal
from pathlib import Path

import pytest
import yaml
from waiting import wait_until

from contract.backend import LaunchRequest
from contract.placement import Placement
from contract.spec import load_spec
from launch.local import LocalBackend, supervisor_alive
from contract.events import read_jsonl
from launch.supervisor import InjectionPlan

pytestmark = pytest.mark.slow

DEMO_DATA = Path(__file__).resolve().parents[1] / "recipes" / "sample_data" / "json_demo.jsonl"
PRICE = Decimal("2.73")
TERMINAL = ("succeeded", "failed", "cancelled")


def write_spec(directory: Path, *, max_steps: int = 6, seq_len: int = 256, every_steps: int = 1) -> Path:
    spec = {
        "name": "tiny-local", "model": "tiny-llama", "method": "lora",
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"path": str(DEMO_DATA), "format": "alpaca"},
        "seq_len": seq_len, "epochs": 1, "batch": {"micro": 1, "global": 1},
        "checkpoint": {"every_steps": every_steps, "keep": 2},
        "train": {"max_steps": max_steps, "log_every_steps": 1, "seed": 1},
        "local": {"price_per_hour": float(PRICE)},
    }
    path = directory / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def request(tmp_path: Path, spec: Path, env: dict | None = None) -> LaunchRequest:
    placement = Placement(provider="local", region="this-machine", gpu="CPU", gpu_count=1, spot=False,
                          price_per_hour=PRICE)
    job_spec = load_spec(spec)
    return LaunchRequest(job_id="job-1", spec=job_spec, node_spec=job_spec.node_spec(),
                         run_dir=tmp_path / "runs" / "job-1", placements=(placement,), env=env or {})


def run_to_end(backend: LocalBackend, req: LaunchRequest):
    external_id = backend.submit(req)
    observation = wait_until(lambda: (o := backend.poll(external_id)).state in TERMINAL and o)
    return external_id, observation


def events(run_dir: Path) -> list[dict]:
    return read_jsonl(run_dir / "events.jsonl")


def test_sigterm_preemption_checkpoints_and_next_attempt_resumes_from_it(tmp_path):
    backend = LocalBackend(restart_seconds=0, simulate_preemptions=1, seed=seed_preempting_at(range(1, 3), 12))
    req = request(tmp_path, write_spec(tmp_path, max_steps=12))
    external_id, obs = run_to_end(backend, req)

    assert obs.state == "succeeded", obs.detail
    assert [a.n for a in obs.attempts] == [1, 2]
    assert [a.end_reason for a in obs.attempts] == ["preempted", "finished"]
    assert "SIGTERM" in obs.attempts[0].detail and "exit 75" in obs.attempts[0].detail
    assert all(a.placement.price_per_hour == PRICE and a.placement.provider == "local" for a in obs.attempts)
    assert obs.attempts[0].ended_at <= obs.attempts[1].started_at

    evs = events(req.run_dir)
    preempted = [e for e in evs if e["event"] == "preempted"]
    assert len(preempted) == 1 and preempted[0]["attempt"] == 1
    second_start = next(e for e in evs if e["event"] == "start" and e["attempt"] == 2)
    assert second_start["resumed_from_step"] == preempted[0]["step"] >= 1
    finished = [e for e in evs if e["event"] == "finished"]
    assert len(finished) == 1 and finished[0]["attempt"] == 2 and finished[0]["step"] == 12

    records = read_jsonl(req.run_dir / "attempts.jsonl")
    assert [(r["attempt"], r["exit_code"]) for r in records if r["record"] == "end"] == [(1, 75), (2, 0)]
    wait_until(lambda: not supervisor_alive(req.run_dir), timeout=30)  # it exits right after its last record
    lines = list(backend.logs(external_id))
    assert "── attempt 1 ──" in lines and "── attempt 2 ──" in lines


def seed_preempting_at(steps: range, total_steps: int) -> int:
    """A seed whose one simulated preemption lands on one of `steps`: early enough that a fast
    machine cannot finish the run before the signal arrives, late enough for checkpoints to exist."""
    for seed in range(1000):
        plan = InjectionPlan(1, seed)
        plan.arm(0, total_steps)
        if plan.trigger_step in steps:
            return seed
    raise AssertionError("no such seed")


def test_sigkill_preemption_loses_work_since_the_last_checkpoint_and_resumes_from_it(tmp_path):
    backend = LocalBackend(restart_seconds=0, simulate_preemptions=1, hard=True, seed=seed_preempting_at(range(3, 4), 12))
    req = request(tmp_path, write_spec(tmp_path, max_steps=12, every_steps=1))
    _, obs = run_to_end(backend, req)

    assert obs.state == "succeeded", obs.detail
    assert [a.end_reason for a in obs.attempts] == ["preempted", "finished"]
    assert "SIGKILL" in obs.attempts[0].detail
    evs = events(req.run_dir)
    assert not [e for e in evs if e["event"] == "preempted"]  # no warning, no goodbye checkpoint
    last_step_before_kill = max(e["step"] for e in evs if e["event"] == "step" and e["attempt"] == 1)
    saved = [e["step"] for e in evs if e["event"] == "checkpoint" and e["attempt"] == 1]
    resumed = next(e for e in evs if e["event"] == "start" and e["attempt"] == 2)["resumed_from_step"]
    assert saved and resumed is not None and max(saved) <= resumed <= last_step_before_kill
    assert last_step_before_kill - resumed <= 1  # at most one checkpoint interval (every_steps=1) of rework
    assert [r["exit_code"] for r in read_jsonl(req.run_dir / "attempts.jsonl") if r["record"] == "end"] == [-9, 0]


def test_recipe_that_crashes_three_times_in_a_row_fails_the_job_with_its_reason(tmp_path):
    # Where the checkpoints go is a file, not a directory: the recipe trains until its first
    # checkpoint save, then crashes (exit 1), on every attempt.
    backend = LocalBackend(restart_seconds=0)
    req = request(tmp_path, write_spec(tmp_path, every_steps=2))
    req.run_dir.mkdir(parents=True)
    (req.run_dir / "checkpoints").write_text("")
    _, obs = run_to_end(backend, req)

    assert obs.state == "failed"
    assert [a.end_reason for a in obs.attempts] == ["failed", "failed", "failed"]
    assert "crashed 3 times in a row" in obs.detail and "FileExistsError" in obs.detail
    assert all("exit 1" in a.detail for a in obs.attempts)
    steps = [e for e in events(req.run_dir) if e["event"] == "step"]
    assert {e["attempt"] for e in steps} == {1, 2, 3}  # each attempt really trained before it crashed


def test_bad_input_fails_at_once_without_retrying(tmp_path):
    backend = LocalBackend(restart_seconds=0)
    req = request(tmp_path, write_spec(tmp_path, seq_len=64))  # the demo examples are longer than 64 tokens
    _, obs = run_to_end(backend, req)

    assert obs.state == "failed"
    assert len(obs.attempts) == 1 and obs.attempts[0].end_reason == "failed"
    assert obs.detail.startswith("bad input:") and "seq_len" in obs.detail


def test_killed_supervisor_is_reported_and_takes_its_training_process_with_it(tmp_path):
    backend = LocalBackend(restart_seconds=0)
    req = request(tmp_path, write_spec(tmp_path, max_steps=500))
    external_id = backend.submit(req)
    wait_until(lambda: any(e["event"] == "step" for e in events(req.run_dir)))
    supervisor_pid = int((req.run_dir / "supervisor.lock").read_text().split()[0])
    recipe_pid = read_jsonl(req.run_dir / "attempts.jsonl")[0]["pid"]

    os.kill(supervisor_pid, signal.SIGKILL)
    obs = wait_until(lambda: (o := backend.poll(external_id)).state == "failed" and o, timeout=30)
    assert obs.detail == "supervisor died"
    assert obs.attempts[0].end_reason == "failed" and obs.attempts[0].ended_at is not None
    assert backend.poll(external_id) == obs  # stable: re-polling does not move the end time

    # The orphaned recipe got SIGTERM (parent-death signal): it checkpoints and exits, never trains on unwatched.
    def gone():  # exited (a zombie waiting for init to reap it counts as exited)
        try:
            return Path(f"/proc/{recipe_pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
        except FileNotFoundError:
            return True
    wait_until(gone, timeout=120)
    assert [e["event"] for e in events(req.run_dir)][-1] == "preempted"


def test_cancel_asks_the_recipe_to_checkpoint_then_stops(tmp_path):
    backend = LocalBackend(restart_seconds=0)
    req = request(tmp_path, write_spec(tmp_path, max_steps=500))
    external_id = backend.submit(req)
    wait_until(lambda: any(e["event"] == "step" for e in events(req.run_dir)))
    backend.cancel(external_id, graceful=True)
    obs = wait_until(lambda: (o := backend.poll(external_id)).state in TERMINAL and o, timeout=120)

    assert obs.state == "cancelled"
    assert [a.end_reason for a in obs.attempts] == ["cancelled"]
    last = events(req.run_dir)[-1]
    assert last["event"] == "preempted" and last["signal"] == "SIGTERM"
    assert any(e["event"] == "checkpoint" and e["step"] == last["step"] for e in events(req.run_dir))
