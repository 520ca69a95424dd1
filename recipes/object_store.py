"""Checkpoints in an object store (s3://, gs://, az://, memory://), written by the recipe itself.

For clouds that cannot mount a bucket (RunPod, Vast, ...), `--checkpoint-dir` takes a URL and
the recipe uploads each checkpoint through fsspec (s3fs, gcsfs, adlfs). The layout is the local
one, plus a copy of the event log:

    URL/step-00000120/model.pt, optimizer.pt, trainer_state.pt
    URL/step-00000120/manifest.json     uploaded LAST: the commit of the checkpoint
    URL/events.jsonl                    the run's event log, so a new node continues the attempt numbers

An object store has no rename, but each object appears whole or not at all (a PUT, or a
multipart upload completed at close). So the manifest is the commit: it goes up only after
every file it lists, and it is deleted first when a step is rewritten. A step without one is a
torn upload (a node killed mid-save) and is never read. A resume checks the listed sizes against
the store before downloading, then downloads into a local cache and verifies every sha256 there,
the copy it then loads: nothing is resumed that was not verified byte for byte.

Credentials come from the store's own chain (AWS_* variables, instance roles, GOOGLE_APPLICATION_
CREDENTIALS); an S3-compatible endpoint from AWS_ENDPOINT_URL. None of them is ever written here.
An interrupted multipart upload leaves invisible parts in S3 until a lifecycle rule
(AbortIncompleteMultipartUpload) removes them.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from contract.events import EVENTS_FILE
from contract.spec import SpecError
from recipes.checkpoint import (
    _REJECTED_PREFIX, _STEP_DIR, MANIFEST, FORMAT_VERSION, SavedCheckpoint, SkippedCheckpoint, _HashingWriter,
    manifest_problem, step_dir_name, verify_checkpoint)

TORN = "no manifest (upload did not finish)"


def open_filesystem(url: str):
    """(fsspec filesystem, path inside it) for `url`; an unusable URL is a one-line SpecError."""
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(url)
    except (ValueError, ImportError) as e:
        raise SpecError(f"--checkpoint-dir {url}: {' '.join(str(e).split())}") from None
    return fs, root.rstrip("/")


def _abandon(upload) -> None:
    """Throw a half-written upload away rather than commit it (s3fs aborts the multipart upload,
    whose parts S3 would otherwise bill). Without a manifest it would never be resumed anyway."""
    discard = getattr(upload, "discard", None)
    if discard is None:
        return
    discard()
    try:
        upload.closed = True  # else garbage collection closes the file, which commits what is left
    except AttributeError:
        pass


class ObjectCheckpoints:
    """The `CheckpointStore` of an object-store URL (see the module docstring for the layout)."""

    def __init__(self, url: str, cache_dir: Path):
        self.fs, self.root = open_filesystem(url)
        self.location = url.rstrip("/")
        self.cache_dir = Path(cache_dir)

    def url(self, *parts: str) -> str:
        return "/".join([self.location, *parts])

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    # --- listing -------------------------------------------------------------------------------
    def steps(self) -> list[int]:
        """Every step with something uploaded under it (committed or torn), oldest first."""
        self.fs.invalidate_cache()  # another node (or process) may have written since we looked
        try:
            names = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        found = []
        for name in names:
            match = _STEP_DIR.match(name.rstrip("/").rsplit("/", 1)[-1])
            if match:
                found.append(int(match.group(1)))
        return sorted(set(found))

    def committed_steps(self) -> list[int]:
        """Steps whose manifest has been uploaded, oldest first (not yet verified)."""
        self.fs.invalidate_cache()
        manifests = self.fs.glob(self._path("step-*", MANIFEST))
        steps = []
        for manifest in manifests:
            match = _STEP_DIR.match(manifest.rstrip("/").rsplit("/", 2)[-2])
            if match:
                steps.append(int(match.group(1)))
        return sorted(steps)

    # --- saving --------------------------------------------------------------------------------
    def save(self, step: int, files: dict[str, Any], keep: int) -> SavedCheckpoint:
        if MANIFEST in files:
            raise ValueError(f"{MANIFEST} is written by save itself")
        started = time.monotonic()
        step_dir = self._path(step_dir_name(step))
        # A step left by an abandoned timeline: its manifest goes first, so the old commit can
        # never vouch for a mix of old and new files.
        self._remove(step_dir)
        listing = {}
        for name, obj in files.items():
            upload = self.fs.open(f"{step_dir}/{name}", "wb")
            writer = _HashingWriter(file=upload)
            try:
                torch.save(obj, writer)
            except BaseException:
                _abandon(upload)
                raise
            listing[name] = {"bytes": writer.size, "sha256": writer.close()}
        manifest = json.dumps({"format": FORMAT_VERSION, "step": step, "created": time.time(), "files": listing},
                              indent=1).encode()
        self.fs.pipe_file(f"{step_dir}/{MANIFEST}", manifest)
        self.prune(keep)
        return SavedCheckpoint(path=self.url(step_dir_name(step)), step=step,
                               bytes=sum(f["bytes"] for f in listing.values()) + len(manifest),
                               seconds=time.monotonic() - started)

    def _remove(self, step_dir: str) -> None:
        """Delete a step's objects, its manifest first (one listing, then batch deletes)."""
        self.fs.invalidate_cache(step_dir)
        try:
            files = self.fs.find(step_dir)
        except FileNotFoundError:
            return
        manifest = f"{step_dir}/{MANIFEST}"
        if manifest in files:
            self.fs.rm_file(manifest)
        rest = [f for f in files if f != manifest]
        if rest:
            self.fs.rm(rest)

    def prune(self, keep: int) -> list[int]:
        """Keep the newest `keep` committed checkpoints; delete older ones and torn uploads. Returns
        the steps removed. A torn step newer than every commit is left: it may be an upload
        still under way (prune runs only after a commit, when none is)."""
        committed = self.committed_steps()
        kept = set(committed[-keep:]) if keep > 0 else set()
        newest = max(committed, default=-1)
        removed = [s for s in self.steps() if s not in kept and s <= newest]
        for step in removed:
            self._remove(self._path(step_dir_name(step)))
        return removed

    # --- resuming ------------------------------------------------------------------------------
    def find_resumable(self, required: tuple[str, ...]) -> tuple[Optional[Path], list[SkippedCheckpoint]]:
        skipped = []
        for step in reversed(self.steps()):
            problem, local = self._fetch_verified(step, required)
            if problem is None:
                return local, skipped
            skipped.append(SkippedCheckpoint(path=self.url(step_dir_name(step)), step=step, reason=problem))
        return None, skipped

    def _fetch_verified(self, step: int, required: tuple[str, ...]) -> tuple[Optional[str], Optional[Path]]:
        name = step_dir_name(step)
        remote = self._path(name)
        try:
            manifest = json.loads(self.fs.cat_file(f"{remote}/{MANIFEST}"))
        except FileNotFoundError:
            return TORN, None
        except ValueError as e:
            return f"unreadable manifest ({type(e).__name__})", None
        problem = manifest_problem(manifest, name, required)
        if problem:
            return problem, None
        # Sizes first, from the listing: a torn or foreign file costs no download.
        for file, expected in manifest["files"].items():
            try:
                size = self.fs.size(f"{remote}/{file}")
            except FileNotFoundError:
                return f"{file} is missing", None
            if size != expected.get("bytes"):
                return f"{file} has {size} bytes, manifest says {expected.get('bytes')}", None
        local = self.cache_dir / name
        shutil.rmtree(self.cache_dir, ignore_errors=True)  # one checkpoint's copy at a time: disk is finite
        local.mkdir(parents=True)
        for file in [*manifest["files"], MANIFEST]:
            self.fs.get_file(f"{remote}/{file}", str(local / file))
        problem = verify_checkpoint(local, required)
        if problem:
            shutil.rmtree(self.cache_dir, ignore_errors=True)
            return problem, None
        return None, local

    def reject(self, skipped: SkippedCheckpoint) -> str:
        """A torn upload is deleted (it holds nothing worth reading); a committed checkpoint that
        failed verification moves to rejected-step-*, kept for inspection like a local one."""
        step_dir = self._path(step_dir_name(skipped.step))
        if skipped.reason == TORN:
            self._remove(step_dir)
            return "deleted (torn upload)"
        target = self._path(_REJECTED_PREFIX + step_dir_name(skipped.step))
        if self.fs.exists(target):
            self.fs.rm(target, recursive=True)
        # Object by object: a recursive mv also tries to copy the "directory" itself, which an
        # object store does not have. Cut short, the source keeps its manifest and fails again.
        for file in self.fs.find(step_dir):
            self.fs.cp_file(file, target + file[len(step_dir):])
        self._remove(step_dir)
        return self.url(_REJECTED_PREFIX + step_dir_name(skipped.step))

    def release(self, path: Path) -> None:
        shutil.rmtree(self.cache_dir, ignore_errors=True)

    # --- the event log -------------------------------------------------------------------------
    def publish_events(self, events_path: Path) -> None:
        """Upload the run's event log next to the checkpoints. Best effort: a failed copy costs a
        new node its attempt numbering at worst, never the training."""
        if not Path(events_path).exists():
            return
        try:
            self.fs.put_file(str(events_path), self._path(EVENTS_FILE))
        except Exception as e:  # noqa: BLE001 - any store error; the run goes on
            print(f"warning: could not copy {EVENTS_FILE} to {self.url()}: {type(e).__name__}: {e}", file=sys.stderr)

    def restore_events(self, events_path: Path) -> bool:
        """On a node without the run's event log, fetch the copy kept with the checkpoints, so
        `next_attempt` continues the numbering. Returns whether it did."""
        events_path = Path(events_path)
        if events_path.exists():
            return False  # this node has the log already; it is the newer one
        try:
            if not self.fs.exists(self._path(EVENTS_FILE)):
                return False
            events_path.parent.mkdir(parents=True, exist_ok=True)
            partial = events_path.with_name(events_path.name + ".download")
            self.fs.get_file(self._path(EVENTS_FILE), str(partial))
            partial.replace(events_path)
            return True
        except (PermissionError, FileNotFoundError) as e:
            raise SpecError(f"--checkpoint-dir {self.location}: cannot read it ({type(e).__name__}: {e})") from None
