"""Job lifecycle up to submission: choose a backend, plan for it, record the estimate, submit.

Watching a submitted job (ticks, the budget guard, re-attach, cancel) is `orchestrator/watch.py`.
Backends are reached only through `contract.backend`: this module asks a backend how it is
priced and what it runs on, and never which backend it is.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from contract import backend as backends
from contract.backend import Backend, BackendError, LaunchRequest
from contract.errors import UserError

if TYPE_CHECKING:
    from contract.placement import Placement
    from contract.spec import JobSpec
    from orchestrator.ledger import Ledger
    from orchestrator.quote import Option, Plan


class JobError(UserError):
    """A job cannot be launched, found or re-attached; one line for the user."""


@contextlib.contextmanager
def backend_errors(job_id: str):
    """A backend that cannot answer (run dir gone, cloud API down) is one line, not a traceback;
    the job itself is not touched, so `spotune resume` can try again."""
    try:
        yield
    except BackendError as e:
        raise JobError(f"{job_id}: {e}") from None


def make_backend(name: str, state_dir: Path, **options) -> Backend:
    """The backend called `name`, given only the options the user set."""
    try:
        return backends.make_backend(name, state_dir, **options)
    except BackendError as e:
        raise JobError(str(e)) from None


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


def hourly_device(spec: "JobSpec", backend: Backend) -> tuple[str, int, Optional[float]]:
    """(gpu, count, GiB per GPU) an hourly-priced backend runs on, as the planner names them;
    ('CPU', 1, None) without a GPU. `local.gpu` in the spec overrides the reported name."""
    report = backend.device()
    if spec.local.gpu:
        return spec.local.gpu, max(report.count, 1), report.vram_gib
    if report.gpu is None:
        return "CPU", 1, None
    return canonical_gpu_name(report.gpu, report.vram_gib), report.count, report.vram_gib


def hourly_price(spec: "JobSpec", price_per_hour: Optional[float]) -> Decimal:
    price = spec.local.price_per_hour if price_per_hour is None else price_per_hour
    if price < 0:
        raise JobError("--price-per-hour must be 0 or more")
    return Decimal(str(price))


def make_job_plan(spec: "JobSpec", backend: Backend, price_per_hour: Optional[float] = None) -> "Plan":
    """The plan for running `spec` on `backend`: its own hardware at an hourly rate, or the catalog."""
    from orchestrator import planner

    if backend.pricing == "hourly":
        gpu, count, gib = hourly_device(spec, backend)
        return planner.plan_local(spec, gpu, count, hourly_price(spec, price_per_hour), vram_gb=gib)
    if price_per_hour is not None:
        raise JobError(f"--price-per-hour applies to backends you pay by the hour (local, ray); "
                       f"{backend.name} prices come from the catalog")
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


def placements_for(plan: "Plan", chosen: "Option") -> tuple["Placement", ...]:
    """The chosen option first, then the rest in rank order: where a backend may fall back to."""
    rest = [o for o in plan.options if o.rank != chosen.rank]
    return tuple(o.placement for o in [chosen, *rest])


def launch_request(job_id: str, spec: "JobSpec", plan: "Plan", chosen: "Option", state_dir: Path) -> LaunchRequest:
    return LaunchRequest(job_id=job_id, spec=spec, node_spec=spec.node_spec(),
                         run_dir=(Path(state_dir) / "runs" / job_id).resolve(),
                         placements=placements_for(plan, chosen), env={"SPOTUNE_JOB_ID": job_id})


def dry_run(spec: "JobSpec", backend: Backend, plan: "Plan", chosen: "Option", state_dir: Path) -> str:
    """What submit would do, in the backend's words; writes nothing."""
    with backend_errors(f"{spec.name} (dry run)"):
        return backend.describe(launch_request(f"{spec.name}-dry-run", spec, plan, chosen, state_dir))


# --- launch -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Submitted:
    job_id: str
    external_id: str
    run_dir: Path
    plan: "Plan"
    chosen: "Option"


def submit_job(ledger: "Ledger", spec_path: Path, spec: "JobSpec", backend: Backend, plan: "Plan",
               chosen: "Option", state_dir: Path) -> Submitted:
    """Record the job with its estimate, then submit it. A submit that fails leaves the job
    recorded as failed with the backend's reason, never as pending forever."""
    job_id = ledger.create_job(spec, Path(spec_path).read_text(), backend.name, plan, chosen.rank)
    request = launch_request(job_id, spec, plan, chosen, state_dir)
    try:
        external_id = backend.submit(request)
    except BackendError as e:
        ledger.set_status(job_id, "failed", f"submit failed: {e}")
        raise JobError(f"{job_id}: submit to {backend.name} failed: {e}") from None
    ledger.set_external_id(job_id, external_id)
    return Submitted(job_id, external_id, request.run_dir, plan, chosen)
