"""Offers x node counts x spot/on-demand -> feasible -> expected cost -> ranked Plan. Pure: no I/O of its own.

Each offer yields up to two candidates per node count, its spot and its on-demand variant, ranked
side by side by expected cost, so spot is chosen exactly where its expected cost (preemptions
included) wins and the deadline still holds. With constraints.max_nodes > 1 an offer is also priced
on N of its instances (N x its price, memory sharded over N x G GPUs, speed and preemptions as
orchestrator/estimate/scaling.py and preemption.py say): more nodes are faster and cost more, so the
ranking picks the fewest that fit and meet the deadline. Everything that depends only on (GPU, GPU
count, VRAM, nodes) -- batch choice, memory, throughput, hours -- is computed once per group, not
per offer, which keeps a 10,000-offer catalog under 200 ms (bench/bench_plan.py).
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Iterable, Optional, Sequence

from contract.errors import UserError
from contract.execution import grad_accum_for
from orchestrator.estimate import Calibration, DeviceSpec, load_calibration
from orchestrator.estimate.memory import BatchChoice, MemoryEstimate, choose_batch
from orchestrator.estimate.preemption import (PreemptionOverhead, checkpoint_bytes, checkpoint_interval_hours,
                                              checkpoint_writes, preemption_overhead_hours)
from orchestrator.estimate.scaling import across_nodes
from orchestrator.estimate.throughput import ThroughputEstimate, estimate_throughput
from orchestrator.estimate.tokens import DatasetTokens, dataset_tokens, total_training_tokens
from orchestrator.architectures import ModelArch, model_tokenizer, resolve_architecture
from orchestrator.execution import PinnedExecutionError, check_pinned, execution_for, node_counts, pinned_allows
from orchestrator.constraints import check_names
from orchestrator import node_choice
from orchestrator.node_choice import NodeOutcome
from orchestrator.quote import CostLine, Interval, ManagedQuote, Offer, Option, Plan
from orchestrator.rejections import closest_miss, kept_rejections, memory_detail

KEEP_OPTIONS = 100          # options kept in a Plan (cheapest first); the count of all is in assumptions
LOCAL_PROVIDER = "local"    # plan_local's offer: this machine


class NoFeasibleOption(UserError):
    """Nothing in the catalog satisfies the spec; the message names the closest miss."""


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


class ContextTooLong(UserError):
    """seq_len past the model's context: it would be refused (or run out of memory) on the node."""


def resolve_job(spec, dataset: Optional[DatasetTokens] = None) -> Job:
    arch = resolve_architecture(spec.model)
    if arch.max_context is not None and spec.seq_len > arch.max_context:
        raise ContextTooLong(f"field 'seq_len': {spec.seq_len} is longer than model '{spec.model}' takes "
                             f"(max_position_embeddings {arch.max_context})")
    if dataset is None:
        path = spec.data_path()
        dataset = dataset_tokens(spec, model_tokenizer(spec.model) if path is not None and path.exists() else None)
    trained = total_training_tokens(spec, dataset)
    return Job(spec, arch, dataset, trained.tokens, spec.batch.global_ * spec.seq_len, trained.capped_by_max_steps,
               steps=trained.steps, blocks=trained.blocks)


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


def _allowed(offer: Offer, c) -> bool:
    if c.gpus and not any(offer.gpu.lower() == g.lower() or offer.gpu.lower().startswith(g.lower() + "-") for g in c.gpus):
        return False
    if c.providers and offer.provider.lower() not in {p.lower() for p in c.providers}:
        return False
    if c.regions and offer.region.lower() not in {r.lower() for r in c.regions}:
        return False
    return offer.gpu_count <= c.max_gpus


def _evaluate(job: Job, offers: Iterable[Offer], cal: Calibration, *, setup_hours: float,
              device_of) -> tuple[list[Candidate], list[RejectedCandidate]]:
    """(feasible, rejected) variants of offers already filtered by gpus/providers/regions/max_gpus,
    on each node count the spec allows (execution.node_counts).

    Options and Rejected (with their Decimal lines and detail text) are built afterwards, only for
    the few that are kept: this loop runs once per offer variant and node count."""
    c = job.spec.constraints
    allow_on_demand, allow_spot = c.spot != "always", c.spot != "never"
    limits = Limits.of(c)
    groups: dict = {}
    counts_of: dict = {}
    preempt_cache: dict = {}
    feasible, rejected = [], []
    add_feasible, add_rejected, miss = feasible.append, rejected.append, limits.miss

    def consider(offer: Offer, spot: bool, price: Decimal, key, g: Group, base_hours: float) -> None:
        expected_hours, preemption = base_hours, None
        if spot:
            pkey = (key, offer.provider)
            preemption = preempt_cache.get(pkey)
            if preemption is None:
                preemption = preempt_cache[pkey] = preemption_overhead_hours(
                    offer.provider, g.train_hours, g.interval_hours, cal, g.num_nodes)
            expected_hours = base_hours + preemption.hours
        cost = float(price) * expected_hours
        reason = miss(price, expected_hours, cost)
        if reason is None:
            add_feasible(Candidate(cost, expected_hours, offer, spot, price, g, base_hours, preemption))
        else:
            add_rejected(RejectedCandidate(reason, offer, spot, cost, expected_hours, g))

    for offer in offers:
        on_demand, spot_price = offer.price_on_demand, offer.price_spot
        # a missing or zero price means that market does not exist (vast lists spot 0.00)
        has_on_demand = allow_on_demand and on_demand is not None and on_demand > 0
        has_spot = allow_spot and spot_price is not None and spot_price > 0
        if not (has_on_demand or has_spot):
            continue
        device = device_of(offer)
        counts = counts_of.get(offer.gpu_count)
        if counts is None:
            counts = counts_of[offer.gpu_count] = node_counts(job.spec, offer.gpu_count)
        uneven = not counts   # the recipe would refuse the node spec: rejected, with one group for its detail
        if uneven:
            counts = (1,)
        if device is None:
            counts = counts[:1]   # no figures for this GPU: one rejection, whatever the node count
        fits, closest = False, None   # closest: the group nearest to fitting, for the rejection when none fits
        for n in counts:
            key = (device.name if device else offer.gpu, offer.gpu_count, offer.vram_gb_per_gpu, n)
            g = groups.get(key)
            if g is None:
                g = groups[key] = _group(job, device, offer.gpu_count, offer.vram_gb_per_gpu, cal, n)
            if uneven or g.choice is None:
                if closest is None or g.smallest.total < closest.smallest.total:
                    closest = g
                continue
            fits = True
            base_hours = g.train_hours + g.checkpoint_hours + setup_hours
            if has_on_demand:
                consider(offer, False, on_demand * n if n > 1 else on_demand, key, g, base_hours)
            if has_spot:
                consider(offer, True, spot_price * n if n > 1 else spot_price, key, g, base_hours)
        if not fits:
            reason = ("batch_does_not_split" if uneven else
                      "unknown_gpu" if closest.device is None else "does_not_fit_memory")
            if has_on_demand:
                add_rejected(RejectedCandidate(reason, offer, False, None, None, closest))
            if has_spot:
                add_rejected(RejectedCandidate(reason, offer, True, None, None, closest))
    return feasible, rejected


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


def _device_resolver(cal: Calibration):
    from orchestrator.catalog.specs import spec_for

    cache: dict = {}

    def device_of(offer: Offer) -> Optional[DeviceSpec]:
        key = (offer.gpu, offer.instance_type)
        if key not in cache:
            spec = spec_for(offer.gpu, offer.instance_type)
            cache[key] = cal.device(spec.name) if spec else cal.device(offer.gpu)
        return cache[key]
    return device_of


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


def make_plan(spec, offers: Sequence[Offer], managed: Sequence = (), calibration: Optional[Calibration] = None, *,
              dataset: Optional[DatasetTokens] = None, snapshot: Optional[str] = None, keep: int = KEEP_OPTIONS) -> Plan:
    """Rank every spot and on-demand variant of every allowed offer by expected cost.

    `managed`: ManagedQuotes for this job, or the catalog's ManagedPrices (priced here). `dataset`:
    the dataset's token count when the caller has it (else counted from the spec; the only I/O,
    and only for data.path). Raises NoFeasibleOption naming the closest miss when nothing fits."""
    cal = calibration or load_calibration()
    job = resolve_job(spec, dataset)
    setup_hours = cal.overheads.setup_minutes / 60
    offers = list(offers)
    check_names(spec.constraints, offers)
    check_pinned(spec, cal)
    allowed = [o for o in offers if _allowed(o, spec.constraints) and pinned_allows(o, spec.execution)]
    feasible, rejected = _evaluate(job, allowed, cal, setup_hours=setup_hours, device_of=_device_resolver(cal))
    if not feasible:
        raise NoFeasibleOption(closest_miss(job, rejected, len(allowed), cal))
    if snapshot is None:
        dates = sorted({o.read_on for o in offers if o.read_on})
        snapshot = f"prices read {dates[0]}" + (f" to {dates[-1]}" if len(dates) > 1 else "") if dates else "prices undated"
    return _build_plan(job, feasible, rejected, _managed_quotes(managed, job), cal, snapshot, setup_hours, keep,
                       nodes=True)


def explain_nodes(spec, option: Option, calibration: Optional[Calibration] = None, *,
                  dataset: Optional[DatasetTokens] = None) -> dict:
    """`assumptions.nodes` for any catalog option: why it spans the nodes it does. make_plan gives it
    for its own best; a plan cut down to what a backend launches may have another best."""
    cal = calibration or load_calibration()
    job = resolve_job(spec, dataset)
    outcomes = node_outcomes(job, option.offer, option.spot, _device_resolver(cal)(option.offer), cal,
                             cal.overheads.setup_minutes / 60)
    return node_choice.to_json(outcomes, option.num_nodes, spec, option.offer.gpu_count)


def plan_local(spec, gpu: str, gpu_count: int, price_per_hour, calibration: Optional[Calibration] = None, *,
               dataset: Optional[DatasetTokens] = None, vram_gb: Optional[float] = None, nodes: int = 1) -> Plan:
    """The same estimate for hardware you pay by the hour (this machine, a Ray cluster's nodes):
    provider `local`, no spot market, `price_per_hour` per node. No VM to provision, but a start-up
    line: process start and model build or load (`local_startup_hours`). Of up to `nodes` nodes
    (within constraints.max_nodes), the cheapest count that fits and meets the deadline, else the
    fastest that fits; the other constraints are not applied (the hardware is what it is)."""
    cal = calibration or load_calibration()
    job = resolve_job(spec, dataset)
    device = cal.device(gpu)
    if device is None:
        raise UserError(f"unknown local device '{gpu}': known are CPU and the catalog's GPU names (e.g. H100, A100-80GB, RTX4090)")
    check_pinned(spec, cal)
    pin = spec.execution
    if pin is not None and (pin.gpu.lower() != gpu.lower() or pin.gpu_count != gpu_count):
        raise PinnedExecutionError(f"execution pins {pin.gpu_count}x{pin.gpu}; this machine has {gpu_count}x{gpu}")
    if pin is not None and pin.num_nodes > nodes:
        has = "this machine is one (SkyPilot or Ray run several)" if nodes == 1 else f"the backend has {nodes}"
        raise PinnedExecutionError(f"execution pins {pin.num_nodes} nodes; {has}")
    vram = vram_gb if vram_gb is not None else device.vram_gb
    price = Decimal(str(price_per_hour))
    offer = Offer(provider=LOCAL_PROVIDER, region="this-machine", instance_type="local", gpu=gpu, gpu_count=gpu_count,
                  vram_gb_per_gpu=vram if vram is not None else 0.0, price_on_demand=price, price_spot=None,
                  source="local")
    startup = local_startup_hours(job.arch, cal)
    candidates, first = [], None
    for n in (n for n in node_counts(spec, gpu_count) if n <= nodes):
        g = _group(job, device, gpu_count, vram, cal, n, writes="local")
        first = first or g
        if g.choice is None:
            continue
        hours = g.train_hours + g.checkpoint_hours + startup
        candidates.append(Candidate(float(price * n) * hours, hours, offer, False, price * n, g, hours))
    if not candidates:
        if first is None:
            raise NoFeasibleOption(f"batch.global {spec.batch.global_} does not split evenly over {gpu_count} GPUs")
        raise NoFeasibleOption(f"does not fit this machine: {memory_detail(first, offer)}")
    deadline = spec.constraints.deadline_hours
    in_time = [c for c in candidates if deadline is None or c.expected_hours <= deadline]
    best = min(in_time, key=lambda c: (c.cost, c.expected_hours)) if in_time else min(candidates, key=lambda c: c.expected_hours)
    return _build_plan(job, [best], [], (), cal, "local price", startup, 1)


def local_startup_hours(arch: ModelArch, cal: Calibration) -> float:
    """A local run's start-up: the measured fixed seconds plus reading 16-bit weights from disk."""
    startup = cal.overheads.local_startup
    return (startup.seconds + 2 * arch.params / (startup.model_load_gb_per_s * 1e9)) / 3600


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
