"""Turning the recipe's events.jsonl (DESIGN.md's contract) into ledger rows, incrementally.

Only complete lines are read; each keeps its byte offset, which is its identity in the ledger.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from orchestrator.redact import redact

RUN_EVENTS = ("start", "preempted", "finished", "error")


@dataclass
class EventRows:
    samples: list[dict] = field(default_factory=list)
    checkpoints: list[dict] = field(default_factory=list)
    run_events: list[dict] = field(default_factory=list)
    count: int = 0                       # events understood (malformed lines are skipped)
    attempts: set[int] = field(default_factory=set)


def read_new_lines(path: Path, start: int) -> tuple[list[tuple[int, bytes]], int]:
    """Complete lines from byte `start` on, each with its offset, and where reading stopped.

    A file shorter than `start` was replaced, not appended to: read it from the beginning (rows
    are keyed so that re-reading is harmless)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return [], start
    if size < start:
        start = 0
    with path.open("rb") as f:
        f.seek(start)
        data = f.read(size - start)
    lines: list[tuple[int, bytes]] = []
    pos = 0
    while True:
        nl = data.find(b"\n", pos)
        if nl < 0:
            break  # the rest is a line still being written
        lines.append((start + pos, data[pos:nl]))
        pos = nl + 1
    return lines, start + pos


def _int(value) -> Optional[int]:
    if value is None or isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _float(value) -> Optional[float]:
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _time(value) -> Optional[datetime]:
    seconds = _float(value)
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, timezone.utc)


def events_to_rows(job_id: str, lines: list[tuple[int, bytes]], base_dir: Path, starts_before: int = 0) -> EventRows:
    """Rows for the ledger. An event's attempt is the larger of the number it carries and the count
    of `start` events so far: a recipe restarted by a backend that does not tell it its attempt
    number (SkyPilot recovery reruns the same task) still gets one attempt per start, so the steps
    it redoes are kept rather than taken for duplicates."""
    rows = EventRows()
    starts = starts_before
    seen_samples: set[tuple[int, int]] = set()
    seen_checkpoints: set[tuple[int, int]] = set()
    for offset, raw in lines:
        try:
            ev = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue  # a torn line from a crash mid-write; the next line is intact
        if not isinstance(ev, dict):
            continue
        kind, when, attempt = ev.get("event"), _time(ev.get("time")), _int(ev.get("attempt"))
        if when is None or kind is None:
            continue
        if kind == "start":
            starts += 1
        attempt = max(attempt if attempt is not None and attempt >= 1 else 1, starts)
        step = _int(ev.get("step"))
        if kind == "step":
            if step is None or (attempt, step) in seen_samples:
                continue
            seen_samples.add((attempt, step))
            rows.samples.append({"job_id": job_id, "attempt": attempt, "step": step, "tokens": _int(ev.get("tokens")),
                                 "loss": _float(ev.get("loss")), "lr": _float(ev.get("lr")),
                                 "tokens_per_second": _float(ev.get("tokens_per_second")), "time": when})
        elif kind == "checkpoint":
            path = str(ev.get("path") or "")
            if step is None or not path or (attempt, step) in seen_checkpoints:
                continue
            seen_checkpoints.add((attempt, step))
            local = Path(path) if Path(path).is_absolute() else base_dir / path
            rows.checkpoints.append({"job_id": job_id, "attempt": attempt, "step": step, "path": path,
                                     "bytes": _int(ev.get("bytes")), "seconds": _float(ev.get("seconds")),
                                     # the recipe renames a checkpoint into place only once it is
                                     # complete, so existing here means whole; remote paths stay unverified
                                     "verified": local.exists(), "time": when})
        elif kind in RUN_EVENTS:
            if kind == "error" and isinstance(ev.get("message"), str):
                ev["message"] = redact(ev["message"])
            rows.run_events.append({"job_id": job_id, "offset": offset, "attempt": attempt, "event": kind,
                                    "step": step, "tokens": _int(ev.get("tokens")),
                                    "payload": json.dumps(ev, sort_keys=True), "time": when})
        else:
            continue
        rows.count += 1
        rows.attempts.add(attempt)
    return rows


def insert_ignore(dialect_name: str, model):
    """INSERT that skips rows whose unique key is already there (both SQLite and PostgreSQL)."""
    if dialect_name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif dialect_name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:
        raise ValueError(f"ledger supports sqlite and postgresql, not {dialect_name}")
    return insert(model).on_conflict_do_nothing()
