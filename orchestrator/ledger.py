"""The ledger: every job, the estimate it was launched on (never rewritten), every attempt with the
price of the machine it ran on, checkpoints and progress from the recipe's events.jsonl.

`Ledger(url)` opens SQLite or PostgreSQL and migrates the schema to head (ledger_engine.py). Every
write is one transaction; what the events say about attempts and checkpoints is derived in the same
transaction (ledger_progress.py). Reads return frozen records, never live ORM objects.
"""
from __future__ import annotations

import json
import re
import secrets
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from sqlalchemy import func, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session

from orchestrator.ledger_engine import BUSY_TIMEOUT_SECONDS, migrate, normalize_url, open_engine, parse_url
from orchestrator.ledger_errors import LedgerError, OneLineErrors
from orchestrator.ledger_events import events_to_rows, insert_ignore, read_new_lines
from orchestrator.ledger_progress import mark_verified, refresh_progress
from orchestrator.ledger_tables import (EXECUTION_COLUMNS, JOB_STATUSES, TERMINAL_STATUSES, Attempt, AttemptRecord, BudgetChange,
                                        BudgetChangeRecord, Checkpoint, CheckpointRecord, Estimate,
                                        EstimateRecord, EventCursor, Job, JobRecord, LatestProgress, ProgressSample,
                                        RunEvent, RunEventRecord, SampleRecord)
from orchestrator.redact import redact

if TYPE_CHECKING:
    from contract.backend import ObservedAttempt
    from orchestrator.quote import Plan
    from contract.spec import JobSpec

__all__ = ["Ledger", "LedgerError", "JobRecord", "EstimateRecord", "AttemptRecord", "CheckpointRecord",
           "SampleRecord", "RunEventRecord", "LatestProgress", "JOB_STATUSES", "BUSY_TIMEOUT_SECONDS",
           "normalize_url", "redact"]


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _record(cls, row, **extra):
    names = cls.__dataclass_fields__.keys()
    return cls(**{n: extra[n] if n in extra else getattr(row, n) for n in names})


class Ledger:
    def __init__(self, url: str):
        self.url = normalize_url(url)
        parsed = parse_url(url)
        self.display_url = parsed.render_as_string(hide_password=True)
        self.dialect = parsed.get_backend_name()
        self._engine = open_engine(parsed)
        self._errors = OneLineErrors(self.display_url, parsed.database if self.dialect == "sqlite" else None)
        self._errors.install(self._engine)
        # Writes on SQLite take the write lock at BEGIN (IMMEDIATE): a deferred transaction that
        # reads then writes can hit SQLITE_BUSY without waiting when another writer got in between.
        self._write_engine = self._engine.execution_options(sqlite_begin="IMMEDIATE")
        try:
            migrate(self._write_engine, self.display_url)
        except DBAPIError as e:  # OperationalError, and DatabaseError: "file is not a database"
            self._engine.dispose()
            raise LedgerError(f"cannot open ledger at {self.display_url}: {str(e.orig).strip().splitlines()[0]}") from None
        except LedgerError:
            self._engine.dispose()
            raise
        self._errors.opened = True

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _write(self) -> Session:
        return Session(self._write_engine, expire_on_commit=False)

    def _read(self) -> Session:
        return Session(self._engine)

    # ---- jobs -------------------------------------------------------------------------------

    def create_job(self, spec: "JobSpec", spec_yaml: str, backend: str, plan: "Plan", chosen_rank: int,
                   run_dir: Optional[Callable[[str], Path | str]] = None) -> str:
        """Record a job and the estimate it is launched on, in one transaction; return its id.

        `run_dir(job_id)` says where the job's run will live: recorded with the job, before anything
        is started, so a launch killed midway can still be found and settled."""
        chosen = next((o for o in plan.options if o.rank == chosen_rank), None)
        if chosen is None:
            raise ValueError(f"plan has no option with rank {chosen_rank} (ranks: {[o.rank for o in plan.options]})")
        for _ in range(3):
            try:
                return self._insert_job(spec, spec_yaml, backend, plan, chosen, run_dir)
            except IntegrityError:
                continue  # another process took the same random id in the same instant
        raise RuntimeError(f"could not record job {spec.name}: id collisions three times in a row")

    def _insert_job(self, spec: "JobSpec", spec_yaml: str, backend: str, plan: "Plan", chosen, run_dir) -> str:
        now = _now()
        budget = spec.constraints.budget
        with self._write() as s, s.begin():
            job_id = self._new_job_id(s, spec.name, now)
            s.add(Job(id=job_id, name=spec.name, model=spec.model, method=spec.method, spec_yaml=spec_yaml,
                      spec_hash=spec.spec_hash(), status="pending", backend=backend,
                      budget=None if budget is None else Decimal(str(budget)), external_id=None,
                      failure_reason=None, created_at=now, updated_at=now,
                      run_dir=None if run_dir is None else str(run_dir(job_id))))
            s.flush()
            s.add(Estimate(job_id=job_id, plan_json=json.dumps(plan.to_json(), sort_keys=True),
                           chosen_rank=chosen.rank, catalog_snapshot=plan.catalog_snapshot,
                           **chosen.placement.columns(), tokens_per_second=float(chosen.tokens_per_second),
                           hours=float(chosen.hours), preemption_overhead_hours=float(chosen.preemption_overhead_hours),
                           expected_cost=chosen.expected_cost, total_tokens=int(plan.total_tokens),
                           created_at=now, **{k: getattr(chosen.execution, k) for k in EXECUTION_COLUMNS}))
        return job_id

    @staticmethod
    def _new_job_id(s: Session, name: str, now: datetime) -> str:
        for _ in range(64):
            candidate = f"{name}-{now:%Y%m%d}-{secrets.token_hex(2)}"
            if s.get(Job, candidate) is None:
                return candidate
        raise RuntimeError(f"no free job id for {name} on {now:%Y-%m-%d} after 64 tries")

    def set_status(self, job_id: str, status: str, reason: Optional[str] = None) -> None:
        if status not in JOB_STATUSES:
            raise ValueError(f"unknown job status {status!r}; expected one of {', '.join(JOB_STATUSES)}")
        values = {"status": status, "updated_at": _now()}
        if reason is not None:
            values["failure_reason"] = redact(reason)
        elif status not in TERMINAL_STATUSES:
            values["failure_reason"] = None  # running again (a resumed job): the old reason no longer holds
        self._update_job(job_id, values)

    def set_external_id(self, job_id: str, external_id: str) -> None:
        self._update_job(job_id, {"external_id": external_id, "updated_at": _now()})

    def _update_job(self, job_id: str, values: dict) -> None:
        with self._write() as s, s.begin():
            if s.execute(update(Job).where(Job.id == job_id).values(**values)).rowcount != 1:
                raise LedgerError(f"no job {job_id!r} in the ledger")

    def get_job(self, job_id_or_prefix: str) -> JobRecord:
        """The job with this id, or the one job whose id starts with it."""
        with self._read() as s:
            job = s.get(Job, job_id_or_prefix)
            if job is None:
                escaped = re.sub(r"([\\%_])", r"\\\1", job_id_or_prefix)
                matches = s.scalars(select(Job).where(Job.id.like(escaped + "%", escape="\\")).order_by(Job.id).limit(6)).all()
                if not matches:
                    raise LedgerError(f"no job matching {job_id_or_prefix!r} in the ledger")
                if len(matches) > 1:
                    shown = ", ".join(m.id for m in matches[:5])
                    raise LedgerError(f"{job_id_or_prefix!r} matches several jobs ({shown}{', ...' if len(matches) > 5 else ''}); give more of the id")
                job = matches[0]
            return self._job_record(s, job)

    def list_jobs(self) -> list[JobRecord]:
        with self._read() as s:
            jobs = s.scalars(select(Job).order_by(Job.created_at, Job.id)).all()
            estimates = {e.job_id: e for e in s.scalars(select(Estimate)).all()}
            return [self._job_record(s, j, estimates.get(j.id)) for j in jobs]

    @staticmethod
    def _job_record(s: Session, job: Job, estimate: Optional[Estimate] = None) -> JobRecord:
        estimate = estimate or s.get(Estimate, job.id)
        return _record(JobRecord, job, estimate=_record(EstimateRecord, estimate))

    # ---- attempts and events ------------------------------------------------------------------

    def upsert_attempt(self, job_id: str, observed: "ObservedAttempt") -> None:
        """Insert attempt (job, n) or update it; end fields are filled in when they appear and
        never erased by a later observation that lacks them."""
        placement = {**observed.placement.columns(), "started_at": observed.started_at, "kind": observed.kind}
        late = {"ended_at": observed.ended_at, "end_reason": observed.end_reason,
                "external_id": observed.external_id,
                "detail": None if observed.detail is None else redact(observed.detail)}
        with self._write() as s, s.begin():
            if s.get(Job, job_id, with_for_update=True) is None:  # one writer per job at a time
                raise LedgerError(f"no job {job_id!r} in the ledger")
            # Safe read-then-write: SQLite holds the database write lock, PostgreSQL the job row lock.
            row = s.scalars(select(Attempt).where(Attempt.job_id == job_id, Attempt.n == observed.n)).one_or_none()
            if row is None:
                row = Attempt(job_id=job_id, n=observed.n, **placement, **late)
                s.add(row)
            else:
                for name, value in placement.items():
                    setattr(row, name, value)
                for name, value in late.items():
                    if value is not None:
                        setattr(row, name, value)
            s.flush()
            refresh_progress(s, job_id, [observed.n])
            s.execute(update(Job).where(Job.id == job_id).values(updated_at=_now()))

    def ingest_events(self, job_id: str, events_path: Path | str) -> int:
        """Read events.jsonl from where the last call stopped; return how many events were read.

        Idempotent: rows are keyed by (job, attempt, step) or the line's byte offset, so a re-read
        (another process, a copied file, a replaced file) never duplicates. A partial last line is
        left for the next call.
        """
        path = Path(events_path)
        with self._write() as s, s.begin():
            if s.get(Job, job_id, with_for_update=True) is None:  # one writer per job at a time
                raise LedgerError(f"no job {job_id!r} in the ledger")
            cursor = s.get(EventCursor, job_id)
            start = cursor.offset if cursor is not None and cursor.path == str(path) else 0
            lines, end = read_new_lines(path, start)
            if end == start and cursor is not None:
                return 0
            starts_before = s.scalar(select(func.count()).select_from(RunEvent).where(
                RunEvent.job_id == job_id, RunEvent.event == "start", RunEvent.offset < start)) if start else 0
            rows = events_to_rows(job_id, lines, starts_before=starts_before)
            for model, batch in ((ProgressSample, rows.samples), (Checkpoint, rows.checkpoints), (RunEvent, rows.run_events)):
                if batch:
                    s.execute(insert_ignore(s.bind.dialect.name, model), batch)
            if cursor is None:
                s.add(EventCursor(job_id=job_id, path=str(path), offset=end, updated_at=_now()))
            else:
                cursor.path, cursor.offset, cursor.updated_at = str(path), end, _now()
            s.flush()
            mark_verified(s, job_id, rows.run_events)
            if rows.count:
                refresh_progress(s, job_id)
            return rows.count

    def change_budget(self, job_id: str, budget: Optional[Decimal], spent: Decimal, reason: str) -> None:
        """Put `budget` in force for the job and record the change (from what, at what spend, why)."""
        with self._write() as s, s.begin():
            job = s.get(Job, job_id, with_for_update=True)
            if job is None:
                raise LedgerError(f"no job {job_id!r} in the ledger")
            s.add(BudgetChange(job_id=job_id, time=_now(), old_budget=job.budget, new_budget=budget,
                               spent=Decimal(spent), reason=redact(reason)))
            job.budget, job.updated_at = budget, _now()

    def budget_changes(self, job_id: str) -> list[BudgetChangeRecord]:
        return self._rows(BudgetChangeRecord, BudgetChange, job_id, BudgetChange.time, BudgetChange.id)

    # ---- reads --------------------------------------------------------------------------------

    def attempts(self, job_id: str) -> list[AttemptRecord]:
        return self._rows(AttemptRecord, Attempt, job_id, Attempt.n)

    def checkpoints(self, job_id: str) -> list[CheckpointRecord]:
        return self._rows(CheckpointRecord, Checkpoint, job_id, Checkpoint.attempt, Checkpoint.step)

    def samples(self, job_id: str) -> list[SampleRecord]:
        return self._rows(SampleRecord, ProgressSample, job_id, ProgressSample.attempt, ProgressSample.step)

    def latest_progress(self, job_id: str, window: int) -> LatestProgress:
        """The latest sample, the nonzero tokens/s of its attempt's latest `window` samples, the latest
        `start` and the attempts that logged one. Each is an indexed ORDER BY ... LIMIT read, so a
        watch tick costs the same at step 100 and at step 100,000."""
        sample_columns = [getattr(ProgressSample, name) for name in SampleRecord.__dataclass_fields__]
        with self._read() as s:  # one read transaction: the four answers agree with each other
            row = s.execute(select(*sample_columns).where(ProgressSample.job_id == job_id)
                            .order_by(ProgressSample.attempt.desc(), ProgressSample.step.desc()).limit(1)).first()
            sample = None if row is None else SampleRecord(*row)
            rates: tuple[float, ...] = ()
            if sample is not None:
                newest_first = s.scalars(select(ProgressSample.tokens_per_second).where(
                    ProgressSample.job_id == job_id, ProgressSample.attempt == sample.attempt,
                    ProgressSample.tokens_per_second.is_not(None), ProgressSample.tokens_per_second != 0)
                    .order_by(ProgressSample.step.desc()).limit(window)).all()
                rates = tuple(reversed(newest_first))
            start = s.scalars(select(RunEvent).where(RunEvent.job_id == job_id, RunEvent.event == "start")
                              .order_by(RunEvent.offset.desc()).limit(1)).first()
            started = frozenset(s.scalars(select(RunEvent.attempt).distinct().where(
                RunEvent.job_id == job_id, RunEvent.event == "start")).all())
            start_record = None if start is None else _record(RunEventRecord, start, payload=json.loads(start.payload))
            return LatestProgress(sample=sample, recent_tokens_per_second=rates, start=start_record,
                                  started_attempts=started)

    def _rows(self, record, model, job_id: str, *order_by) -> list:
        # Column rows, not ORM objects: a long job has tens of thousands of samples (reconcile reads them all).
        names = list(record.__dataclass_fields__)
        query = select(*(getattr(model, name) for name in names)).where(model.job_id == job_id).order_by(*order_by)
        with self._read() as s:
            return [record(**dict(zip(names, row))) for row in s.execute(query)]

    def run_events_named(self, job_id: str, event_name: str) -> list[RunEventRecord]:
        """The job's run events of one kind, in file order: an index seek, cheap on every watch tick."""
        with self._read() as s:
            rows = s.scalars(select(RunEvent).where(RunEvent.job_id == job_id, RunEvent.event == event_name)
                             .order_by(RunEvent.offset)).all()
            return [_record(RunEventRecord, r, payload=json.loads(r.payload)) for r in rows]

    def run_events(self, job_id: str) -> list[RunEventRecord]:
        with self._read() as s:
            rows = s.scalars(select(RunEvent).where(RunEvent.job_id == job_id).order_by(RunEvent.offset)).all()
            return [_record(RunEventRecord, r, payload=json.loads(r.payload)) for r in rows]

