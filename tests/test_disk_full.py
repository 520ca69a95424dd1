"""A full or unwritable disk is a fault of its own, not a crash to retry: one `error:` line, no
traceback, the attempt closed with that reason, no `.tmp-step-*` left behind. A ledger that cannot
be written says so in one line, and the next command brings it up to date.

The disks are small tmpfs mounts (we run as root in CI); where mounting is not permitted the tests
skip and say why."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from tiny_jobs import error_lines, events, ledger_of, spotune, supervisor_records, the_job, write_spec
from waiting import wait_until

from launch.local import supervisor_alive
from orchestrator.ledger import Ledger

pytestmark = pytest.mark.slow
CHECKPOINT_BYTES = 480_000  # a tiny-llama LoRA r=4 checkpoint (model, optimizer, trainer state)


def mount_tmpfs(where: Path, size: str = "2m") -> None:
    where.mkdir(parents=True, exist_ok=True)
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                                 capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        pytest.skip("no mount command here: the full-disk tests need a small tmpfs")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a {size} tmpfs here ({mounted.stderr.strip() or 'mount failed'}): "
                    "the full-disk tests need root (or CAP_SYS_ADMIN)")


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "small-disk"
    mount_tmpfs(disk)
    yield disk
    subprocess.run(["umount", "-l", str(disk)], capture_output=True, timeout=30)


def leave_free(disk: Path, free_bytes: int) -> Path:
    """Fill `disk` until about `free_bytes` are left; the filler's path, to free the room later."""
    stats = os.statvfs(disk)
    filler = disk / "filler"
    filler.write_bytes(b"\0" * max(0, stats.f_bavail * stats.f_frsize - free_bytes))
    return filler


def no_partial_saves(root: Path) -> bool:
    return not [p for p in root.rglob("*") if p.name.startswith((".tmp-step-", ".output-staging"))]


def test_a_disk_that_fills_up_fails_the_job_at_once_in_one_line_and_leaves_no_partial_save(small_disk, tmp_path):
    state = small_disk / "state"
    db = f"sqlite:///{tmp_path / 'ledger.db'}"  # the ledger elsewhere: this test is about the run's disk
    spec = write_spec(tmp_path, "tiny-full", train__max_steps=20)
    state.mkdir()
    leave_free(small_disk, CHECKPOINT_BYTES + CHECKPOINT_BYTES // 2)  # room for one checkpoint, not two

    launched = spotune(state, "launch", str(spec), db=db)
    assert launched.returncode == 1, launched.stdout + launched.stderr
    assert "Traceback" not in launched.stdout + launched.stderr

    ledger = Ledger(db)
    job = the_job(ledger)
    assert job.status == "failed" and job.failure_reason.startswith("disk full: ")
    assert "No space left on device (ENOSPC)" in job.failure_reason
    (attempt,) = ledger.attempts(job.id)  # not retried as a crash
    assert attempt.end_reason == "failed" and "exit 74" in attempt.detail and "disk full" in attempt.detail

    run_dir = Path(job.run_dir)
    log = (run_dir / "logs" / "attempt-1.log").read_text()
    assert "Traceback" not in log
    assert [line for line in log.replace("\r", "\n").splitlines() if line.startswith("error:")] == \
        [f"error: {job.failure_reason}"]
    assert no_partial_saves(state)
    (error,) = events(run_dir, "error")
    assert error["kind"] == "disk_full"
    assert [e["step"] for e in events(run_dir, "checkpoint")] == [1]  # the one that fit is kept, whole
    assert (run_dir / "checkpoints" / "step-00000001" / "manifest.json").exists()


def test_with_the_ledger_on_the_full_disk_too_every_command_says_so_in_one_line_and_status_repairs_it(small_disk, tmp_path):
    state = small_disk / "state"
    spec = write_spec(tmp_path, "tiny-full-ledger", train__max_steps=20)
    created = spotune(state, "status")  # nothing to show; creates nothing yet
    assert created.returncode == 0, created.stderr
    filler = leave_free(small_disk, CHECKPOINT_BYTES + CHECKPOINT_BYTES // 2)

    launched = spotune(state, "launch", str(spec))
    assert "Traceback" not in launched.stdout + launched.stderr
    assert launched.returncode in (1, 2), launched.stdout + launched.stderr
    said = error_lines(launched.stderr)
    assert len(said) <= 1 and all(line.startswith("error: ") for line in said), launched.stderr
    run_dir = next((state / "runs").iterdir())
    wait_until(lambda: not supervisor_alive(run_dir), timeout=600)
    assert no_partial_saves(state)

    filler.unlink()  # room again: the next command settles what the full disk left open
    shown = spotune(state, "status")
    assert shown.returncode == 0 and "Traceback" not in shown.stderr, shown.stderr
    ledger = ledger_of(state)
    job = the_job(ledger)
    assert job.status == "failed" and "disk full" in job.failure_reason
    assert all(a.ended_at is not None for a in ledger.attempts(job.id))
    assert [a.end_reason for a in ledger.attempts(job.id)] == ["failed"]


def test_a_ledger_that_cannot_be_written_says_so_in_one_line_and_the_next_command_repairs_the_job(tmp_path):
    ledger_disk = tmp_path / "ledger-disk"
    mount_tmpfs(ledger_disk, "8m")
    try:
        state, db = tmp_path / "state", f"sqlite:///{ledger_disk / 'ledger.db'}"
        launched = spotune(state, "launch", str(write_spec(tmp_path, "tiny-ro", train__max_steps=30)), "--detach", db=db)
        assert launched.returncode == 0, launched.stderr
        with Ledger(db) as ledger:  # closed again: a read-only remount needs no writer holding the file
            job = the_job(ledger)
        wait_until(lambda: events(job.run_dir, "step"), timeout=600)
        assert spotune(state, "status", job.id, db=db).returncode == 0  # recorded running, attempt open
        with Ledger(db) as ledger:
            assert ledger.get_job(job.id).status == "running"

        subprocess.run(["mount", "-o", "remount,ro", str(ledger_disk)], check=True, timeout=30)
        stuck = spotune(state, "status", job.id, db=db)
        assert stuck.returncode == 2 and "Traceback" not in stuck.stderr
        (line,) = error_lines(stuck.stderr)
        assert line.startswith("error: cannot ") and f"ledger at sqlite:///{ledger_disk / 'ledger.db'}: " in line
        assert "`spotune status` brings it up to date" in line

        wait_until(lambda: supervisor_records(job.run_dir, "job_end"), timeout=600)  # the job ends meanwhile
        subprocess.run(["mount", "-o", "remount,rw", str(ledger_disk)], check=True, timeout=30)
        repaired = spotune(state, "status", db=db)
        assert repaired.returncode == 0, repaired.stderr
        ledger = Ledger(db)
        assert ledger.get_job(job.id).status == "succeeded"
        assert [(a.end_reason, a.ended_at is not None) for a in ledger.attempts(job.id)] == [("finished", True)]
    finally:
        subprocess.run(["umount", "-l", str(ledger_disk)], capture_output=True, timeout=30)
