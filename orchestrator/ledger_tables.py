"""The ledger's tables (SQLAlchemy 2.x declarative), the two column types that make money and
time round-trip exactly on both SQLite and PostgreSQL, and the frozen records reads return.

The schema itself is owned by the Alembic migrations in `orchestrator/migrations/versions/`;
these models must describe the same tables (tests compare them).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from decimal import ROUND_HALF_UP, Decimal
from typing import Optional

from sqlalchemy import (BigInteger, Boolean, DateTime, Float, ForeignKey, Index, Integer, MetaData, Numeric,
                        String, Text, UniqueConstraint)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from contract.files import MAX_PATH_BYTES
from contract.placement import Placement

# Catalog prices carry up to 6 decimals (e.g. GCP's 0.41783 $/h); keep them exact.
MONEY_SCALE = 6
MONEY_PRECISION = 18
_MONEY_QUANTUM = Decimal(1).scaleb(-MONEY_SCALE)
MAX_MONEY_RECORDED = Decimal(10) ** (MONEY_PRECISION - MONEY_SCALE)   # NUMERIC(18, 6) holds less than this

JOB_STATUSES = ("pending", "running", "recovering", "succeeded", "failed", "cancelled", "over_budget")
TERMINAL_STATUSES = ("succeeded", "failed", "cancelled", "over_budget")


class Money(TypeDecorator):
    """Decimal in, Decimal out, never a float in between.

    PostgreSQL gets NUMERIC(18, 6). SQLite has no decimal type (its NUMERIC affinity turns '2.49'
    into a binary float), so there the value is stored as its exact decimal text.
    """

    impl = Numeric(MONEY_PRECISION, MONEY_SCALE, asdecimal=True)
    cache_ok = True

    def load_dialect_impl(self, dialect):
        if dialect.name == "sqlite":
            return dialect.type_descriptor(String(40))
        return dialect.type_descriptor(Numeric(MONEY_PRECISION, MONEY_SCALE, asdecimal=True))

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if isinstance(value, float):
            raise TypeError("money must be Decimal (or str/int), never float")
        exact = Decimal(value).quantize(_MONEY_QUANTUM, rounding=ROUND_HALF_UP)
        if dialect.name == "sqlite":
            return format(exact, "f")
        return exact

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        return Decimal(value) if not isinstance(value, Decimal) else value


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on both backends.

    PostgreSQL stores timestamptz; SQLite stores the UTC wall time as text with no offset, and the
    offset is put back on the way out. Naive datetimes are refused: a naive time is an ambiguous one.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Optional[datetime], dialect):
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}: ledger times must be timezone-aware")
        utc = value.astimezone(timezone.utc)
        return utc.replace(tzinfo=None) if dialect.name == "sqlite" else utc

    def process_result_value(self, value: Optional[datetime], dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


# Named constraints so migrations (and SQLite batch mode) can refer to them.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(96), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), index=True)
    model: Mapped[str] = mapped_column(String(MAX_PATH_BYTES))     # an HF id or a local path: as long as the spec allows
    method: Mapped[str] = mapped_column(String(16))
    spec_yaml: Mapped[str] = mapped_column(Text)
    spec_hash: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    backend: Mapped[str] = mapped_column(String(32))
    budget: Mapped[Optional[Decimal]] = mapped_column(Money, nullable=True)
    external_id: Mapped[Optional[str]] = mapped_column(Text, nullable=True)    # the backend's (local: the run dir)
    failure_reason: Mapped[Optional[str]] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # Written with the job, before any process starts: a launch killed midway is still found here.
    run_dir: Mapped[Optional[str]] = mapped_column(Text, nullable=True)


class ExecutionColumns:
    """The execution config (contract/execution.py): on an estimate as planned, on an attempt as its
    recipe's `start` event says it ran. NULL where it is not known (rows from before it was kept,
    an attempt that has not started)."""

    micro_batch: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    grad_accum: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    gradient_checkpointing: Mapped[Optional[bool]] = mapped_column(Boolean, nullable=True)
    attention: Mapped[Optional[str]] = mapped_column(String(32), nullable=True)
    dtype: Mapped[Optional[str]] = mapped_column(String(16), nullable=True)
    sharding: Mapped[Optional[str]] = mapped_column(String(8), nullable=True)


class PlacementColumns:
    """Where it runs and what that costs (contract/placement.py): on an estimate as planned, on an
    attempt as the backend reported it."""

    provider: Mapped[str] = mapped_column(String(64))
    region: Mapped[str] = mapped_column(String(64))
    # A backend may not name the instance an attempt ran on; an estimate always does (Estimate overrides).
    instance_type: Mapped[Optional[str]] = mapped_column(String(128), nullable=True)
    gpu: Mapped[str] = mapped_column(String(64))
    gpu_count: Mapped[int] = mapped_column(Integer)                  # on each node
    num_nodes: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    spot: Mapped[bool] = mapped_column(Boolean)
    price_per_hour: Mapped[Decimal] = mapped_column(Money)           # all nodes together, USD/h


class Estimate(PlacementColumns, ExecutionColumns, Base):
    """What the planner said when the job was submitted. Inserted once, never updated."""

    __tablename__ = "estimates"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    plan_json: Mapped[str] = mapped_column(Text)        # Plan.to_json(): chosen option and alternatives
    chosen_rank: Mapped[int] = mapped_column(Integer)
    catalog_snapshot: Mapped[str] = mapped_column(String(200))
    instance_type: Mapped[str] = mapped_column(String(128))
    tokens_per_second: Mapped[float] = mapped_column(Float)
    hours: Mapped[float] = mapped_column(Float)                      # compute hours, no preemption
    preemption_overhead_hours: Mapped[float] = mapped_column(Float)
    expected_cost: Mapped[Decimal] = mapped_column(Money)
    total_tokens: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Attempt(PlacementColumns, ExecutionColumns, Base):
    __tablename__ = "attempts"
    __table_args__ = (UniqueConstraint("job_id", "n", name="uq_attempts_job_id_n"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    n: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    ended_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime, nullable=True)
    end_reason: Mapped[Optional[str]] = mapped_column(String(16), nullable=True)
    external_id: Mapped[Optional[str]] = mapped_column(Text, nullable=True)    # the backend's (local: the run dir)
    tokens: Mapped[Optional[int]] = mapped_column(BigInteger, nullable=True)   # trained in this attempt
    resumed_from_step: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    detail: Mapped[Optional[str]] = mapped_column(Text, nullable=True)
    # "training", or "controller": what the backend's own machinery (SkyPilot's jobs controller) cost
    # over the job, as attempt 0, so every sum over attempts includes it.
    kind: Mapped[str] = mapped_column(String(16), default="training", server_default="training")


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("job_id", "attempt", "step", name="uq_checkpoints_job_id_attempt_step"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    step: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    bytes: Mapped[Optional[int]] = mapped_column(BigInteger, nullable=True)
    seconds: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    # NULL until a resume loaded it (true) or skipped it as corrupt or incomplete (false).
    verified: Mapped[Optional[bool]] = mapped_column(Boolean, nullable=True)
    time: Mapped[datetime] = mapped_column(UTCDateTime)


class ProgressSample(Base):
    __tablename__ = "progress_samples"
    # The unique key is also the index for "latest step of a job or attempt"; the tokens index
    # makes an attempt's max(tokens) a seek. Both lead with job_id, so job_id needs no index of its own.
    __table_args__ = (UniqueConstraint("job_id", "attempt", "step", name="uq_progress_samples_job_id_attempt_step"),
                      Index("ix_progress_samples_job_id_attempt_tokens", "job_id", "attempt", "tokens"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer)
    step: Mapped[int] = mapped_column(Integer)
    tokens: Mapped[Optional[int]] = mapped_column(BigInteger, nullable=True)   # cumulative over the job
    loss: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    lr: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    tokens_per_second: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    time: Mapped[datetime] = mapped_column(UTCDateTime)


class RunEvent(Base):
    """The lifecycle events (start, preempted, finished, error) as the recipe wrote them.

    Keyed by the byte offset of the line in events.jsonl, so re-reading a file never duplicates.
    """

    __tablename__ = "run_events"
    # (job_id, event, offset): the latest `start` and the attempts that logged one, by seek.
    __table_args__ = (UniqueConstraint("job_id", "offset", name="uq_run_events_job_id_offset"),
                      Index("ix_run_events_job_id_event_offset", "job_id", "event", "offset"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    offset: Mapped[int] = mapped_column(BigInteger)
    attempt: Mapped[int] = mapped_column(Integer)
    event: Mapped[str] = mapped_column(String(32))
    step: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    tokens: Mapped[Optional[int]] = mapped_column(BigInteger, nullable=True)
    payload: Mapped[str] = mapped_column(Text)       # the JSON line, secrets redacted
    time: Mapped[datetime] = mapped_column(UTCDateTime)


class EventCursor(Base):
    """How far events.jsonl has been read for a job, in bytes, so ingestion resumes there."""

    __tablename__ = "event_cursors"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    path: Mapped[str] = mapped_column(Text)
    offset: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class BudgetChange(Base):
    """A job's budget raised (or removed) after launch, e.g. to continue a job stopped over budget.
    Inserted once, never updated: jobs.budget is the budget in force, these rows its history."""

    __tablename__ = "budget_changes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    time: Mapped[datetime] = mapped_column(UTCDateTime)
    old_budget: Mapped[Optional[Decimal]] = mapped_column(Money, nullable=True)
    new_budget: Mapped[Optional[Decimal]] = mapped_column(Money, nullable=True)
    spent: Mapped[Decimal] = mapped_column(Money)
    reason: Mapped[str] = mapped_column(Text)


# ---- records: what the Ledger's reads return (frozen copies, safe to keep after the session) ----
# The estimate and attempt records share the column mixins' fields, and are built by field name
# (kw_only: two dozen fields are too many to pass by position).

@dataclass(frozen=True, kw_only=True)
class PlacementFields:
    """PlacementColumns, read back."""

    provider: str
    region: str
    instance_type: Optional[str]
    gpu: str
    gpu_count: int               # on each node
    spot: bool
    price_per_hour: Decimal      # all nodes together, USD/h
    num_nodes: int = 1

    @property
    def placement(self) -> Placement:
        return Placement.of(self)


@dataclass(frozen=True, kw_only=True)
class ExecutionFields:
    """ExecutionColumns, read back: None where not known."""

    micro_batch: Optional[int] = None
    grad_accum: Optional[int] = None
    gradient_checkpointing: Optional[bool] = None
    attention: Optional[str] = None
    dtype: Optional[str] = None
    sharding: Optional[str] = None


# The execution config's fields the ledger keeps, planned (estimates) and as run (attempts).
EXECUTION_COLUMNS = tuple(f.name for f in fields(ExecutionFields))


@dataclass(frozen=True, kw_only=True)
class EstimateRecord(ExecutionFields, PlacementFields):
    plan_json: str
    chosen_rank: int
    catalog_snapshot: str
    instance_type: str           # a planned option always names its instance
    tokens_per_second: float
    hours: float
    preemption_overhead_hours: float
    expected_cost: Decimal
    total_tokens: int
    created_at: datetime

    @property
    def expected_hours(self) -> float:
        return self.hours + self.preemption_overhead_hours

    @property
    def plan(self) -> dict:
        return json.loads(self.plan_json)


@dataclass(frozen=True)
class JobRecord:
    id: str
    name: str
    model: str
    method: str
    spec_yaml: str
    spec_hash: str
    status: str
    backend: str
    budget: Optional[Decimal]
    external_id: Optional[str]
    failure_reason: Optional[str]
    created_at: datetime
    updated_at: datetime
    estimate: EstimateRecord
    run_dir: Optional[str] = None


@dataclass(frozen=True, kw_only=True)
class AttemptRecord(ExecutionFields, PlacementFields):
    n: int
    started_at: datetime
    ended_at: Optional[datetime]
    end_reason: Optional[str]
    external_id: Optional[str]
    tokens: Optional[int]
    resumed_from_step: Optional[int]
    detail: Optional[str]
    kind: str = "training"      # contract.backend.AttemptKind: "controller" is the backend's own line, attempt 0


@dataclass(frozen=True)
class CheckpointRecord:
    attempt: int
    step: int
    path: str
    bytes: Optional[int]
    seconds: Optional[float]
    verified: Optional[bool]   # None: no resume has loaded or skipped it
    time: datetime


@dataclass(frozen=True)
class SampleRecord:
    attempt: int
    step: int
    tokens: Optional[int]
    loss: Optional[float]
    lr: Optional[float]
    tokens_per_second: Optional[float]
    time: datetime


@dataclass(frozen=True)
class RunEventRecord:
    attempt: int
    event: str               # contract.events.RUN_EVENTS
    step: Optional[int]
    tokens: Optional[int]
    time: datetime
    payload: dict


@dataclass(frozen=True)
class LatestProgress:
    """The few rows a watch tick reads, however long the job has run (Ledger.latest_progress)."""

    sample: Optional[SampleRecord]                 # the latest, by (attempt, step)
    recent_tokens_per_second: tuple[float, ...]    # that attempt's latest nonzero rates, oldest first
    start: Optional[RunEventRecord]                # the latest `start` event
    started_attempts: frozenset[int]               # attempts whose recipe has logged `start`


@dataclass(frozen=True)
class BudgetChangeRecord:
    time: datetime
    old_budget: Optional[Decimal]
    new_budget: Optional[Decimal]
    spent: Decimal
    reason: str

