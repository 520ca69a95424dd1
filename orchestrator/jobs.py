"""Job lifecycle: plan -> record the estimate -> submit -> watch -> finish.

The backend owns recovery; this module observes. Each watch tick polls the backend for the whole
attempt history and upserts it into the ledger (keyed by job and attempt number), ingests the
recipe's events.jsonl from where it stopped, and mirrors the backend's state into the job's
status. Because every write is idempotent, a CLI that died can re-attach (`resume`) from the
ledger alone (backend name + external id) and nothing is lost or counted twice.

The budget guard runs on the same tick: spent so far (Σ attempt wall hours x price) plus the
projected remaining cost (remaining tokens at the measured tokens/s x price) is compared with
`constraints.budget`, and the job is stopped with a checkpoint before it would pass it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import re
import statistics
import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from orchestrator.errors import UserError

if TYPE_CHECKING:
    from launch.base import Backend, Observation, Placement
    from orchestrator.ledger import JobRecord, Ledger, RunEventRecord, SampleRecord
    from orchestrator.plan import Option, Plan
    from orchestrator.spec import JobSpec

# Looked up by name, imported only when used: `spotune --help` must not import sky or ray.
BACKENDS = {
    "local": ("launch.local", "LocalBackend"),
    "skypilot": ("launch.skypilot", "SkyPilotBackend"),
    "ray": ("launch.ray", "RayBackend"),
}
BACKEND_TERMINAL = ("succeeded", "failed", "cancelled")
LOCAL_ONLY_OPTIONS = ("simulate_preemptions", "hard", "seed", "restart_seconds")
# Throughput for the budget projection: the median of the latest few step samples, so one slow
# step (a checkpoint, a warm-up) does not stop a job that is within budget.
THROUGHPUT_WINDOW = 5
# A backend may say how often it is worth polling (a cloud API: seconds, not a local file read).
DEFAULT_POLL_SECONDS = 1.0


class JobError(UserError):
    """A job cannot be launched, found or re-attached; one line for the user."""


@contextlib.contextmanager
def backend_errors(job_id: str):
    """A backend that cannot answer (run dir gone, cloud API down) is one line, not a traceback;
    the job itself is not touched, so `spotune resume` can try again."""
    from launch.base import BackendError

    try:
        yield
    except BackendError as e:
        raise JobError(f"{job_id}: {e}") from None


# --- backends ---------------------------------------------------------------------------------

def make_backend(name: str, state_dir: Optional[Path] = None, **options) -> "Backend":
    """The backend called `name`; remote backends keep their run copies under STATE/runs."""
    if name not in BACKENDS:
        raise JobError(f"unknown backend {name!r} (choose one of: {', '.join(BACKENDS)})")
    if name != "local":
        given = [k for k in LOCAL_ONLY_OPTIONS if options.get(k)]
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise JobError(f"{flag} only applies to --backend local")
        options = {k: v for k, v in options.items() if k not in LOCAL_ONLY_OPTIONS}
    module_name, class_name = BACKENDS[name]
    try:
        module = importlib.import_module(module_name)
        backend_class = getattr(module, class_name)
    except (ImportError, AttributeError) as e:
        raise JobError(f"backend {name!r} is not available here: {e}") from None
    if state_dir is not None and "runs_dir" in inspect.signature(backend_class).parameters:
        options["runs_dir"] = Path(state_dir) / "runs"
    return backend_class(**options)


# --- planning ---------------------------------------------------------------------------------

def canonical_gpu_name(reported: str, vram_gib: Optional[float] = None) -> str:
    """nvidia-smi's name ('NVIDIA H100 80GB HBM3') -> the catalog's ('H100')."""
    from orchestrator.catalog import gpu_specs

    squash = lambda s: re.sub(r"[^A-Z0-9]", "", s.upper())  # noqa: E731
    raw = squash(reported)
    for name in sorted(gpu_specs(), key=len, reverse=True):
        if squash(name) and squash(name) in raw:
            if name == "A100" and vram_gib and vram_gib > 45:
                return "A100-80GB"
            return name
    return reported.removeprefix("NVIDIA ").strip()


def local_device(spec: "JobSpec") -> tuple[str, int, Optional[float]]:
    """(gpu, count, GiB per GPU) of this machine as the planner names them; ('CPU', 1, None)
    without a GPU. `local.gpu` in the spec overrides the name nvidia-smi reports."""
    from launch.local import detect_gpu

    name, count, gib = detect_gpu()
    if spec.local.gpu:
        return spec.local.gpu, max(count, 1), gib
    if name is None:
        return "CPU", 1, None
    return canonical_gpu_name(name, gib), count, gib


def local_price(spec: "JobSpec", price_per_hour: Optional[float]) -> Decimal:
    price = spec.local.price_per_hour if price_per_hour is None else price_per_hour
    if price < 0:
        raise JobError("--price-per-hour must be 0 or more")
    return Decimal(str(price))


def make_job_plan(spec: "JobSpec", backend_name: str, price_per_hour: Optional[float] = None) -> "Plan":
    from orchestrator import planner

    if backend_name == "local":
        gpu, count, gib = local_device(spec)
        return planner.plan_local(spec, gpu, count, local_price(spec, price_per_hour), vram_gb=gib)
    if backend_name == "ray":
        # A Ray cluster is hardware you already have: priced at its hourly rate, not the cloud catalog.
        return planner.plan_local(spec, spec.local.gpu or "CPU", 1, local_price(spec, price_per_hour))
    if price_per_hour is not None:
        raise JobError("--price-per-hour applies to --backend local or ray (cloud prices come from the catalog)")
    from orchestrator.catalog import load_managed_prices, load_offers

    return planner.make_plan(spec, load_offers(), load_managed_prices())


def choose_option(plan: "Plan", rank: Optional[int]) -> "Option":
    if not plan.options:
        why = "; ".join(sorted({f"{r.reason}: {r.detail}" for r in plan.rejected})[:3]) or "no offers match the constraints"
        raise JobError(f"no feasible option for {plan.job}: {why}")
    if rank is None:
        return plan.options[0]
    for option in plan.options:
        if option.rank == rank:
            return option
    raise JobError(f"no option {rank} in the plan (options 1..{len(plan.options)})")


def placement_of(option: "Option") -> "Placement":
    from launch.base import Placement

    o = option.offer
    return Placement(provider=o.provider, region=o.region, gpu=o.gpu, gpu_count=o.gpu_count, spot=option.spot,
                     price_per_hour=Decimal(str(option.price_per_hour)), instance_type=o.instance_type)


def placements_for(plan: "Plan", chosen: "Option") -> tuple:
    """The chosen option first, then the rest in rank order: where a backend may fall back to."""
    rest = [o for o in plan.options if o.rank != chosen.rank]
    return tuple(placement_of(o) for o in [chosen, *rest])


# --- launch -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Submitted:
    job_id: str
    external_id: str
    run_dir: Path
    plan: "Plan"
    chosen: "Option"


def submit_job(ledger: "Ledger", spec_path: Path, spec: "JobSpec", backend: "Backend", plan: "Plan",
               chosen: "Option", state_dir: Path) -> Submitted:
    """Record the job with its estimate, then submit it. A submit that fails leaves the job
    recorded as failed with the backend's reason, never as pending forever."""
    from launch.base import BackendError, LaunchRequest

    job_id = ledger.create_job(spec, Path(spec_path).read_text(), backend.name, plan, chosen.rank)
    run_dir = (Path(state_dir) / "runs" / job_id).resolve()
    request = LaunchRequest(job_id=job_id, spec_path=Path(spec_path).resolve(), run_dir=run_dir,
                            placements=placements_for(plan, chosen), env={"SPOTUNE_JOB_ID": job_id})
    try:
        external_id = backend.submit(request)
    except BackendError as e:
        ledger.set_status(job_id, "failed", f"submit failed: {e}")
        raise JobError(f"{job_id}: submit to {backend.name} failed: {e}") from None
    ledger.set_external_id(job_id, external_id)
    return Submitted(job_id, external_id, run_dir, plan, chosen)


# --- watching ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Progress:
    """What the recipe's events say about the job as a whole."""

    step: Optional[int] = None
    total_steps: Optional[int] = None
    tokens: Optional[int] = None
    total_tokens: Optional[int] = None
    tokens_per_second: Optional[float] = None
    loss: Optional[float] = None
    started_attempts: frozenset = frozenset()   # attempts whose recipe has logged `start`


@dataclass(frozen=True)
class Tick:
    """One watch tick as the ledger now records it: what the CLI renders."""

    job: "JobRecord"
    attempts: list
    progress: Progress
    spent: Decimal
    projected: Optional[Decimal]          # spent + remaining at measured throughput
    backend_state: str = "pending"        # what the backend itself says (launch.base.JobState)
    detail: Optional[str] = None

    @property
    def done(self) -> bool:
        from orchestrator.ledger_models import TERMINAL_STATUSES

        return self.job.status in TERMINAL_STATUSES


def read_progress(samples: Sequence["SampleRecord"], run_events: Sequence["RunEventRecord"]) -> Progress:
    starts = [e for e in run_events if e.event == "start"]
    total_steps = starts[-1].payload.get("total_steps") if starts else None
    total_tokens = starts[-1].payload.get("total_tokens") if starts else None
    started = frozenset(e.attempt for e in starts)
    if not samples:
        return Progress(total_steps=total_steps, total_tokens=total_tokens, started_attempts=started)
    latest = max(samples, key=lambda s: (s.attempt, s.step))
    recent = [s.tokens_per_second for s in samples if s.attempt == latest.attempt and s.tokens_per_second]
    tps = statistics.median(recent[-THROUGHPUT_WINDOW:]) if recent else None
    return Progress(step=latest.step, total_steps=total_steps, tokens=latest.tokens, total_tokens=total_tokens,
                    tokens_per_second=tps, loss=latest.loss, started_attempts=started)


def project_cost(spent: Decimal, progress: Progress, price_per_hour: Decimal) -> Optional[Decimal]:
    if not (progress.tokens_per_second and progress.total_tokens and progress.tokens is not None):
        return None
    remaining_tokens = max(0, progress.total_tokens - progress.tokens)
    remaining_hours = Decimal(str(remaining_tokens / progress.tokens_per_second)) / Decimal(3600)
    return spent + remaining_hours * price_per_hour


class Watcher:
    """Mirrors one job's backend into the ledger, tick by tick, until it ends."""

    def __init__(self, ledger: "Ledger", job_id: str, backend: "Backend", external_id: str,
                 poll_seconds: Optional[float] = None):
        self.ledger = ledger
        self.job_id = job_id
        self.backend = backend
        self.external_id = external_id
        self.poll_seconds = poll_seconds or getattr(backend, "poll_seconds", DEFAULT_POLL_SECONDS)

    def sync(self) -> "Observation":
        """One poll, written to the ledger. Safe to repeat and to run from several processes."""
        with backend_errors(self.job_id):
            observation = self.backend.poll(self.external_id)
        stopping_for_budget = self.ledger.get_job(self.job_id).status == "over_budget"
        for attempt in observation.attempts:
            if stopping_for_budget and attempt.end_reason == "cancelled":
                attempt = dataclasses.replace(attempt, end_reason="over_budget")
            self.ledger.upsert_attempt(self.job_id, attempt)
        if observation.events_path is not None and Path(observation.events_path).exists():
            self.ledger.ingest_events(self.job_id, observation.events_path)
        self._mirror_status(observation, stopping_for_budget)
        return observation

    def _mirror_status(self, observation: "Observation", stopping_for_budget: bool) -> None:
        job = self.ledger.get_job(self.job_id)
        if stopping_for_budget and observation.state != "succeeded":
            if observation.state == "failed" and job.status != "failed":
                self.ledger.set_status(self.job_id, "failed", observation.detail)
            return  # stays over_budget while the checkpoint is written, and after
        reason = observation.detail if observation.state in ("failed", "cancelled") else None
        if job.status != observation.state:
            self.ledger.set_status(self.job_id, observation.state, reason)

    def tick(self) -> Tick:
        from orchestrator.reconcile import reconcile

        observation = self.sync()
        job = self.ledger.get_job(self.job_id)
        attempts = self.ledger.attempts(self.job_id)
        samples, run_events = self.ledger.samples(self.job_id), self.ledger.run_events(self.job_id)
        spent = reconcile(job, attempts, self.ledger.checkpoints(self.job_id), samples, run_events).actual_cost_exact
        progress = read_progress(samples, run_events)
        price = Decimal(attempts[-1].price_per_hour) if attempts else job.estimate.price_per_hour
        projected = project_cost(spent, progress, price)
        if observation.state not in BACKEND_TERMINAL and job.status != "over_budget":
            self._guard_budget(job, spent, projected)
            job = self.ledger.get_job(self.job_id)
        return Tick(job=job, attempts=attempts, progress=progress, spent=spent, projected=projected,
                    backend_state=observation.state, detail=observation.detail)

    def _guard_budget(self, job: "JobRecord", spent: Decimal, projected: Optional[Decimal]) -> None:
        if job.budget is None:
            return
        budget = Decimal(job.budget)
        worst = max(spent, projected or Decimal(0))
        if worst <= budget:
            return
        if projected is not None and projected > spent:
            reason = (f"over budget: spent ${spent:.2f} + projected remaining ${projected - spent:.2f} "
                      f"would pass the budget of ${budget:.2f}; stopped with a checkpoint")
        else:
            reason = f"over budget: spent ${spent:.2f} passes the budget of ${budget:.2f}; stopped with a checkpoint"
        # Status first: a watcher that dies right after the cancel still knows why it stopped.
        self.ledger.set_status(self.job_id, "over_budget", reason)
        with backend_errors(self.job_id):
            self.backend.cancel(self.external_id, graceful=True)

    def watch(self, on_tick: Optional[Callable[[Tick], None]] = None, timeout: Optional[float] = None) -> Tick:
        """Tick until the backend says the job ended (or `timeout` seconds pass)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            tick = self.tick()
            if on_tick is not None:
                on_tick(tick)
            # Both ended: an over-budget stop is recorded before the checkpoint is written.
            if tick.done and tick.backend_state in BACKEND_TERMINAL:
                return tick
            if deadline is not None and time.monotonic() > deadline:
                return tick
            time.sleep(self.poll_seconds)


def attach(ledger: "Ledger", job_ref: str, backend: Optional["Backend"] = None,
           poll_seconds: Optional[float] = None, state_dir: Optional[Path] = None) -> Watcher:
    """A watcher for a recorded job, rebuilt from the ledger alone (backend name + external id)."""
    job = ledger.get_job(job_ref)
    if job.external_id is None:
        raise JobError(f"job {job.id} was never submitted to {job.backend} (status {job.status}); nothing to attach to")
    return Watcher(ledger, job.id, backend or make_backend(job.backend, state_dir), job.external_id, poll_seconds)


def cancel_job(ledger: "Ledger", job_ref: str, backend: Optional["Backend"] = None, graceful: bool = True,
               wait_seconds: float = 300.0, on_tick: Optional[Callable[[Tick], None]] = None,
               state_dir: Optional[Path] = None) -> Tick:
    """Ask the backend to checkpoint and stop, then watch until it has."""
    watcher = attach(ledger, job_ref, backend, state_dir=state_dir)
    with backend_errors(watcher.job_id):
        watcher.backend.cancel(watcher.external_id, graceful=graceful)
    return watcher.watch(on_tick=on_tick, timeout=wait_seconds)
