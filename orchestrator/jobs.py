"""Job lifecycle up to submission: choose a backend, plan for it, record the estimate, submit.

Watching a submitted job (ticks, the budget guard, re-attach, cancel) is `orchestrator/watch.py`.
Backends are reached only through `contract.backend`: this module asks a backend how it is
priced and what it runs on, and never which backend it is.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from contract import backend as backends
from contract.backend import Backend, BackendError, LaunchRequest
from contract.budget import PRICE_ENV
from contract.errors import UserError
from contract.faults import kill_point

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


def hourly_device(spec: "JobSpec", backend: Backend) -> tuple[str, int, Optional[float], int]:
    """(gpu, count per node, GiB per GPU, nodes) an hourly-priced backend runs on, as the planner
    names them; ('CPU', 1, None, nodes) without a GPU. `local.gpu` in the spec overrides the
    reported name. Nodes: what the backend has, within its max_nodes."""
    report = backend.device()
    limit = backend.max_nodes
    nodes = max(1, min(report.nodes, limit) if limit is not None else report.nodes)
    if spec.local.gpu:
        return spec.local.gpu, max(report.count, 1), report.vram_gib, nodes
    if report.gpu is None:
        return "CPU", 1, None, nodes
    return canonical_gpu_name(report.gpu, report.vram_gib), report.count, report.vram_gib, nodes


def hourly_price(spec: "JobSpec", price_per_hour: Optional[float]) -> Decimal:
    price = spec.local.price_per_hour if price_per_hour is None else price_per_hour
    if price < 0:
        raise JobError("--price-per-hour must be 0 or more")
    return Decimal(str(price))


def make_job_plan(spec: "JobSpec", backend: Backend, price_per_hour: Optional[float] = None,
                  calibration=None) -> "Plan":
    """The plan for running `spec` on `backend`: its own hardware at an hourly rate, or the catalog
    offers the backend can launch (orchestrator/launchable.py), the others rejected with its reason.
    `calibration`: the shipped one with the ledger's fit (orchestrator/calibrate.py), else shipped."""
    from orchestrator import planner
    from orchestrator.launchable import launchable_plan

    if backend.pricing == "hourly":
        gpu, count, gib, nodes = hourly_device(spec, backend)
        return planner.plan_local(spec, gpu, count, hourly_price(spec, price_per_hour), calibration, vram_gb=gib,
                                  nodes=nodes)
    if price_per_hour is not None:
        raise JobError(f"--price-per-hour applies to backends you pay by the hour (local, ray); "
                       f"{backend.name} prices come from the catalog")
    from orchestrator.catalog import load_managed_prices, load_offers

    offers, managed = load_offers(), load_managed_prices()
    plan = planner.make_plan(spec, offers, managed, calibration)
    with backend_errors(f"{spec.name} (plan)"):
        plan = launchable_plan(spec, backend, plan, lambda keep: planner.make_plan(spec, offers, managed, calibration,
                                                                                   keep=keep),
                               keep=planner.KEEP_OPTIONS)
    if not plan.options:  # as the planner does when nothing fits: one line, the backend's reasons first
        choose_option(plan, None)
    return plan


def check_training_input(spec: "JobSpec") -> None:
    """What the recipe would refuse on the node (exit 2), refused here before anything starts: a
    dataset file that is missing or unreadable. The spec itself, the model's architecture and the
    data's lines are checked by load_spec and the planner, which runs next."""
    from contract.files import open_regular

    path = spec.data_path()
    if path is None:
        raise JobError("missing field 'data.path': training needs a dataset file "
                       "(data.examples/data.tokens_per_example only size a plan)")
    open_regular(path, "data file").close()


def choose_option(plan: "Plan", rank: Optional[int]) -> "Option":
    if not plan.options:
        # The backend's refusals first: every option the planner found was one of them.
        reasons = sorted({(r.reason != "not_launchable", f"{r.reason}: {r.detail}") for r in plan.rejected})
        why = "; ".join(text for _, text in reasons[:3]) or "no offers match the constraints"
        raise JobError(f"no feasible option for {plan.job}: {why}")
    chosen = plan.options[0] if rank is None else next((o for o in plan.options if o.rank == rank), None)
    if chosen is None:
        raise JobError(f"no option {rank} in the plan (options 1..{len(plan.options)})")
    from orchestrator.ledger_tables import MAX_MONEY_RECORDED

    # NUMERIC(18, 6) holds under $10^12: refuse here, not with a database error once the run is set up.
    if chosen.expected_cost >= MAX_MONEY_RECORDED:
        raise JobError(f"option {chosen.rank} would cost ${chosen.expected_cost:.3e}, more than the ledger can record "
                       f"(under ${MAX_MONEY_RECORDED:.0e}): check the price, epochs and dataset size")
    return chosen


def chosen_line(plan: "Plan", chosen: "Option") -> str:
    """The option a launch runs, in one line: `spotune launch` prints it, and `spotune plan
    --backend B` prints the same line for the option that launch on B would run."""
    from orchestrator.format import usd_fine

    return (f"{plan.job}: {plan.model_name} {plan.method}, {plan.total_tokens:,} tokens · option {chosen.rank} of "
            f"{len(plan.options)}: {chosen.placement.label()} · {chosen.tokens_per_second:,.0f} tokens/s · "
            f"{chosen.expected_hours:.4f} h · expected {usd_fine(chosen.expected_cost)}")


def placements_for(plan: "Plan", chosen: "Option") -> tuple["Placement", ...]:
    """The chosen option first, then the rest in rank order: where a backend may fall back to."""
    rest = [o for o in plan.options if o.rank != chosen.rank]
    return tuple(o.placement for o in [chosen, *rest])


def launch_request(job_id: str, spec: "JobSpec", plan: "Plan", chosen: "Option", state_dir: Path) -> LaunchRequest:
    """The node spec carries the chosen option's execution config: the recipe runs what was priced.
    A backend that falls back to another placement runs it too, and the recipe checks it against
    the device it gets (a `deviation` event says what changed)."""
    return LaunchRequest(job_id=job_id, spec=spec, node_spec=spec.node_spec(execution=chosen.execution),
                         run_dir=(Path(state_dir) / "runs" / job_id).resolve(),
                         placements=placements_for(plan, chosen),
                         # The plan's $/h lets the node guard the budget with no one watching (recipes/guards.py).
                         env={"SPOTUNE_JOB_ID": job_id, PRICE_ENV: str(chosen.placement.price_per_hour)},
                         instance_prices=instance_prices())


def instance_prices() -> dict:
    """The catalog's lowest on-demand USD/h per instance type (LaunchRequest.instance_prices)."""
    from orchestrator.catalog import load_offers

    lowest: dict = {}
    for offer in load_offers():
        price = offer.price_on_demand
        if offer.instance_type and price and (offer.instance_type not in lowest or price < lowest[offer.instance_type]):
            lowest[offer.instance_type] = price
    return lowest


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
    """Record the job with its estimate and run dir, write the launch intent there, then submit.

    Write-ahead: each step is on disk before the next one starts anything, so a launch killed in any
    window leaves a job that `resume`, `cancel` and `status` can find and settle (watch.recover_launch).
    A submit that fails leaves the job recorded as failed with the backend's reason."""
    job_id = ledger.create_job(spec, Path(spec_path).read_text(), backend.name, plan, chosen.rank,
                               run_dir=lambda new_id: launch_request(new_id, spec, plan, chosen, state_dir).run_dir)
    kill_point("launch:recorded")
    request = launch_request(job_id, spec, plan, chosen, state_dir)
    write_intent(request, backend.name)
    kill_point("launch:intent-written")
    try:
        external_id = backend.submit(request)
    except BackendError as e:
        ledger.set_status(job_id, "failed", f"submit failed: {e}")
        raise JobError(f"{job_id}: submit to {backend.name} failed: {e}") from None
    kill_point("launch:submitted")
    ledger.set_external_id(job_id, external_id)
    kill_point("launch:external-id-recorded")
    if ledger.get_job(job_id).status == "cancelled":  # `spotune cancel` settled it while we were submitting
        with backend_errors(job_id):
            backend.cancel(external_id, graceful=True)
    return Submitted(job_id, external_id, request.run_dir, plan, chosen)


# --- the launch intent: what a cut-short launch was about to submit ------------------------------

INTENT_FILE = "launch.json"


def write_intent(request: LaunchRequest, backend_name: str) -> None:
    """The request as it is submitted, in the run dir before the backend starts anything (atomic)."""
    run_dir = Path(request.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    intent = {"job_id": request.job_id, "backend": backend_name, "node_spec": request.node_spec,
              "placements": [p.to_json() for p in request.placements], "env": dict(request.env), "time": time.time()}
    tmp = run_dir / f".{INTENT_FILE}.tmp"
    tmp.write_text(json.dumps(intent, indent=1))
    os.replace(tmp, run_dir / INTENT_FILE)


def read_intent(run_dir: Path) -> Optional[LaunchRequest]:
    """The request a launch wrote before submitting, or None where it never got that far."""
    from contract.placement import Placement
    from contract.spec import SpecError, parse_spec

    try:
        intent = json.loads((Path(run_dir) / INTENT_FILE).read_text())
        spec = parse_spec(intent["node_spec"])
        placements = tuple(Placement.from_json(p) for p in intent["placements"])
    except (OSError, ValueError, KeyError, TypeError, SpecError):
        return None
    return LaunchRequest(job_id=intent["job_id"], spec=spec, node_spec=intent["node_spec"], run_dir=Path(run_dir),
                         placements=placements, env=dict(intent.get("env") or {}))
