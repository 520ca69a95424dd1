"""Why the best option spans the nodes it does: its offer priced on every node count the spec allows.

More nodes shorten the run and raise its cost (orchestrator/estimate/scaling.py), so the ranking
picks the fewest nodes that fit in memory and meet the constraints. This module says so in words
(`spotune plan --explain`) and as the plan's `assumptions.nodes` (`--json`), from one outcome per
node count that the planner computes with the same estimate it ranks by (candidates.node_outcomes).
"""
from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Optional, Sequence

from orchestrator.quote import money_json

SHOW_SKIPPED = 6   # node counts that do not split the batch, named one by one up to this many


@dataclass(frozen=True)
class NodeOutcome:
    """One node count of the best option's offer (same spot or on-demand variant)."""

    num_nodes: int
    verdict: str                    # feasible, or the reason it is not (planner's REJECT_REASONS)
    hours: Optional[float] = None   # expected, preemptions included; None when it does not fit
    cost: Optional[float] = None
    price_per_hour: Optional[Decimal] = None   # all nodes
    needs_gib: Optional[float] = None          # per GPU, at the smallest configuration tried
    has_gib: Optional[float] = None


def _nodes(n: int) -> str:
    return f"{n} node{'s' if n != 1 else ''}"


def _reason(o: NodeOutcome, constraints) -> str:
    one = o.num_nodes == 1
    nodes, does, takes, costs = _nodes(o.num_nodes), "does" if one else "do", "takes" if one else "take", \
        "costs" if one else "cost"
    if o.verdict == "does_not_fit_memory":
        return f"{nodes} {does} not fit (needs {o.needs_gib:,.1f} GB per GPU, has {o.has_gib:g})"
    if o.verdict == "misses_deadline":
        return f"{nodes} {takes} {o.hours:,.1f} h, over the {constraints.deadline_hours:g} h deadline"
    if o.verdict == "over_budget":
        return f"{nodes} {costs} ${o.cost:,.2f}, over the ${constraints.budget:,.2f} budget"
    if o.verdict == "over_max_price":
        return f"{nodes} {costs} ${o.price_per_hour}/h, over max_price_per_hour ${constraints.max_price_per_hour:g}"
    return f"{nodes} {takes} {o.hours:,.1f} h for ${o.cost:,.2f}"


def skipped_counts(spec, gpu_count: int, priced: Sequence[int]) -> list[int]:
    """Node counts up to max_nodes left unpriced because batch.global does not split over their GPUs."""
    return [n for n in range(2, spec.constraints.max_nodes + 1) if n not in priced]


def why(outcomes: Sequence[NodeOutcome], chosen: int, spec, gpu_count: int) -> str:
    """'2 nodes: 1 node does not fit (needs 97.3 GB per GPU, has 80). More nodes finish sooner and cost
    more: 4 nodes take 10.2 h for $3,410.22 (+$230.10)'."""
    c = spec.constraints
    mine = next(o for o in outcomes if o.num_nodes == chosen)
    fewer = [_reason(o, c) for o in outcomes if o.num_nodes < chosen]
    text = f"{_nodes(chosen)}: " + ("; ".join(fewer) if fewer else
                                    "the fewest, and so the cheapest, that fit and meet the constraints")
    more = []
    for o in (o for o in outcomes if o.num_nodes > chosen):
        if o.verdict == "feasible":
            more.append(f"{_reason(o, c)} (+${o.cost - mine.cost:,.2f})")
        else:
            more.append(_reason(o, c))
    if more:
        text += ". More nodes finish sooner and cost more: " + "; ".join(more)
    skipped = skipped_counts(spec, gpu_count, [o.num_nodes for o in outcomes])
    if skipped:
        named = ", ".join(str(n) for n in skipped[:SHOW_SKIPPED]) + (", ..." if len(skipped) > SHOW_SKIPPED else "")
        text += (f". Not priced: {named} nodes (batch.global {spec.batch.global_} does not split evenly over "
                 f"their GPUs, {gpu_count} per node)")
    return text


def to_json(outcomes: Sequence[NodeOutcome], chosen: int, spec, gpu_count: int) -> dict:
    """The plan's `assumptions.nodes`: the best option's node count, why, and every count priced."""
    return {
        "max_nodes": spec.constraints.max_nodes,
        "chosen": chosen,
        "why": why(outcomes, chosen, spec, gpu_count),
        "by_count": [{"num_nodes": o.num_nodes, "verdict": o.verdict,
                      "expected_hours": None if o.hours is None else round(o.hours, 4),
                      "expected_cost": None if o.cost is None else money_json(Decimal(repr(round(o.cost, 6)))),
                      "price_per_hour": money_json(o.price_per_hour),
                      "needs_gb_per_gpu": None if o.needs_gib is None else round(o.needs_gib, 2)} for o in outcomes],
        "not_priced": skipped_counts(spec, gpu_count, [o.num_nodes for o in outcomes]),
    }
