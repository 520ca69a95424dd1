"""The kept candidates -> Options with exact Decimal cost lines and cost intervals -> the Plan,
with its assumptions; and where a managed service stops being cheaper (break_even_tokens).

Runs only for the few candidates a plan keeps; the scan over every offer is orchestrator/planner.py.
"""
from __future__ import annotations

import heapq
from decimal import Decimal
from typing import Optional, Sequence

from orchestrator.estimate import Calibration
from orchestrator.execution import execution_for
from orchestrator import node_choice
from orchestrator.candidates import LOCAL_PROVIDER, Candidate, Job, RejectedCandidate, node_outcomes
from orchestrator.quote import CostLine, Interval, ManagedQuote, Option, Plan
from orchestrator.rejections import kept_rejections


def _amount(price: Decimal, hours: float) -> Decimal:
    return (price * Decimal(repr(hours))).quantize(Decimal("0.000001"))


def _cost_lines(job: Job, candidate: Candidate, setup_hours: float) -> tuple[CostLine, ...]:
    g, price, preemption = candidate.group, candidate.price, candidate.preemption
    tp = g.throughput
    nodes = f" ({g.num_nodes} nodes x ${candidate.offer.price(candidate.spot)}/h)" if g.num_nodes > 1 else ""
    lines = [CostLine(
        "training", _amount(price, g.train_hours),
        f"{job.total_tokens:,} tokens / {tp.tokens_per_second:,.0f} tokens/s / 3600 = {g.train_hours:.3f} h "
        f"x ${price}/h{nodes}  [{tp.formula()}]")]
    if g.checkpoint_hours:
        lines.append(CostLine("checkpoint writes", _amount(price, g.checkpoint_hours),
                              f"{g.checkpoints} x {g.checkpoint_seconds:.3g} s to write at {g.checkpoint_source} "
                              f"(one every {g.interval_hours * 60:.3g} min) "
                              f"= {g.checkpoint_hours:.4f} h x ${price}/h"))
    if setup_hours and candidate.offer.provider == LOCAL_PROVIDER:
        lines.append(CostLine("start-up", _amount(price, setup_hours),
                              f"{setup_hours * 3600:.1f} s (process start, imports, data, model build or load, "
                              f"first-step warm-up, exit) x ${price}/h"))
    elif setup_hours:
        lines.append(CostLine("setup", _amount(price, setup_hours),
                              f"{setup_hours * 60:.0f} min (provision, install, download model) x ${price}/h"))
    if candidate.spot:
        lines.append(CostLine(
            "preemption overhead (spot)", _amount(price, preemption.hours),
            f"{preemption.rate_text()} x {g.train_hours:.3f} h x ({g.interval_hours:.3f} h / 2 + "
            f"{preemption.restart_hours:.3f} h restart) = {preemption.hours:.3f} h x ${price}/h"))
    return tuple(lines)


def _managed_quotes(managed: Sequence, job: Job) -> tuple[ManagedQuote, ...]:
    """Accepts quotes already priced for this job, or the catalog's ManagedPrice list to price here."""
    items = list(managed or ())
    if items and not isinstance(items[0], ManagedQuote):
        from orchestrator.catalog import managed_quotes

        items = managed_quotes(job.arch.params, job.spec.method, job.total_tokens, prices=items)
    return tuple(sorted(items, key=lambda q: q.cost))


def _interval(job: Job, candidate: Candidate, setup_hours: float, cost: Decimal, cal: Calibration) -> Interval:
    """Training (and the preemption overhead, which scales with it) within the speed's error factor,
    setup within its own; checkpoint writes as estimated. Cost is the price times those hours."""
    g = candidate.group
    speed, source = cal.speed_uncertainty(g.device.name, job.spec.method)
    kind = "local" if candidate.offer.provider == LOCAL_PROVIDER else "cloud"
    fit = cal.setup_fits.get(kind)
    setup_error = fit.error_factor if fit is not None else (
        cal.overheads.local_startup.error_factor if kind == "local" else cal.overheads.setup_error_factor)
    scaled = g.train_hours + candidate.preemption_hours
    low = scaled / speed + g.checkpoint_hours + setup_hours / setup_error
    high = scaled * speed + g.checkpoint_hours + setup_hours * setup_error
    # Bounds from the exact cost, so the point always lies inside its own interval.
    return Interval(low, high, min(cost, _amount(candidate.price, low)), max(cost, _amount(candidate.price, high)),
                    speed, source)


def _option(rank: int, job: Job, candidate: Candidate, setup_hours: float, cal: Calibration) -> Option:
    g = candidate.group
    lines = _cost_lines(job, candidate, setup_hours)
    cost = sum((line.amount for line in lines), Decimal(0))
    return Option(rank=rank, offer=candidate.offer, spot=candidate.spot, price_per_hour=candidate.price,
                  micro_batch=g.choice.micro_batch,
                  grad_accum=g.grad_accum, gradient_checkpointing=g.choice.gradient_checkpointing,
                  tokens_per_second=g.throughput.tokens_per_second, memory_gb_per_gpu=g.choice.memory.total_gib,
                  hours=candidate.base_hours, preemption_overhead_hours=candidate.preemption_hours,
                  expected_cost=cost, lines=lines,
                  execution=execution_for(candidate.offer, g.choice, g.grad_accum, g.device.dtype, g.num_nodes),
                  interval=_interval(job, candidate, setup_hours, cost, cal))


def _build_plan(job: Job, feasible: list[Candidate], rejected: list[RejectedCandidate], managed: tuple,
                cal: Calibration, snapshot: str, setup_hours: float, keep: int, nodes: bool = False) -> Plan:
    # Only the kept few are fully sorted; ties on cost go to the shorter run, then by name.
    top = heapq.nsmallest(keep, feasible, key=lambda c: (c.cost, c.expected_hours))
    top.sort(key=lambda c: (c.cost, c.expected_hours, c.offer.provider, c.offer.region, c.offer.instance_type, c.spot))
    options = tuple(_option(i + 1, job, c, setup_hours, cal) for i, c in enumerate(top))
    kept_rejected, counts = kept_rejections(rejected, job.spec.constraints)
    assumptions = {
        "dataset": {"examples": job.dataset.examples, "tokens_per_epoch": job.dataset.tokens, "counted": job.dataset.how,
                    "train_tokens_per_epoch": job.dataset.train_tokens, "exact": job.dataset.exact,
                    "blocks_per_epoch": job.blocks, "steps": job.steps, "seq_len": job.spec.seq_len,
                    "global_batch": job.spec.batch.global_,
                    "epochs": job.spec.epochs, "validation_fraction": job.spec.data.validation_fraction,
                    "capped_by_max_steps": job.capped_by_max_steps},
        "setup_hours": setup_hours,
        "feasible_options": len(feasible),
        "rejected_counts": counts,
        "calibration": cal.assumptions(),
    }
    if nodes and top and (job.spec.constraints.max_nodes > 1 or top[0].group.num_nodes > 1):
        best = top[0]
        outcomes = node_outcomes(job, best.offer, best.spot, best.group.device, cal, setup_hours)
        assumptions["nodes"] = node_choice.to_json(outcomes, best.group.num_nodes, job.spec, best.offer.gpu_count)
    return Plan(job=job.spec.name, model_name=job.arch.name, params=job.arch.params, method=job.spec.method,
                total_tokens=job.total_tokens, options=options, rejected=kept_rejected, managed=managed,
                catalog_snapshot=snapshot, assumptions=assumptions)


def break_even_tokens(option: Option, quote: ManagedQuote, total_tokens: int, setup_hours: float) -> Optional[float]:
    """Training tokens above which the GPU option is cheaper than the managed service; None when
    the service is cheaper per token (then it wins at every size). The GPU's setup time is its
    fixed cost; everything else scales with tokens, as the managed price does."""
    if total_tokens <= 0:
        return None
    fixed = float(option.price_per_hour) * setup_hours
    gpu_per_token = (float(option.expected_cost) - fixed) / total_tokens
    managed_per_token = float(quote.price_per_million_tokens) / 1e6
    if managed_per_token <= gpu_per_token:
        return None
    return fixed / (managed_per_token - gpu_per_token)
