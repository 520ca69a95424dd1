"""What one offer costs on N nodes: the job resolved once, the estimate shared by a group of
offers (memory, batch, speed, hours, checkpoint writes), the spot and on-demand variants the scan
produces from it, and the constraints they must meet.

orchestrator/planner.py scans the catalog into these; orchestrator/plan_options.py turns the kept
few into Options and a Plan. Both import them from here, so neither imports the other's half.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Optional

from contract.execution import grad_accum_for
from orchestrator.estimate import Calibration, DeviceSpec
from orchestrator.estimate.memory import BatchChoice, MemoryEstimate, choose_batch
from orchestrator.estimate.preemption import (PreemptionOverhead, checkpoint_bytes, checkpoint_interval_hours,
                                              checkpoint_writes, preemption_overhead_hours)
from orchestrator.estimate.scaling import across_nodes
from orchestrator.estimate.throughput import ThroughputEstimate, estimate_throughput
from orchestrator.estimate.tokens import DatasetTokens
from orchestrator.architectures import ModelArch
from orchestrator.execution import node_counts
from orchestrator.node_choice import NodeOutcome
from orchestrator.quote import Offer

LOCAL_PROVIDER = "local"    # plan_local's offer: this machine


@dataclass(frozen=True)
class Job:
    """What the planner needs from the spec, resolved once."""

    spec: object
    arch: ModelArch
    dataset: DatasetTokens
    total_tokens: int
    tokens_per_step: int
    capped_by_max_steps: bool = False
    memory_memo: dict = field(default_factory=dict)   # (gpu_count, micro, checkpointing) -> MemoryEstimate
    steps: Optional[int] = None     # the recipe's total_steps, where the dataset was read
    blocks: Optional[int] = None    # packed seq_len blocks per epoch, likewise


@dataclass(frozen=True)
class Group:
    """The estimate shared by every offer with the same device, GPU count and VRAM, on `num_nodes` of them."""

    device: Optional[DeviceSpec]
    choice: Optional[BatchChoice]
    smallest: Optional[MemoryEstimate]
    throughput: Optional[ThroughputEstimate]    # all nodes together (scaling.NodesThroughput on several)
    grad_accum: int
    train_hours: float
    interval_hours: float
    checkpoints: int = 0
    checkpoint_seconds: float = 0.0
    num_nodes: int = 1
    checkpoint_source: str = ""     # the write rate and where it comes from, for the cost line

    @property
    def checkpoint_hours(self) -> float:
        return self.checkpoints * self.checkpoint_seconds / 3600


@dataclass(frozen=True, slots=True)
class Candidate:
    """One spot or on-demand variant of an offer that meets every constraint. Costs are floats for
    ranking; the few kept become Options, whose Decimal cost lines are exact."""

    cost: float
    expected_hours: float           # base_hours plus expected preemption overhead
    offer: Offer
    spot: bool
    price: Decimal                  # $/h of this variant
    group: Group
    base_hours: float               # training + checkpoint writes + setup
    preemption: Optional[PreemptionOverhead] = None    # spot only

    @property
    def preemption_hours(self) -> float:
        return self.preemption.hours if self.preemption is not None else 0.0


@dataclass(frozen=True, slots=True)
class RejectedCandidate:
    """One variant of an offer turned down, and why; cost and hours are None when it never got that far."""

    reason: str
    offer: Offer
    spot: bool
    cost: Optional[float]
    hours: Optional[float]
    group: Group


@dataclass(frozen=True)
class Limits:
    """The spec's constraints a priced candidate must meet, in the order they are checked."""

    max_price: Optional[Decimal]
    deadline: Optional[float]
    budget: Optional[float]

    @classmethod
    def of(cls, c) -> "Limits":
        return cls(Decimal(repr(c.max_price_per_hour)) if c.max_price_per_hour is not None else None,
                   c.deadline_hours, c.budget)

    def miss(self, price: Decimal, hours: float, cost: float) -> Optional[str]:
        """The first constraint missed, or None. max_price_per_hour caps the job's $/h, all its nodes."""
        if self.max_price is not None and price > self.max_price:
            return "over_max_price"
        if self.deadline is not None and hours > self.deadline:
            return "misses_deadline"
        if self.budget is not None and cost > self.budget:
            return "over_budget"
        return None


def _group(job: Job, device: Optional[DeviceSpec], gpu_count: int, vram_gb: Optional[float], cal: Calibration,
           num_nodes: int = 1, writes: str = "cloud") -> Group:
    """The estimate on `num_nodes` instances of `gpu_count` GPUs: memory and batch for the world
    size (FSDP shards over all of it, DDP replicates), speed per scaling.across_nodes."""
    spec, arch = job.spec, job.arch
    if device is None:
        return Group(None, None, None, None, 0, 0.0, 0.0, num_nodes=num_nodes)
    world = gpu_count * num_nodes
    ckpt, micro, pin = spec.train.gradient_checkpointing, spec.batch.micro, spec.execution
    if pin is not None:   # a spec's own execution section fixes both
        ckpt, micro = pin.gradient_checkpointing, pin.micro_batch
    choice, smallest = choose_batch(
        arch, spec.method, seq_len=spec.seq_len, global_batch=spec.batch.global_,
        micro=None if micro == "auto" else micro,
        checkpointing=None if ckpt == "auto" else ckpt, gpu_count=world, vram_gb=vram_gb, cal=cal,
        lora_r=spec.lora.r, target_modules=spec.lora.target_modules, lora_dropout=spec.lora.dropout,
        memo=job.memory_memo, dtype=device.dtype)
    if choice is None:
        return Group(device, None, smallest, None, 0, 0.0, 0.0, num_nodes=num_nodes)
    node = estimate_throughput(arch, spec.method, seq_len=spec.seq_len, gradient_checkpointing=choice.gradient_checkpointing,
                               device=device, gpu_count=gpu_count, cal=cal, micro_batch=choice.micro_batch)
    tp = across_nodes(node, num_nodes, cal)
    grad_accum = grad_accum_for(spec.batch.global_, choice.micro_batch, world)
    train_hours = job.total_tokens / tp.tokens_per_second / 3600
    interval = checkpoint_interval_hours(spec.checkpoint.every_minutes, spec.checkpoint.every_steps,
                                         job.tokens_per_step / tp.tokens_per_second, train_hours)
    count, seconds = checkpoint_writes(train_hours, interval,
                                       checkpoint_bytes(arch, spec.method, spec.lora.r, spec.lora.target_modules, cal), cal,
                                       writes)
    rate, source = cal.checkpoint_write(writes)   # `writes`: local disk or a cloud node, fitted apart
    return Group(device, choice, smallest, tp, grad_accum, train_hours, interval, count, seconds, num_nodes,
                 checkpoint_source=f"{rate:.3g} GB/s: {source}")


def node_outcomes(job: Job, offer: Offer, spot: bool, device: Optional[DeviceSpec], cal: Calibration,
                  setup_hours: float) -> list[NodeOutcome]:
    """One offer's variant on every node count the spec allows, judged as the ranking judges it: the
    basis of `assumptions.nodes` (orchestrator/node_choice.py)."""
    limits = Limits.of(job.spec.constraints)
    outcomes = []
    for n in node_counts(job.spec, offer.gpu_count):
        g = _group(job, device, offer.gpu_count, offer.vram_gb_per_gpu, cal, n)
        if g.choice is None:
            outcomes.append(NodeOutcome(n, "does_not_fit_memory", needs_gib=g.smallest.total_gib,
                                        has_gib=offer.vram_gb_per_gpu))
            continue
        price = offer.price(spot) * n
        hours = g.train_hours + g.checkpoint_hours + setup_hours
        if spot:
            hours += preemption_overhead_hours(offer.provider, g.train_hours, g.interval_hours, cal, n).hours
        cost = float(price) * hours
        outcomes.append(NodeOutcome(n, limits.miss(price, hours, cost) or "feasible", hours, cost, price))
    return outcomes
