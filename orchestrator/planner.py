"""Offers x node counts x spot/on-demand -> feasible -> expected cost -> ranked Plan. Pure: no I/O of its own.

Each offer yields up to two candidates per node count, its spot and its on-demand variant, ranked
side by side by expected cost, so spot is chosen exactly where its expected cost (preemptions
included) wins and the deadline still holds. With constraints.max_nodes > 1 an offer is also priced
on N of its instances (N x its price, memory sharded over N x G GPUs, speed and preemptions as
orchestrator/estimate/scaling.py and preemption.py say): more nodes are faster and cost more, so the
ranking picks the fewest that fit and meet the deadline. Everything that depends only on (GPU, GPU
count, VRAM, nodes) -- batch choice, memory, throughput, hours -- is computed once per group, not
per offer, which keeps a 10,000-offer catalog under 200 ms (bench/bench_plan.py).

This module is the scan over offers and the entry points; the value types it produces and the
per-group estimate are orchestrator/candidates.py; the kept few become Options and a Plan in
orchestrator/plan_options.py.
"""
from __future__ import annotations

from decimal import Decimal
from typing import Iterable, Optional, Sequence

from contract.errors import UserError
from orchestrator.estimate import Calibration, DeviceSpec, load_calibration
from orchestrator.estimate.preemption import preemption_overhead_hours
from orchestrator.estimate.tokens import DatasetTokens, dataset_tokens, total_training_tokens
from orchestrator.architectures import ModelArch, model_tokenizer, resolve_architecture
from orchestrator.execution import PinnedExecutionError, check_pinned, node_counts, pinned_allows
from orchestrator.constraints import check_names
from orchestrator import node_choice
from orchestrator.candidates import (LOCAL_PROVIDER, Candidate, Group, Job, Limits, RejectedCandidate,
                                     _group, node_outcomes)
# break_even_tokens is re-exported: callers (orchestrator/commands/plan.py, tests) import it from here.
from orchestrator.plan_options import _build_plan, _managed_quotes, break_even_tokens  # noqa: F401
from orchestrator.quote import Offer, Option, Plan
from orchestrator.rejections import closest_miss, memory_detail

KEEP_OPTIONS = 100          # options kept in a Plan (cheapest first); the count of all is in assumptions


class NoFeasibleOption(UserError):
    """Nothing in the catalog satisfies the spec; the message names the closest miss."""


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
