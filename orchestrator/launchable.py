"""A plan cut down to what the chosen backend can launch: the others become rejections with its reason.

The planner ranks every offer the catalog lists; a backend may be unable to start some of them
(for SkyPilot: a cloud `sky check` did not enable, a feature the cloud lacks, a checkpoint store
the node could not reach; for a backend with a `max_nodes` attribute, such as the local one, an
option spanning more nodes than that). Launching one of those fails after money is spent, so the
plan a launch chooses from holds only what the backend accepts, ranked again from 1, and the rest
are listed as `not_launchable`, each with the backend's own reason.
"""
from __future__ import annotations

import math
from dataclasses import replace
from decimal import Decimal
from typing import Callable, Sequence

from contract.backend import Backend, Feasibility
from contract.placement import Placement

NOT_LAUNCHABLE = "not_launchable"
KEEP_PER_REASON = 3  # rejections shown per distinct reason (all are counted)
CHUNK = 100  # placements asked about at a time once the whole ranking is searched


def launchable_plan(spec, backend: Backend, plan, replan: Callable[[int], object], keep: int):
    """`plan` restricted to the options `backend` can launch. When that leaves fewer than `keep`
    and the planner had ranked more candidates than it kept, the plan is made again with all of
    them (`replan(n)`) and asked about in rank order, CHUNK at a time, until `keep` are found, so
    an option far down the ranking on an enabled cloud is still found."""
    verdict = _feasible(backend, spec, _placements(plan.options))
    ranked = plan.assumptions.get("feasible_options", len(plan.options))
    if len(verdict.launchable) >= keep or ranked <= len(plan.options):
        return _restrict(plan, plan.options, verdict, keep)
    plan = replan(ranked)
    launchable, rejected, checked = [], [], 0
    while checked < len(plan.options) and len(launchable) < keep:
        chunk = plan.options[checked:checked + CHUNK]
        part = _feasible(backend, spec, _placements(chunk))
        launchable.extend(part.launchable)
        rejected.extend(part.rejected)
        checked += len(chunk)
    return _restrict(plan, plan.options[:checked], Feasibility(tuple(launchable), tuple(rejected)), keep)


def _placements(options) -> list[Placement]:
    return [o.placement for o in options]


def _feasible(backend: Backend, spec, placements: Sequence[Placement]) -> Feasibility:
    """The backend's answer, after turning down what spans more nodes than it runs (its `max_nodes`;
    none: as many as the plan asks)."""
    limit = getattr(backend, "max_nodes", None)
    over = [p for p in placements if limit is not None and p.num_nodes > limit]
    if not over:
        return backend.feasible(spec, placements)
    within = [p for p in placements if p.num_nodes <= limit]
    verdict = backend.feasible(spec, within) if within else Feasibility(())
    reason = (f"the {backend.name} backend runs on {limit} node{'s' if limit != 1 else ''}; "
              f"{{}} nodes need a multi-node backend (skypilot or ray)")
    return Feasibility(verdict.launchable, verdict.rejected + tuple((p, reason.format(p.num_nodes)) for p in over))


def _restrict(plan, checked: Sequence, feasibility: Feasibility, keep: int):
    """`plan` with its `checked` options split by `feasibility`; options never checked (beyond the
    first `keep` launchable ones) are dropped, as the planner drops those beyond its own keep."""
    launchable = set(feasibility.launchable)
    if len(launchable) == len(plan.options) and not feasibility.rejected:
        return plan
    why = dict(feasibility.rejected)
    kept = [replace(o, rank=i + 1) for i, o in enumerate(o for o in checked if o.placement in launchable)][:keep]
    refused = [o for o in checked if o.placement not in launchable]
    rejected = _rejections(plan, refused, why)
    counts = dict(plan.assumptions.get("rejected_counts", {}))
    if refused:
        counts[NOT_LAUNCHABLE] = len(refused)
    assumptions = {**plan.assumptions, "feasible_options": len(kept), "rejected_counts": counts}
    if kept and plan.options and kept[0].placement != plan.options[0].placement:
        assumptions.pop("nodes", None)   # it explained the planner's best, which this backend cannot launch
    return replace(plan, options=tuple(kept), rejected=rejected, assumptions=assumptions)


def _rejections(plan, refused: Sequence, why: dict) -> tuple:
    """The planner's own rejections plus the cheapest few refused options per reason, cheapest first."""
    from orchestrator.quote import Rejected

    shown, per_reason = [], {}
    for o in refused:  # already cheapest first
        reason = why.get(o.placement, "the backend cannot launch it")
        if per_reason.get(reason, 0) < KEEP_PER_REASON:
            per_reason[reason] = per_reason.get(reason, 0) + 1
            shown.append(Rejected(o.offer, o.spot, NOT_LAUNCHABLE, reason, o.expected_cost, o.num_nodes))
    merged = list(plan.rejected) + shown
    merged.sort(key=lambda r: (r.expected_cost is None, r.expected_cost if r.expected_cost is not None else Decimal(0),
                               r.offer.price(r.spot) or math.inf))
    return tuple(merged)
