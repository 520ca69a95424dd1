"""Checkpoints that survive a spot preemption: atomic save, verified lookup, exact RNG state.

Layout under the checkpoint root (`RUN/checkpoints` or a bucket mount):

    step-00000120/            one complete checkpoint
        model.pt              weights (trainable parameters only for LoRA/QLoRA)
        optimizer.pt          optimizer state keyed by parameter name
        trainer_state.pt      step, data position, tokens, scheduler, RNG states
        manifest.json         written last: step + size and sha256 of every other file
    .tmp-step-00000130-812/   a save in progress (or one killed midway): never read

A save writes into a temporary directory, fsyncs every file and the directory, then renames it
into place. A reader trusts a checkpoint only if its manifest parses and every file it lists has
the recorded size and sha256: a rename that a bucket filesystem did not make atomic, a torn
upload or a flipped byte all show up as a failed verification, and the previous checkpoint is
used instead. A manifest must also list every file the recipe needs to resume (`REQUIRED_FILES`):
a manifest that verifies but lacks the optimizer state is as useless as a torn upload.

Where the checkpoints live is a `CheckpointStore`: `open_checkpoints` gives `LocalCheckpoints` for a
directory (or a bucket mount) and `recipes.object_store.ObjectCheckpoints` for a URL (s3://, gs://,
...), which writes the same layout through fsspec with the manifest uploaded last.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol, Union

import numpy as np
import torch

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")
_TMP_PREFIX = ".tmp-step-"
_REJECTED_PREFIX = "rejected-"
_HASH_CHUNK = 8 << 20
# What a resume loads: a checkpoint whose manifest lacks any of these is not resumable.
REQUIRED_FILES = ("model.pt", "optimizer.pt", "trainer_state.pt")


@dataclass(frozen=True)
class SavedCheckpoint:
    path: Union[Path, str]  # a directory here, or the URL of one in an object store
    step: int
    bytes: int
    seconds: float


@dataclass(frozen=True)
class SkippedCheckpoint:
    path: Union[Path, str]
    step: int
    reason: str


class _HashingWriter:
    """A binary file that hashes and counts what is written through it (no second read pass).

    Opens `path` on local disk (fsynced on close), or wraps an already open writable file, such as
    an object store upload."""

    def __init__(self, path: Optional[Path] = None, file=None):
        self._local = file is None
        self._file = open(path, "wb") if self._local else file
        self._sha = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        view = memoryview(data)
        self._sha.update(view)
        self.size += view.nbytes
        return self._file.write(view)

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> str:
        self._file.flush()
        if self._local:
            os.fsync(self._file.fileno())
        self._file.close()
        return self._sha.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some FUSE bucket mounts cannot fsync a directory; the manifest still guards reads
    finally:
        os.close(fd)


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(root: Path | str) -> list[tuple[int, Path]]:
    """(step, path) of every committed checkpoint directory, oldest first (not yet verified)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def save_checkpoint(root: Path | str, step: int, files: dict[str, Any], keep: int) -> SavedCheckpoint:
    """Write `files` (name -> object for torch.save) as the checkpoint of `step`, atomically.

    Afterwards only the newest `keep` checkpoints remain. A checkpoint of the same step left by
    an abandoned timeline (e.g. one that failed verification) is replaced.
    """
    if MANIFEST in files:
        raise ValueError(f"{MANIFEST} is written by save_checkpoint itself")
    started = time.monotonic()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{_TMP_PREFIX}{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        total = _write_into(tmp, step, files)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk gets its room back at once; no .tmp-step-* stays
        raise

    final = root / step_dir_name(step)
    if final.exists():
        _remove_aside(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    prune(root, keep)
    return SavedCheckpoint(path=final, step=step, bytes=total, seconds=time.monotonic() - started)


def _write_into(directory: Path, step: int, files: dict[str, Any]) -> int:
    """Every file, then the manifest, fsynced; returns the bytes written."""
    listing = {}
    for name, obj in files.items():
        writer = _HashingWriter(directory / name)
        try:
            torch.save(obj, writer)
        finally:
            digest = writer.close()
        listing[name] = {"bytes": writer.size, "sha256": digest}
    manifest = {"format": FORMAT_VERSION, "step": step, "created": time.time(), "files": listing}
    writer = _HashingWriter(directory / MANIFEST)
    writer.write(json.dumps(manifest, indent=1).encode())
    writer.close()
    _fsync_dir(directory)
    return sum(f["bytes"] for f in listing.values()) + writer.size


def _remove_aside(path: Path) -> None:
    # Rename first (atomic) so a crash mid-delete never leaves a half-deleted step-* directory.
    doomed = path.with_name(f".deleting-{path.name}-{os.getpid()}")
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def prune(root: Path | str, keep: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints; returns what was removed."""
    removed = []
    for _, path in list_checkpoints(root)[:-keep] if keep > 0 else []:
        _remove_aside(path)
        removed.append(path)
    return removed


def remove_partial_saves(root: Path | str) -> None:
    """Delete temporary directories left by a save that was killed midway."""
    root = Path(root)
    if not root.is_dir():
        return
    for entry in root.iterdir():
        if entry.is_dir() and (entry.name.startswith(_TMP_PREFIX) or entry.name.startswith(".deleting-")):
            shutil.rmtree(entry, ignore_errors=True)


def _sha256_of(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def manifest_problem(manifest: Any, dir_name: str, required: tuple[str, ...] = ()) -> Optional[str]:
    """Why a parsed manifest cannot describe a resumable checkpoint in `dir_name`, or None."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION or not isinstance(manifest.get("files"), dict):
        return "manifest has an unknown format"
    match = _STEP_DIR.match(dir_name)
    if match and int(match.group(1)) != manifest.get("step"):
        return f"manifest is for step {manifest.get('step')}, directory says {int(match.group(1))}"
    if any(not isinstance(entry, dict) for entry in manifest["files"].values()):
        return "manifest has an unknown format"
    missing = [name for name in required if name not in manifest["files"]]
    if missing:
        return f"manifest does not list {', '.join(missing)}"
    return None


def verify_checkpoint(path: Path | str, required: tuple[str, ...] = ()) -> Optional[str]:
    """None if the checkpoint at `path` is complete and intact and holds every `required` file,
    else why not (one phrase)."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        return "no manifest (save did not finish)"
    except (OSError, ValueError) as e:
        return f"unreadable manifest ({type(e).__name__})"
    problem = manifest_problem(manifest, path.name, required)
    if problem:
        return problem
    for name, expected in manifest["files"].items():
        file = path / name
        try:
            size = file.stat().st_size
        except FileNotFoundError:
            return f"{name} is missing"
        if size != expected.get("bytes"):
            return f"{name} has {size} bytes, manifest says {expected.get('bytes')}"
        if _sha256_of(file) != expected.get("sha256"):
            return f"{name} does not match its sha256"
    return None


def find_resumable(root: Path | str, required: tuple[str, ...] = ()) -> tuple[Optional[Path], list[SkippedCheckpoint]]:
    """The newest checkpoint that verifies (holding every `required` file), and the newer ones
    that did not (newest first)."""
    skipped = []
    for step, path in reversed(list_checkpoints(root)):
        problem = verify_checkpoint(path, required)
        if problem is None:
            return path, skipped
        skipped.append(SkippedCheckpoint(path=path, step=step, reason=problem))
    return None, skipped


def reject(path: Path | str) -> Path:
    """Move a checkpoint that failed verification out of the lookup, kept for inspection.

    Left in place it would later be pruned ahead of good checkpoints or clash with a fresh
    save of the same step.
    """
    path = Path(path)
    target = path.with_name(_REJECTED_PREFIX + path.name)
    if target.exists():
        shutil.rmtree(target, ignore_errors=True)
    os.rename(path, target)
    return target


def load_checkpoint_file(path: Path | str, name: str, map_location: str | torch.device = "cpu") -> Any:
    # weights_only: a checkpoint on a shared bucket is data, never code to unpickle.
    return torch.load(Path(path) / name, map_location=map_location, weights_only=True)


def checkpoint_step(path: Path | str) -> int:
    return int(json.loads((Path(path) / MANIFEST).read_text())["step"])


# --- where checkpoints live ------------------------------------------------------------------

class CheckpointStore(Protocol):
    """The checkpoints of one job, wherever they are kept. Rank 0 alone calls these."""

    location: str

    def save(self, step: int, files: dict[str, Any], keep: int) -> SavedCheckpoint: ...

    def find_resumable(self, required: tuple[str, ...]) -> tuple[Optional[Path], list[SkippedCheckpoint]]:
        """A local directory holding the newest verified checkpoint, and the newer ones skipped."""

    def reject(self, skipped: SkippedCheckpoint) -> str:
        """Take a skipped checkpoint out of the lookup; says where it went."""

    def release(self, path: Path) -> None:
        """The resume has loaded `path`: local copies made for it may go."""

    def publish_events(self, events_path: Path) -> None:
        """Keep a copy of the event log with the checkpoints, where a new node finds it."""


def is_url(location: Union[str, Path, None]) -> bool:
    return isinstance(location, str) and "://" in location and not location.startswith("file://")


class LocalCheckpoints:
    """Checkpoints in a directory of this machine, or of a bucket mounted on it."""

    def __init__(self, root: Path | str):
        self.root = Path(str(root).removeprefix("file://"))
        self.location = str(self.root)

    def save(self, step: int, files: dict[str, Any], keep: int) -> SavedCheckpoint:
        return save_checkpoint(self.root, step, files, keep)

    def find_resumable(self, required: tuple[str, ...]) -> tuple[Optional[Path], list[SkippedCheckpoint]]:
        remove_partial_saves(self.root)
        return find_resumable(self.root, required)

    def reject(self, skipped: SkippedCheckpoint) -> str:
        return str(reject(skipped.path))

    def release(self, path: Path) -> None:
        pass  # the checkpoint itself, not a copy

    def publish_events(self, events_path: Path) -> None:
        pass  # a local checkpoint dir shares the node's disk (or mount) with the run dir


def open_checkpoints(location: Union[str, Path], cache_dir: Path) -> CheckpointStore:
    """The store for `--checkpoint-dir`: a URL goes through fsspec (downloads for a resume are
    verified in `cache_dir`), anything else is a local directory."""
    if is_url(location):
        from recipes.object_store import ObjectCheckpoints

        return ObjectCheckpoints(str(location), cache_dir)
    return LocalCheckpoints(location)


# --- RNG state -------------------------------------------------------------------------------
# Stored with plain types and tensors only, so that `weights_only` loading accepts it.

def capture_rng_state() -> dict:
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(_as_tuples(state["python"]))
    np_state = state["numpy"]
    np.random.set_state({
        "bit_generator": np_state["bit_generator"],
        "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
        "has_gauss": np_state["has_gauss"],
        "gauss": np_state["gauss"],
    })
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # A resume may land on a node with a different GPU count: restore what overlaps.
        saved = state["cuda"]
        for index in range(min(len(saved), torch.cuda.device_count())):
            torch.cuda.set_rng_state(saved[index], index)


def _as_tuples(value):
    # random.setstate needs the nested tuples back exactly; serialization may hand back lists.
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuples(v) for v in value)
    return value
