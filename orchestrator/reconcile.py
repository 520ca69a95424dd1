"""Actual spend against the estimate, and why they differ.

Actual cost = Σ over attempts of wall hours × that attempt's $/h (an open attempt counts up to
`now`), in Decimal, rounded to the cent once at the end: reproducible from the attempts table.

Variance = actual − estimate, split into four parts, with P0 the planned $/h, h_i and P_i each
attempt's wall hours and $/h, H0 the planned compute hours and O0 the planned preemption overhead:

  price       = Σ (P_i − P0) · h_i              paid another $/h than planned
  preemption  = P0 · (lost hours − O0)          rework since the last checkpoint + restart time
  throughput  = P0 · (productive hours − H0)    trained at another speed than planned
                + (P0 · (H0 + O0) − estimate)   (zero unless the estimate has lines beyond GPU hours)

  controller  = what the backend's own machinery cost (SkyPilot's jobs controller: its attempt-like
                lines of kind "controller"), which no estimate plans

productive = total − lost, so the parts add up to the total exactly. In cents, total is
actual¢ − estimate¢ and each part goes to its cent floor or ceiling (`quote.round_parts`), so the
printed parts add up to the printed total and none shows a sign against its explanation (a
remainder could: +$0.01 throughput for a run that beat its planned time). `exact` has the same
figures in micro-dollars for --json: each attempt billed to the micro-dollar, actual their sum.

Lost hours come from events, never guesses: for every attempt after the first, the time from its
start to its first training step (restart); for an attempt that ended preempted or failed, the time
from its last checkpoint that a resume did not skip (or first step, if it has none) to its end (rework). The first
attempt's start-up is not lost to preemption: the job pays it once either way.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import ROUND_HALF_UP, Decimal, localcontext
from typing import TYPE_CHECKING, Optional, Sequence

from orchestrator.format import per_hour, usd, usd_signed
from orchestrator.quote import CENT, MICRO, money, round_parts

if TYPE_CHECKING:
    from orchestrator.ledger import (AttemptRecord, CheckpointRecord, JobRecord, Ledger, RunEventRecord,
                                     SampleRecord)

INTERRUPTED = ("preempted", "failed")
_US_PER_HOUR = Decimal(3_600_000_000)
_PRECISION = 50  # digits: ample for exact sums of products of 6-decimal prices and µs-exact hours


def _elapsed_hours(start: datetime, end: datetime) -> Decimal:
    delta = end - start
    micros = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    return max(Decimal(0), Decimal(micros) / _US_PER_HOUR)


def billed(a: "AttemptRecord", now: datetime) -> tuple[Decimal, Decimal]:
    """An attempt's wall hours (an open one up to `now`) and their cost at its $/h, unrounded."""
    hours = _elapsed_hours(a.started_at, a.ended_at or max(now, a.started_at))
    return hours, hours * Decimal(a.price_per_hour)


def is_controller(a: "AttemptRecord") -> bool:
    """A line for the backend's own machinery (contract.backend.AttemptKind), not an attempt at training."""
    return getattr(a, "kind", "training") == "controller"


def spend(attempts: Sequence["AttemptRecord"], now: Optional[datetime] = None) -> Decimal:
    """Actual cost so far, exact: what `reconcile` reports as actual_cost_exact. It needs the
    attempts alone, so a watch tick or a table of every job can afford it."""
    now = now or datetime.now(timezone.utc)
    with localcontext() as ctx:
        ctx.prec = _PRECISION
        return sum((billed(a, now)[1] for a in attempts), Decimal(0))


@dataclass(frozen=True)
class AttemptCost:
    n: int
    price_per_hour: Decimal
    hours: Decimal          # wall hours billed
    cost: Decimal           # hours × price, unrounded
    restart_hours: Decimal  # start → first step, for attempts after the first
    rework_hours: Decimal   # last checkpoint → end, for preempted/failed attempts
    open: bool

    @property
    def lost_hours(self) -> Decimal:
        return min(self.hours, self.restart_hours + self.rework_hours)

    @property
    def billed(self) -> Decimal:
        """The cost as the ledger accounts it, to the micro-dollar: attempts add up to the job's actual."""
        return self.cost.quantize(MICRO, rounding=ROUND_HALF_UP)


@dataclass(frozen=True)
class ExactVariance:
    """The reconciliation in micro-dollars, as `--json` gives it: actual is the sum of the attempts'
    billed amounts (and the controller's), variance = actual - estimate, and the parts add up to it
    exactly, each with the sign of its exact value (`quote.round_parts`)."""

    estimate: Decimal
    actual: Decimal
    variance: Decimal
    price: Decimal
    throughput: Decimal
    preemption: Decimal
    controller: Decimal


@dataclass(frozen=True)
class Reconciliation:
    job_id: str
    estimate_cost: Decimal             # cents
    estimate_hours: float              # compute + planned preemption overhead
    estimate_compute_hours: float
    estimate_overhead_hours: float
    estimate_price_per_hour: Decimal
    estimate_tokens_per_second: float
    actual_cost: Decimal               # cents
    actual_cost_exact: Decimal
    actual_hours: Decimal
    lost_hours: Decimal
    tokens: Optional[int]              # cumulative tokens trained (from the last event)
    tokens_per_second: Optional[float]  # mean of the recipe's measured step throughput
    variance: Decimal                  # cents; = price + throughput + preemption + controller
    price: Decimal
    throughput: Decimal
    preemption: Decimal
    attempts: tuple[AttemptCost, ...]
    preemptions: int
    open: bool                         # an attempt is still running: actual counts up to `now`
    measured: bool = True              # training steps were recorded, so lost time is known
    controller: Decimal = Decimal(0)   # cents: the backend's jobs controller over this job, unplanned
    controller_hours: Decimal = Decimal(0)
    controller_cost_exact: Decimal = Decimal(0)
    exact: Optional[ExactVariance] = None   # the same figures in micro-dollars, for --json

    @property
    def productive_hours(self) -> Decimal:
        return self.actual_hours - self.lost_hours

    @property
    def variance_percent(self) -> Optional[float]:
        """From the exact amounts, never from rounded cents."""
        if self.exact is not None:
            return None if not self.exact.estimate else float(self.exact.variance / self.exact.estimate * 100)
        if self.estimate_cost == 0:
            return None
        return float(self.variance / self.estimate_cost * 100)

    def story(self) -> str:
        """The variance in one sentence a person can check against the tables."""
        pct = self.variance_percent
        head = f"cost {usd(self.actual_cost)} vs {usd(self.estimate_cost)} estimated"
        head += f" ({pct:+.1f}%)" if pct is not None else ""
        if self.open:
            head = "so far " + head
        price_why = ", ".join(sorted({per_hour(a.price_per_hour) for a in self.attempts})) or "no attempts"
        tps = f"{self.tokens_per_second:,.0f} tokens/s" if self.tokens_per_second is not None else "no throughput measured"
        return (f"{head}: {usd_signed(self.price)} price (ran at {price_why} vs {per_hour(self.estimate_price_per_hour)} planned), "
                f"{usd_signed(self.throughput)} throughput ({float(self.productive_hours):.3f} h productive vs "
                f"{self.estimate_compute_hours:.3f} h planned, start-up included; {tps} vs "
                f"{self.estimate_tokens_per_second:,.0f} planned), "
                f"{usd_signed(self.preemption)} preemption ({self.preemptions} preemption{'s' if self.preemptions != 1 else ''}, "
                f"{float(self.lost_hours):.3f} h lost vs {self.estimate_overhead_hours:.3f} h planned)"
                + (f", {usd_signed(self.controller)} jobs controller ({float(self.controller_hours):.3f} h, "
                   f"not in the estimate)" if self.controller_hours else "")
                + ("" if self.measured or not self.attempts else
                   "; no training events recorded, so time lost to preemption shows as throughput"))


def reconcile(job: "JobRecord", attempts: Sequence["AttemptRecord"], checkpoints: Sequence["CheckpointRecord"],
              samples: Sequence["SampleRecord"], run_events: Sequence["RunEventRecord"] = (),
              now: Optional[datetime] = None) -> Reconciliation:
    now = now or datetime.now(timezone.utc)
    est = job.estimate
    with localcontext() as ctx:
        ctx.prec = _PRECISION
        controller_lines = [a for a in attempts if is_controller(a)]
        attempts = [a for a in attempts if not is_controller(a)]
        first_n = min((a.n for a in attempts), default=None)
        # Without a single training step on record (events never copied back, or none written yet)
        # lost time cannot be told from slow time: it all shows as throughput, and the story says so.
        measured = bool(samples)
        costs = tuple(_attempt_cost(a, a.n == first_n, checkpoints, samples, now, measured) for a in attempts)
        p0 = Decimal(est.price_per_hour)
        o0 = Decimal(str(est.preemption_overhead_hours))  # throughput, the remainder, carries the planned hours
        estimate_exact = Decimal(est.expected_cost)
        controller_exact = spend(controller_lines, now)
        controller_hours = sum((_elapsed_hours(a.started_at, a.ended_at or max(now, a.started_at))
                                for a in controller_lines), Decimal(0))
        actual_exact = spend(attempts, now) + controller_exact
        hours = sum((c.hours for c in costs), Decimal(0))
        lost = sum((c.lost_hours for c in costs), Decimal(0))
        price_exact = sum(((c.price_per_hour - p0) * c.hours for c in costs), Decimal(0))
        preemption_exact = p0 * (lost - o0)
        actual_cost, estimate_cost = money(actual_exact), money(estimate_exact)
        variance = actual_cost - estimate_cost
        throughput_exact = actual_exact - estimate_exact - price_exact - preemption_exact - controller_exact
        # Each part rounds to its floor or ceiling so the parts add up to the rounded total and keep
        # their exact sign (a remainder could come out +$0.01 for a run that beat its speed).
        price, throughput, preemption, controller = round_parts(
            [price_exact, throughput_exact, preemption_exact, controller_exact], variance, CENT)
        billed = sum((c.billed for c in costs), Decimal(0)) + controller_exact.quantize(MICRO, rounding=ROUND_HALF_UP)
        # The attempts' micro-dollar rounding (half a micro-dollar each at most) rides with throughput.
        exact_parts = round_parts([price_exact, throughput_exact + (billed - actual_exact), preemption_exact,
                                   controller_exact], billed - estimate_exact, MICRO)
        exact = ExactVariance(estimate_exact, billed, billed - estimate_exact, *exact_parts)

    rates = [s.tokens_per_second for s in samples if s.tokens_per_second is not None]
    finished = [e.tokens for e in run_events if e.event == "finished" and e.tokens is not None]
    sample_tokens = [s.tokens for s in samples if s.tokens is not None]
    tokens = finished[-1] if finished else (max(sample_tokens) if sample_tokens else None)
    return Reconciliation(
        job_id=job.id, estimate_cost=estimate_cost, estimate_hours=est.expected_hours,
        estimate_compute_hours=est.hours, estimate_overhead_hours=est.preemption_overhead_hours,
        estimate_price_per_hour=p0, estimate_tokens_per_second=est.tokens_per_second,
        actual_cost=actual_cost, actual_cost_exact=actual_exact, actual_hours=hours, lost_hours=lost,
        tokens=tokens, tokens_per_second=sum(rates) / len(rates) if rates else None,
        variance=variance, price=price, throughput=throughput, preemption=preemption, attempts=costs,
        preemptions=sum(1 for a in attempts if a.end_reason == "preempted"),
        open=any(c.open for c in costs) or any(a.ended_at is None for a in controller_lines), measured=measured,
        controller=controller,
        controller_hours=controller_hours,
        controller_cost_exact=controller_exact, exact=exact)


def _attempt_cost(a: "AttemptRecord", is_first: bool, checkpoints, samples, now: datetime,
                  measured: bool) -> AttemptCost:
    end = a.ended_at or max(now, a.started_at)
    hours, cost = billed(a, now)
    if not measured:
        return AttemptCost(n=a.n, price_per_hour=Decimal(a.price_per_hour), hours=hours,
                           cost=cost, restart_hours=Decimal(0),
                           rework_hours=Decimal(0), open=a.ended_at is None)
    # Events belong to the attempt whose billed window they fall in: that holds whatever attempt
    # number the recipe was told, and windows never overlap.
    steps = [s.time for s in samples if a.started_at <= s.time <= end]
    first_step = min(steps) if steps else None
    restart = Decimal(0)
    if not is_first:
        restart = _elapsed_hours(a.started_at, first_step or end)
    rework = Decimal(0)
    if a.end_reason in INTERRUPTED:
        if first_step is None:
            rework = hours if is_first else Decimal(0)  # later attempts: already all restart
        else:
            # A checkpoint a later resume skipped (corrupt, incomplete) saved nothing: its steps are rework.
            saved = [c.time for c in checkpoints if first_step <= c.time <= end and c.verified is not False]
            rework = _elapsed_hours(max(saved) if saved else first_step, end)
    return AttemptCost(n=a.n, price_per_hour=Decimal(a.price_per_hour), hours=hours,
                       cost=cost, restart_hours=restart, rework_hours=rework,
                       open=a.ended_at is None)


def reconcile_job(ledger: "Ledger", job_id: str, now: Optional[datetime] = None) -> Reconciliation:
    job = ledger.get_job(job_id)
    return reconcile(job, ledger.attempts(job.id), ledger.checkpoints(job.id), ledger.samples(job.id),
                     ledger.run_events(job.id), now=now)
