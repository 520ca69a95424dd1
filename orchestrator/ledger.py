"""The ledger: every job, the estimate it was launched on (never rewritten), every attempt with the
price of the machine it ran on, checkpoints and progress from the recipe's events.jsonl.

`Ledger(url)` opens SQLite (WAL, busy timeout, write transactions take the lock up front so two
writers queue instead of failing) or PostgreSQL, and migrates the schema to head. Every write is one
transaction. Reads return frozen records, never live ORM objects.
"""
from __future__ import annotations

import json
import re
import secrets
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Optional

from sqlalchemy import create_engine, event, func, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, NoSuchModuleError
from sqlalchemy.orm import Session

from orchestrator.ledger_errors import LedgerError, OneLineErrors
from orchestrator.ledger_events import events_to_rows, insert_ignore, read_new_lines
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
           "SampleRecord", "RunEventRecord", "LatestProgress", "JOB_STATUSES", "redact"]

BUSY_TIMEOUT_SECONDS = 60


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _record(cls, row, **extra):
    names = cls.__dataclass_fields__.keys()
    return cls(**{n: extra[n] if n in extra else getattr(row, n) for n in names})


def normalize_url(url: str) -> str:
    """`postgresql://` and `postgres://` mean psycopg 3 (the `postgres` extra's driver), not psycopg2."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


class Ledger:
    def __init__(self, url: str):
        self.url = normalize_url(url)
        try:
            parsed = make_url(self.url)
        except ArgumentError:
            raise LedgerError(f"not a database URL: {redact(url)!r} (expected sqlite:///PATH or postgresql+psycopg://...)") from None
        self.display_url = parsed.render_as_string(hide_password=True)
        self.dialect = parsed.get_backend_name()
        if self.dialect not in ("sqlite", "postgresql"):
            raise LedgerError(f"unsupported ledger URL {self.display_url}: the ledger runs on SQLite or PostgreSQL")
        try:
            if self.dialect == "sqlite":
                self._engine = self._sqlite_engine(parsed)
            else:
                self._engine = create_engine(parsed, pool_pre_ping=True)
        except NoSuchModuleError as e:
            raise LedgerError(f"unsupported ledger URL {self.display_url}: {e}") from None
        except ImportError as e:
            raise LedgerError(f"the ledger at {self.display_url} needs the {e.name} driver: pip install 'spotune[postgres]'") from None
        except OSError as e:
            raise LedgerError(f"cannot create the ledger's directory for {self.display_url}: {e.strerror}") from None
        self._errors = OneLineErrors(self.display_url, parsed.database if self.dialect == "sqlite" else None)
        self._errors.install(self._engine)
        # Writes on SQLite take the write lock at BEGIN (IMMEDIATE): a deferred transaction that
        # reads then writes can hit SQLITE_BUSY without waiting when another writer got in between.
        self._write_engine = self._engine.execution_options(sqlite_begin="IMMEDIATE")
        try:
            self._migrate()
        except DBAPIError as e:  # OperationalError, and DatabaseError: "file is not a database"
            self._engine.dispose()
            raise LedgerError(f"cannot open ledger at {self.display_url}: {str(e.orig).strip().splitlines()[0]}") from None
        self._errors.opened = True

    @staticmethod
    def _sqlite_engine(parsed):
        database = parsed.database or ""
        if database and database != ":memory:":
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(parsed, connect_args={"timeout": BUSY_TIMEOUT_SECONDS})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection, _record):
            dbapi_connection.isolation_level = None  # SQLAlchemy emits BEGIN itself (below)
            cursor = dbapi_connection.cursor()
            cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_SECONDS * 1000}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")
            cursor.execute("PRAGMA foreign_keys = ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn):
            conn.exec_driver_sql(f"BEGIN {conn.get_execution_options().get('sqlite_begin', 'DEFERRED')}")

        return engine

    def _migrate(self) -> None:
        from orchestrator.migrations import NewerSchemaError, upgrade_to_head

        try:
            with self._write_engine.connect() as conn:
                sqlite = conn.dialect.name == "sqlite"
                if sqlite:
                    # Alembic rebuilds a SQLite table to change a column: it drops the old one, and with
                    # foreign keys on, dropping a parent first deletes its rows, cascading to every child
                    # table. SQLite's own procedure for schema changes: keys off outside the
                    # transaction, checked before the commit.
                    conn.connection.dbapi_connection.execute("PRAGMA foreign_keys = OFF")
                try:
                    with conn.begin():
                        upgrade_to_head(conn)
                        if sqlite and conn.exec_driver_sql("PRAGMA foreign_key_check").first() is not None:
                            raise LedgerError(f"the ledger at {self.display_url} has rows whose job is gone; "
                                              "not migrated (nothing changed)")
                finally:
                    if sqlite:
                        conn.connection.dbapi_connection.execute("PRAGMA foreign_keys = ON")
        except NewerSchemaError as e:
            self._engine.dispose()
            raise LedgerError(f"the ledger at {self.display_url} {e}") from None

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
            self._refresh_progress(s, job_id, [observed.n])
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
            self._mark_verified(s, job_id, rows.run_events)
            if rows.count:
                self._refresh_progress(s, job_id)
            return rows.count

    @staticmethod
    def _mark_verified(s: Session, job_id: str, run_events: list[dict]) -> None:
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

    @staticmethod
    def _refresh_progress(s: Session, job_id: str, attempt_numbers: Optional[Iterable[int]] = None) -> None:
        """Derive attempts' resumed_from_step and trained tokens from their events (all attempts
        when none are named: a later attempt's baseline depends on an earlier one's samples)."""
        if attempt_numbers is None:
            attempt_numbers = s.scalars(select(Attempt.n).where(Attempt.job_id == job_id)).all()
        for n in sorted(set(attempt_numbers)):
            attempt = s.scalars(select(Attempt).where(Attempt.job_id == job_id, Attempt.n == n)).one_or_none()
            if attempt is None:
                continue  # events arrived before the backend reported the attempt; upsert calls back
            # Runs on every ingest (every watch tick): each read below is an index seek, never a scan.
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
        columns = [getattr(model, name) for name in record.__dataclass_fields__]
        query = select(*columns).where(model.job_id == job_id).order_by(*order_by)
        with self._read() as s:
            return [record(*row) for row in s.execute(query)]

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
