"""Builders shared by the ledger, reconcile and ledger CLI tests: real quote.py / contract objects."""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

from contract.backend import ObservedAttempt
from contract.placement import Placement
from orchestrator.quote import Offer, Option, Plan
from contract.spec import parse_spec

T0 = datetime(2026, 11, 20, 9, 0, tzinfo=timezone.utc)


def make_spec(name: str = "demo", method: str = "lora", budget: float | None = None):
    raw = {"name": name, "model": "tiny-llama", "method": method,
           "data": {"examples": 100, "tokens_per_example": 128}}
    if budget is not None:
        raw["constraints"] = {"budget": budget}
    return parse_spec(raw)


def spec_yaml(name: str = "demo", method: str = "lora") -> str:
    return f"name: {name}\nmodel: tiny-llama\nmethod: {method}\ndata:\n  examples: 100\n  tokens_per_example: 128\n"


def make_offer(provider="aws", region="us-east-1", gpu="A10G", gpu_count=1, spot_price="0.3621",
               on_demand="1.006") -> Offer:
    return Offer(provider, region, f"{gpu.lower()}.{gpu_count}x", gpu, gpu_count, 24.0,
                 Decimal(on_demand), Decimal(spot_price), read_on="2026-11-22")


def make_option(rank=1, offer=None, spot=True, price="0.3621", tokens_per_second=1000.0, hours=1.0,
                overhead=0.1, expected_cost=None) -> Option:
    offer = offer or make_offer(spot_price=price)
    price = Decimal(price)
    if expected_cost is None:
        expected_cost = price * (Decimal(str(hours)) + Decimal(str(overhead)))
    return Option(rank=rank, offer=offer, spot=spot, price_per_hour=price, micro_batch=4, grad_accum=8,
                  gradient_checkpointing=False, tokens_per_second=tokens_per_second, memory_gb_per_gpu=10.0,
                  hours=hours, preemption_overhead_hours=overhead, expected_cost=Decimal(expected_cost))


def make_plan(*options: Option, job="demo", method="lora", total_tokens=3_600_000) -> Plan:
    options = options or (make_option(),)
    return Plan(job=job, model_name="tiny-llama", params=1_000_000, method=method, total_tokens=total_tokens,
                options=tuple(options), rejected=(), managed=(), catalog_snapshot="bundled 2026-11-22")


def placement(provider="aws", region="us-east-1", gpu="A10G", gpu_count=1, spot=True, price="0.3621") -> Placement:
    return Placement(provider=provider, region=region, gpu=gpu, gpu_count=gpu_count, spot=spot,
                     price_per_hour=Decimal(price))


def observed(n=1, start_min=0.0, end_min=None, end_reason=None, price="0.3621", detail=None, **where) -> ObservedAttempt:
    return ObservedAttempt(n=n, placement=placement(price=price, **where), started_at=at(start_min),
                           ended_at=None if end_min is None else at(end_min), end_reason=end_reason,
                           external_id=f"ext-{n}", detail=detail)


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def event(kind: str, minutes: float, attempt: int, **fields) -> dict:
    return {"event": kind, "time": at(minutes).timestamp(), "attempt": attempt, **fields}


def write_events(path: Path, events: list[dict], mode: str = "a") -> None:
    with path.open(mode) as f:
        for ev in events:
            f.write(json.dumps(ev) + "\n")


def hand_example(ledger, tmp_path, name="demo"):
    """Planned: $2.00/h spot, 1.0 compute hour + 0.1 h preemption overhead = $2.20.

    Attempt 1: $2.00/h, 0-36 min, first step at 4 min, last checkpoint at 30 min, preempted.
    Attempt 2: $2.50/h (another region), 40-88 min, first step at 46 min, finished.
      actual      = 2.00 x 0.6 h + 2.50 x 0.8 h                  = $3.20   variance +$1.00
      price       = (2.00-2.00) x 0.6 + (2.50-2.00) x 0.8        = +$0.40
      lost        = rework 36-30 min (0.1 h) + restart 40-46 min (0.1 h) = 0.2 h
      preemption  = 2.00 x (0.2 - 0.1)                           = +$0.20
      throughput  = 2.00 x ((1.4 - 0.2) - 1.0)                   = +$0.40
    """
    plan = make_plan(make_option(price="2.00", hours=1.0, overhead=0.1, tokens_per_second=1000.0))
    job_id = ledger.create_job(make_spec(name), spec_yaml(name), "local", plan, 1)
    ledger.upsert_attempt(job_id, observed(1, 0, 36, "preempted", price="2.00"))
    ledger.upsert_attempt(job_id, observed(2, 40, 88, "finished", price="2.50", region="us-west-2"))
    events = tmp_path / f"{job_id}.events.jsonl"
    write_events(events, [
        event("start", 1, 1, resumed_from_step=None),
        *[event("step", 3 + s, 1, step=s, tokens=1000 * s, loss=2.0, lr=1e-4, tokens_per_second=800.0) for s in range(1, 33)],
        event("checkpoint", 30, 1, step=27, path="checkpoints/step-27", seconds=2.0, bytes=100),
        event("preempted", 35.5, 1, step=32, signal="SIGTERM"),
        event("start", 44, 2, resumed_from_step=27),
        *[event("step", 46 + s - 28, 2, step=s, tokens=1000 * s, loss=1.8, lr=1e-4, tokens_per_second=1200.0) for s in range(28, 70)],
        event("finished", 87.5, 2, step=69, tokens=69_000, final_loss=1.7, train_seconds=3000.0, output_path="output"),
    ])
    ledger.ingest_events(job_id, events)
    return job_id
