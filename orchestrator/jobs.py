"""Job lifecycle up to submission: choose a backend, plan for it, record the estimate, submit.

Watching a submitted job (ticks, the budget guard, re-attach, cancel) is `orchestrator/watch.py`.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import re
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from orchestrator.errors import UserError

if TYPE_CHECKING:
    from launch.base import Backend, Placement
    from orchestrator.ledger import Ledger
    from orchestrator.quote import Option, Plan
    from orchestrator.spec import JobSpec

# Looked up by name, imported only when used: `spotune --help` must not import sky or ray.
BACKENDS = {
    "local": ("launch.local", "LocalBackend"),
    "skypilot": ("launch.skypilot", "SkyPilotBackend"),
    "ray": ("launch.ray", "RayBackend"),
}
LOCAL_ONLY_OPTIONS = ("simulate_preemptions", "hard", "seed", "restart_seconds")
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
