"""Turning the recipe's events.jsonl (DESIGN.md's contract) into ledger rows, incrementally.

Only complete lines are read; each keeps its byte offset, which is its identity in the ledger.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Optional

from contract.events import CHECKPOINT, ERROR, RUN_EVENTS, START, STEP, parse_line, read_new_lines
from orchestrator.redact import redact


@dataclass
class EventRows:
    samples: list[dict] = field(default_factory=list)
    checkpoints: list[dict] = field(default_factory=list)
    run_events: list[dict] = field(default_factory=list)
    count: int = 0                       # events understood (malformed lines are skipped)
    attempts: set[int] = field(default_factory=set)


def _number(value, cast):
    """`cast(value)`, or None for what the recipe would never write as a number (a bool, text)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        return cast(value)
    except (TypeError, ValueError, OverflowError):
        return None


def _int(value) -> Optional[int]:
    return _number(value, int)


def _float(value) -> Optional[float]:
    return _number(value, float)


def _time(value) -> Optional[datetime]:
    seconds = _float(value)
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, timezone.utc)


def events_to_rows(job_id: str, lines: list[tuple[int, bytes]], starts_before: int = 0) -> EventRows:
    """Rows for the ledger. An event's attempt is the larger of the number it carries and the count
    of `start` events so far: a recipe restarted by a backend that does not tell it its attempt
    number (SkyPilot recovery reruns the same task) still gets one attempt per start, so the steps
    it redoes are kept rather than taken for duplicates."""
    rows = EventRows()
    starts = starts_before
    seen_samples: set[tuple[int, int]] = set()
    seen_checkpoints: set[tuple[int, int]] = set()
    for offset, raw in lines:
        ev = parse_line(raw)
        if ev is None:
            continue  # a torn line from a crash mid-write; the next line is intact
        kind, when, attempt = ev.get("event"), _time(ev.get("time")), _int(ev.get("attempt"))
        if when is None or kind is None:
            continue
        if kind == START:
            starts += 1
        attempt = max(attempt if attempt is not None and attempt >= 1 else 1, starts)
        step = _int(ev.get("step"))
        if kind == STEP:
            if step is None or (attempt, step) in seen_samples:
                continue
            seen_samples.add((attempt, step))
            rows.samples.append({"job_id": job_id, "attempt": attempt, "step": step, "tokens": _int(ev.get("tokens")),
                                 "loss": _float(ev.get("loss")), "lr": _float(ev.get("lr")),
                                 "tokens_per_second": _float(ev.get("tokens_per_second")), "time": when})
        elif kind == CHECKPOINT:
            path = str(ev.get("path") or "")
            if step is None or not path or (attempt, step) in seen_checkpoints:
                continue
            seen_checkpoints.add((attempt, step))
            rows.checkpoints.append({"job_id": job_id, "attempt": attempt, "step": step, "path": path,
                                     "bytes": _int(ev.get("bytes")), "seconds": _float(ev.get("seconds")),
                                     # verified only once a resume has loaded it (ledger_progress.mark_verified)
                                     "verified": None, "time": when})
        elif kind in RUN_EVENTS:
            if kind == ERROR and isinstance(ev.get("message"), str):
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
