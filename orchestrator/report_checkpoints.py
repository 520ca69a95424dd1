"""The checkpoints a job has on hand, and their table in `spotune status | ledger JOB`.

The ledger records every save the recipe announced, but the recipe keeps only the newest
`checkpoint.keep` (deleting older ones as it saves) and sets aside any that a resume found corrupt:
what can still be resumed from is worked out here, not read off the history of saves.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.format import size

if TYPE_CHECKING:
    from orchestrator.ledger import CheckpointRecord, JobRecord, RunEventRecord


def _keep(job: "JobRecord") -> int:
    """How many checkpoints the recipe keeps for this job (spec checkpoint.keep)."""
    import yaml

    from contract.spec import CheckpointSpec

    default = CheckpointSpec.model_fields["keep"].default
    try:
        raw = yaml.safe_load(job.spec_yaml) or {}
        keep = (raw.get("checkpoint") or {}).get("keep", default)
        return int(keep) if isinstance(keep, int) and keep > 0 else default
    except (yaml.YAMLError, AttributeError, TypeError, ValueError):
        return default


def _gone_from_here(path: str) -> bool:
    """A checkpoint on this machine that is no longer there. A path whose folder is not on this
    machine (a cloud node's mount, a bucket) cannot be looked at from here, so it is not judged."""
    p = Path(path)
    return p.is_absolute() and p.parent.is_dir() and not p.exists()


def existing_checkpoints(job: "JobRecord", checkpoints: list["CheckpointRecord"],
                         run_events: list["RunEventRecord"]) -> list["CheckpointRecord"]:
    """The checkpoints that still exist. The recipe keeps only the newest `checkpoint.keep` (deleting
    older ones as it saves) and sets aside any that a resume found corrupt, so the ledger's history
    of saves is not a list of what can be resumed from."""
    skipped = {(e.payload.get("path"), e.time) for e in run_events if e.event == "checkpoint_skipped"}
    newest_by_step: dict[int, "CheckpointRecord"] = {}
    for c in sorted(checkpoints, key=lambda c: c.time):
        newest_by_step[c.step] = c  # a step saved again after a resume: the later save is the one on disk
    alive = [c for c in newest_by_step.values()
             if c.verified is not False and not any(p == c.path and t >= c.time for p, t in skipped)]
    alive.sort(key=lambda c: c.step)
    return [c for c in alive[-_keep(job):] if not _gone_from_here(c.path)]


def checkpoint_table(job: "JobRecord", checkpoints: list["CheckpointRecord"]):
    from rich.markup import escape

    root = _common_root([c.path for c in checkpoints])
    kept = _keep(job)
    title = f"Checkpoints on hand (the newest {kept} are kept)" + (f" in {escape(root)}" if root else "")
    from rich import box
    from rich.table import Table

    cps = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False,
                collapse_padding=True)
    for col in ("attempt", "step", "written", "size", "save s", "resumed from", "path"):
        cps.add_column(col, justify="right" if col in ("step", "size", "save s") else "left",
                       overflow="fold", no_wrap=col != "path")
    for c in checkpoints:
        resumed = "-" if c.verified is None else ("yes" if c.verified else "no, skipped")
        shown = c.path[len(root):].lstrip("/") if root else c.path
        cps.add_row(str(c.attempt), str(c.step), f"{c.time:%H:%M:%S}", size(c.bytes),
                    "-" if c.seconds is None else f"{c.seconds:.1f}", resumed, escape(shown))
    return cps


def _common_root(paths: list[str]) -> str:
    """The folder the checkpoints share, said once above the table instead of on every row."""
    import os

    if not paths or not all(p.startswith("/") for p in paths):
        return ""
    return os.path.dirname(paths[0].rstrip("/")) if len(paths) == 1 else os.path.commonpath(paths)
