"""Faults are classified, not retried blindly: a full or read-only disk is recognised however deeply a
library wraps it, a failed write never tears the next event line, and a checkpoint save that runs
out of room takes its temporary directory with it."""
from __future__ import annotations

import errno
import json
import os
import subprocess

import pytest

from contract.events import EventLog, read_jsonl
from contract.faults import describe_disk_error, disk_error


def test_a_full_disk_is_found_behind_the_runtime_error_torch_raises_for_it():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/run/checkpoints/.tmp-step-3/model.pt")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    except RuntimeError as wrapped:
        found = disk_error(wrapped)
    assert found.errno == errno.ENOSPC
    assert describe_disk_error(found) == \
        "disk full: /run/checkpoints/.tmp-step-3/model.pt: No space left on device (ENOSPC)"
    assert describe_disk_error(OSError(errno.EROFS, "Read-only file system")) == \
        "disk not writable: Read-only file system (EROFS)"
    assert disk_error(RuntimeError("sqlite3.OperationalError: database or disk is full")).errno == errno.ENOSPC
    assert disk_error(ValueError("loss is nan")) is None
    assert disk_error(OSError(errno.ENOENT, "No such file or directory")) is None


@pytest.fixture
def tiny_disk(tmp_path):
    disk = tmp_path / "tiny-disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}): needs root (or CAP_SYS_ADMIN)")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def fill(disk) -> object:
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while f.write(b"\0" * 4096):
                pass
        except OSError:
            pass  # full
    return filler


def test_an_event_that_does_not_fit_never_tears_the_next_one(tiny_disk):
    log = EventLog(tiny_disk / "events.jsonl", attempt=1)
    log.emit("start", resumed_from_step=None, total_steps=3)
    filler = fill(tiny_disk)
    with pytest.raises(OSError) as full:
        log.emit("error", message="x" * 10_000, kind="crash")
    assert full.value.errno == errno.ENOSPC
    filler.unlink()
    log.emit("error", message="disk full", kind="disk_full")
    log.close()
    assert [(e["event"], e.get("kind")) for e in read_jsonl(tiny_disk / "events.jsonl")] == \
        [("start", None), ("error", "disk_full")]


def test_a_checkpoint_save_that_runs_out_of_room_leaves_no_temporary_directory(tiny_disk):
    torch = pytest.importorskip("torch")
    from recipes.checkpoint import list_checkpoints, save_checkpoint

    save_checkpoint(tiny_disk, 1, {"model.pt": torch.zeros(10)}, keep=2)
    with pytest.raises(Exception) as failed:
        save_checkpoint(tiny_disk, 2, {"model.pt": torch.zeros(100_000)}, keep=2)
    assert disk_error(failed.value).errno == errno.ENOSPC
    assert sorted(os.listdir(tiny_disk)) == ["step-00000001"]
    assert [step for step, _ in list_checkpoints(tiny_disk)] == [1]
    assert json.loads((tiny_disk / "step-00000001" / "manifest.json").read_text())["step"] == 1
