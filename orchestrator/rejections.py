"""What the planner says about what it turned down: each rejection's detail, the few kept per
reason, and, when nothing is feasible, the closest miss (planner.NoFeasibleOption's message).

Reads the planner's RejectedCandidate and Group (orchestrator/candidates.py) by their fields.
"""
from __future__ import annotations

import heapq
import math
from decimal import Decimal

from orchestrator.estimate import Calibration
from orchestrator.estimate.memory import estimate_memory
from orchestrator.quote import Offer, Rejected

KEEP_REJECTED_PER_REASON = 10


def memory_detail(g, offer: Offer) -> str:
    m = g.smallest
    mode = "with" if m.gradient_checkpointing else "without"
    gpus = f"{g.num_nodes} nodes x {offer.gpu_count} GPU(s)" if g.num_nodes > 1 else f"{offer.gpu_count} GPU(s)"
    return (f"needs {m.total_gib:,.1f} GB per GPU at micro-batch {m.micro_batch} {mode} gradient checkpointing "
            f"on {gpus}; this offer has {offer.vram_gb_per_gpu:g} GB per GPU")


def where(offer: Offer, spot: bool, num_nodes: int = 1) -> str:
    nodes = f"{num_nodes} nodes x " if num_nodes > 1 else ""
    return f"{nodes}{offer.gpu_count}x {offer.gpu} {offer.provider} {offer.region} {'spot' if spot else 'on-demand'}"


def reject_detail(miss, c) -> str:
    offer = miss.offer
    if miss.reason == "batch_does_not_split":
        return f"batch.global does not split evenly over {offer.gpu_count} GPUs (every GPU trains the same micro-batches)"
    if miss.reason == "unknown_gpu":
        return f"no peak TFLOP/s for GPU '{offer.gpu}' in the GPU table"
    if miss.reason == "does_not_fit_memory":
        return memory_detail(miss.group, offer)
    if miss.reason == "over_max_price":
        n = miss.group.num_nodes
        if n > 1:
            return (f"${offer.price(miss.spot) * n}/h ({n} nodes x ${offer.price(miss.spot)}/h) is over "
                    f"max_price_per_hour ${c.max_price_per_hour:g}")
        return f"${offer.price(miss.spot)}/h is over max_price_per_hour ${c.max_price_per_hour:g}"
    if miss.reason == "misses_deadline":
        return f"expected {miss.hours:,.1f} h is over the {c.deadline_hours:g} h deadline"
    return f"expected ${miss.cost:,.2f} is over the ${c.budget:,.2f} budget"


def kept_rejections(misses: list, c) -> tuple[tuple[Rejected, ...], dict]:
    """The cheapest few rejections per reason (all counted), cheapest first."""
    by_reason: dict[str, list] = {}
    for miss in misses:
        by_reason.setdefault(miss.reason, []).append(miss)
    kept = []
    for items in by_reason.values():
        cheapest = heapq.nsmallest(
            KEEP_REJECTED_PER_REASON, items,
            key=lambda m: (m.cost if m.cost is not None else math.inf, m.offer.price(m.spot) or 0))
        for miss in cheapest:
            kept.append(Rejected(miss.offer, miss.spot, miss.reason, reject_detail(miss, c),
                                 None if miss.cost is None else Decimal(repr(round(miss.cost, 6))), miss.group.num_nodes))
    kept.sort(key=lambda r: (r.expected_cost is None, r.expected_cost or 0, r.offer.price(r.spot) or 0))
    return tuple(kept), {reason: len(items) for reason, items in sorted(by_reason.items())}


def closest_miss(job, misses: list, offers_seen: int, cal: Calibration) -> str:
    c = job.spec.constraints
    if not offers_seen:
        parts = [f"{k} {v}" for k, v in (("gpus", c.gpus), ("providers", c.providers), ("regions", c.regions)) if v]
        parts.append(f"max_gpus {c.max_gpus}, spot {c.spot}")
        if job.spec.execution is not None:
            parts.append(f"execution {job.spec.execution.gpu_count}x{job.spec.execution.gpu}")
        return f"no offer matches the constraints ({'; '.join(parts)})"
    # The later a check, the closer the miss: budget failures passed memory, price and deadline.
    for reason in ("over_budget", "misses_deadline", "over_max_price"):
        items = [m for m in misses if m.reason == reason]
        if items:
            best = min(items, key=lambda m: m.hours if reason == "misses_deadline" else m.cost)
            return (f"nothing satisfies the spec; closest miss: {where(best.offer, best.spot, best.group.num_nodes)}: "
                    f"{reject_detail(best, c)}")
    if any(m.reason == "does_not_fit_memory" for m in misses):
        arch, spec = job.arch, job.spec
        need = estimate_memory(arch, spec.method, seq_len=spec.seq_len, micro_batch=1, gradient_checkpointing=True,
                               gpu_count=1, cal=cal, lora_r=spec.lora.r, target_modules=spec.lora.target_modules,
                               lora_dropout=spec.lora.dropout)
        if spec.method != "full":  # DDP keeps the whole frozen base on every GPU: more GPUs do not help
            largest = max((m.offer for m in misses if m.reason == "does_not_fit_memory"), key=lambda o: o.vram_gb_per_gpu)
            return (f"{spec.model} {spec.method} needs {need.total_gib:,.0f} GB on each GPU (micro-batch 1, gradient "
                    f"checkpointing; data-parallel GPUs each hold the whole base model); the largest allowed GPU has "
                    f"{largest.vram_gb_per_gpu:,.0f} GB ({largest.gpu}, {largest.provider})")
        largest = max((m for m in misses if m.reason == "does_not_fit_memory"),
                      key=lambda m: m.group.num_nodes * m.offer.gpu_count * m.offer.vram_gb_per_gpu)
        o, n = largest.offer, largest.group.num_nodes
        # Sharding spreads a full fine-tune's states over every GPU: more nodes would hold it.
        hint = "; constraints.max_nodes > 1 lets it shard over several nodes" if c.max_nodes == 1 else ""
        return (f"{spec.model} {spec.method} needs {need.total_gib:,.0f} GB across GPUs (micro-batch 1, gradient "
                f"checkpointing); the largest allowed option has {n * o.gpu_count * o.vram_gb_per_gpu:,.0f} GB "
                f"({f'{n} nodes x ' if n > 1 else ''}{o.gpu_count}x {o.gpu}, {o.provider}){hint}")
    gpus = sorted({m.offer.gpu for m in misses if m.reason == "unknown_gpu"})
    if not gpus:
        counts = sorted({m.offer.gpu_count for m in misses})
        return (f"nothing satisfies the spec: batch.global {job.spec.batch.global_} does not split evenly over "
                f"{', '.join(map(str, counts))} GPUs; choose a batch.global they divide")
    return f"nothing satisfies the spec: no GPU figures for {', '.join(gpus)}"
