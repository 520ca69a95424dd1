"""Checkpoints are verified against what a resume needs, not only against what their manifest lists:
a manifest listing nothing, or a garbage trainer_state.pt under a re-hashed manifest, is a skipped
checkpoint and a fallback to the older good one; with none left the recipe says so and starts over.
The ledger keeps each skip, counts the skipped checkpoint's steps as rework, and calls a checkpoint
verified only once a resume has loaded it."""
from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest
from tiny_jobs import REPO, events, write_spec

from contract.backend import ObservedAttempt
from contract.placement import Placement
from orchestrator.ledger import Ledger
from orchestrator.reconcile import reconcile_job

pytestmark = pytest.mark.slow


def recipe(spec: Path, run_dir: Path, attempt: int) -> list[str]:
    return [sys.executable, "-m", "recipes.sft", str(spec), "--run-dir", str(run_dir), "--attempt", str(attempt)]


def preempted_after_checkpoints(tmp_path: Path) -> tuple[Path, Path, list[int]]:
    """A run SIGTERMed once it has saved at least three checkpoints (keep: 2 leaves the newest two)."""
    spec, run_dir = write_spec(tmp_path, train__max_steps=8), tmp_path / "run"
    process = subprocess.Popen(recipe(spec, run_dir, 1), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while len(events(run_dir, "checkpoint")) < 3:
        assert process.poll() is None and time.monotonic() < deadline, "the recipe stopped before three checkpoints"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=600) == 75
    kept = sorted(int(p.name.removeprefix("step-")) for p in (run_dir / "checkpoints").glob("step-*"))
    return spec, run_dir, kept


def rehash(checkpoint: Path) -> None:
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        data = (checkpoint / name).read_bytes()
        entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


def list_no_files(checkpoint: Path) -> None:
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["files"] = {}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


def garbage_trainer_state(checkpoint: Path) -> None:
    (checkpoint / "trainer_state.pt").write_bytes(b"\x80\x04 not a checkpoint at all" * 50)
    rehash(checkpoint)


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:08d}"


@pytest.mark.parametrize("tamper, reason", [(list_no_files, "manifest does not list model.pt"),
                                            (garbage_trainer_state, "trainer_state.pt cannot be loaded")])
def test_a_newest_checkpoint_a_resume_cannot_use_is_skipped_for_the_older_good_one(tmp_path, tamper, reason):
    spec, run_dir, (older, newest) = preempted_after_checkpoints(tmp_path)
    tamper(step_dir(run_dir, newest))

    resumed = subprocess.run(recipe(spec, run_dir, 2), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    (skipped,) = events(run_dir, "checkpoint_skipped")
    assert (skipped["attempt"], skipped["step"]) == (2, newest) and reason in skipped["reason"]
    assert [e["resumed_from_step"] for e in events(run_dir, "start")] == [None, older]
    assert f"resuming from the checkpoint at step {older}" in resumed.stderr
    assert (run_dir / "checkpoints" / f"rejected-step-{newest:08d}").is_dir()  # kept aside for a look
    assert len(events(run_dir, "finished")) == 1 and not events(run_dir, "error")


def test_with_every_checkpoint_corrupt_the_recipe_says_so_and_starts_over(tmp_path):
    spec, run_dir, kept = preempted_after_checkpoints(tmp_path)
    for step in kept:
        garbage_trainer_state(step_dir(run_dir, step))

    resumed = subprocess.run(recipe(spec, run_dir, 2), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"no usable checkpoint is left (all {len(kept)} skipped): training starts from step 0" in resumed.stderr
    assert "older one" not in resumed.stderr
    assert sorted(e["step"] for e in events(run_dir, "checkpoint_skipped")) == kept
    assert events(run_dir, "start")[-1]["resumed_from_step"] is None


def test_the_ledger_keeps_each_skip_verifies_at_resume_and_counts_the_skipped_steps_as_rework(tmp_path):
    spec, run_dir, (older, newest) = preempted_after_checkpoints(tmp_path)
    garbage_trainer_state(step_dir(run_dir, newest))
    resumed = subprocess.run(recipe(spec, run_dir, 2), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr

    from ledger_factory import make_plan, make_spec, spec_yaml

    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    job_id = ledger.create_job(make_spec(), spec_yaml(), "local", make_plan(), 1)
    when = lambda seconds: datetime.fromtimestamp(seconds, timezone.utc)  # noqa: E731
    here = Placement("local", "this-machine", "CPU", 1, False, Decimal("3.60"))
    first_end = events(run_dir, "preempted")[0]["time"]
    ledger.upsert_attempt(job_id, ObservedAttempt(1, here, when(events(run_dir, "start")[0]["time"] - 1),
                                                  when(first_end + 0.01), "preempted"))
    ledger.upsert_attempt(job_id, ObservedAttempt(2, here, when(events(run_dir, "start")[1]["time"] - 1),
                                                  when(events(run_dir, "finished")[0]["time"] + 0.01), "finished"))
    ledger.ingest_events(job_id, run_dir / "events.jsonl")

    (skip,) = [e for e in ledger.run_events(job_id) if e.event == "checkpoint_skipped"]
    assert (skip.attempt, skip.step) == (2, newest) and "trainer_state.pt" in skip.payload["reason"]
    verdicts = {(c.attempt, c.step): c.verified for c in ledger.checkpoints(job_id)}
    assert verdicts[(1, older)] is True and verdicts[(1, newest)] is False
    assert all(v is None for (attempt, _), v in verdicts.items() if attempt == 2)  # no resume has read them

    # Attempt 1's work after the older checkpoint was redone: rework runs from that checkpoint, not the skipped one.
    older_saved = next(e["time"] for e in events(run_dir, "checkpoint") if e["step"] == older and e["attempt"] == 1)
    rework = reconcile_job(ledger, job_id).attempts[0].rework_hours
    expected = (when(first_end + 0.01) - when(older_saved)) / timedelta(hours=1)
    assert float(rework) == pytest.approx(expected, abs=1e-6)
