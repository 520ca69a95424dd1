"""What the recipe's events say about the rows the backend reported: which checkpoints a resume
loaded or skipped, and each attempt's execution config, resume step and trained tokens.

Called inside the Ledger's write transactions (ingest_events, upsert_attempt), on every watch
tick: each read here is an index seek, never a scan, so a tick costs the same at any step.
"""
from __future__ import annotations

import json
from typing import Iterable, Optional

from sqlalchemy import select
from sqlalchemy.orm import Session

from orchestrator.ledger_tables import EXECUTION_COLUMNS, Attempt, Checkpoint, ProgressSample, RunEvent


def mark_verified(s: Session, job_id: str, run_events: list[dict]) -> None:
    """A checkpoint is verified when a resume loaded it (its `start` names the step) and
    failed when a resume skipped it (`checkpoint_skipped`): the newest one of that step saved
    by an earlier attempt."""
    for ev in run_events:
        payload = json.loads(ev["payload"])
        if ev["event"] == "start" and isinstance(payload.get("resumed_from_step"), int):
            step, verdict = payload["resumed_from_step"], True
        elif ev["event"] == "checkpoint_skipped" and ev["step"] is not None:
            step, verdict = ev["step"], False
        else:
            continue
        row = s.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.step == step,
                                                 Checkpoint.attempt < ev["attempt"])
                        .order_by(Checkpoint.attempt.desc()).limit(1)).first()
        if row is not None:
            row.verified = verdict


def refresh_progress(s: Session, job_id: str, attempt_numbers: Optional[Iterable[int]] = None) -> None:
    """Derive attempts' resumed_from_step and trained tokens from their events (all attempts
    when none are named: a later attempt's baseline depends on an earlier one's samples)."""
    if attempt_numbers is None:
        attempt_numbers = s.scalars(select(Attempt.n).where(Attempt.job_id == job_id)).all()
    for n in sorted(set(attempt_numbers)):
        attempt = s.scalars(select(Attempt).where(Attempt.job_id == job_id, Attempt.n == n)).one_or_none()
        if attempt is None:
            continue  # events arrived before the backend reported the attempt; upsert calls back
        start = s.scalars(select(RunEvent).where(RunEvent.job_id == job_id, RunEvent.attempt == n,
                                                 RunEvent.event == "start").order_by(RunEvent.offset.desc()).limit(1)).first()
        payload = json.loads(start.payload) if start is not None else {}
        resumed = payload.get("resumed_from_step")
        for name, value in _ran_execution(payload).items():
            setattr(attempt, name, value)
        finished = s.scalars(select(RunEvent).where(RunEvent.job_id == job_id, RunEvent.attempt == n,
                                                    RunEvent.event == "finished").limit(1)).first()
        # max(tokens), spelled as ORDER BY ... LIMIT 1: PostgreSQL then seeks the index even
        # before it has statistics on a fast-growing table (an aggregate would read the range).
        end_tokens = finished.tokens if finished is not None and finished.tokens is not None else \
            s.scalar(select(ProgressSample.tokens).where(ProgressSample.job_id == job_id, ProgressSample.attempt == n,
                                                         ProgressSample.tokens.is_not(None))
                     .order_by(ProgressSample.tokens.desc()).limit(1))
        attempt.resumed_from_step = resumed
        attempt.tokens = None if end_tokens is None else max(0, end_tokens - _tokens_at_resume(s, job_id, n, resumed))


def _ran_execution(start_payload: dict) -> dict:
    """The execution fields a `start` event reports, each only where it has the type it should
    (the file comes from the node: a field of the wrong type is left unknown, never stored)."""
    fields = {}
    for name in EXECUTION_COLUMNS:
        value = start_payload.get(name)
        if name == "gradient_checkpointing":
            ok = isinstance(value, bool)
        elif name in ("micro_batch", "grad_accum"):
            ok = isinstance(value, int) and not isinstance(value, bool) and 0 < value < 2**31
        else:
            ok = isinstance(value, str) and len(value) <= (32 if name == "attention" else 8 if name == "sharding" else 16)
        fields[name] = value if ok else None
    return fields


def _tokens_at_resume(s: Session, job_id: str, n: int, resumed_from_step: Optional[int]) -> int:
    """Cumulative tokens already trained at the step this attempt resumed from.

    Exact when an earlier attempt logged that step; otherwise scaled from this attempt's first
    sample (tokens grow linearly in steps with packed sequences)."""
    if not resumed_from_step:
        return 0
    # The latest sample at or before that step, ties to the later attempt, among earlier attempts:
    # one seek per earlier attempt, newest first, so it costs the same however many steps each ran.
    best: Optional[tuple[int, int]] = None  # (step, tokens)
    earlier = n
    while best is None or best[0] < resumed_from_step:
        earlier = s.scalar(select(ProgressSample.attempt).where(
            ProgressSample.job_id == job_id, ProgressSample.attempt < earlier).order_by(ProgressSample.attempt.desc()).limit(1))
        if earlier is None:
            break
        row = s.execute(select(ProgressSample.step, ProgressSample.tokens).where(
            ProgressSample.job_id == job_id, ProgressSample.attempt == earlier, ProgressSample.step <= resumed_from_step,
            ProgressSample.tokens.is_not(None)).order_by(ProgressSample.step.desc()).limit(1)).first()
        if row is not None and (best is None or row.step > best[0]):
            best = (row.step, row.tokens)
    if best is not None:
        return best[1]
    first = s.scalars(select(ProgressSample).where(ProgressSample.job_id == job_id, ProgressSample.attempt == n,
                                                   ProgressSample.tokens.is_not(None))
                      .order_by(ProgressSample.step).limit(1)).first()
    if first is None or first.step <= 0:
        return 0
    return first.tokens * resumed_from_step // first.step
