"""Value objects shared by the catalog, the planner, the ledger and the backends.

Prices are Decimal, parsed exactly from the catalog text, so a ledger row can be traced back
to the catalog line it came from. Estimates (tokens/s, hours) are floats: they are models.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Optional

from contract.placement import Placement

CENT = Decimal("0.01")


def money(x) -> Decimal:
    """Round to cents (banker's rounding is wrong for invoices: round half up)."""
    from decimal import ROUND_HALF_UP

    return Decimal(str(x)).quantize(CENT, rounding=ROUND_HALF_UP)


@dataclass(frozen=True)
class Offer:
    """One rentable instance type in one place: the unit the planner ranks."""

    provider: str                 # aws, gcp, azure, lambda, runpod, vast, nebius, verda, ...
    region: str
    instance_type: str
    gpu: str                      # SkyPilot's canonical accelerator name: H100, A100-80GB, L40S, ...
    gpu_count: int
    vram_gb_per_gpu: float
    price_on_demand: Optional[Decimal]  # whole instance, USD/h; None where not offered
    price_spot: Optional[Decimal]       # whole instance, USD/h; None where there is no spot market
    zone: Optional[str] = None
    source: str = "bundled"       # "bundled" or the path of the SkyPilot vms.csv it came from
    read_on: Optional[str] = None  # ISO date the price was read
    # The instance's host shape, as SkyPilot's catalog lists it (vCPUs, MemoryGiB): SkyPilot
    # needs both to launch an instance type. None where the source does not give them.
    vcpus: Optional[float] = None
    memory_gib: Optional[float] = None

    def price(self, spot: bool) -> Optional[Decimal]:
        return self.price_spot if spot else self.price_on_demand


@dataclass(frozen=True)
class CostLine:
    """One checkable line of a quote (Infracost style): what, how much, and the arithmetic."""

    item: str
    amount: Decimal
    formula: str


@dataclass(frozen=True)
class Option:
    """A feasible way to run the job: an offer, spot or not, with its estimate."""

    rank: int
    offer: Offer
    spot: bool
    price_per_hour: Decimal       # whole instance
    micro_batch: int
    grad_accum: int
    gradient_checkpointing: bool
    tokens_per_second: float      # whole instance
    memory_gb_per_gpu: float
    hours: float                  # compute hours with no preemption
    preemption_overhead_hours: float
    expected_cost: Decimal
    lines: tuple[CostLine, ...] = ()

    @property
    def expected_hours(self) -> float:
        return self.hours + self.preemption_overhead_hours

    @property
    def placement(self) -> Placement:
        o = self.offer
        return Placement(provider=o.provider, region=o.region, gpu=o.gpu, gpu_count=o.gpu_count, spot=self.spot,
                         price_per_hour=self.price_per_hour, instance_type=o.instance_type)

    def to_json(self) -> dict:
        o = self.offer
        return {
            "rank": self.rank,
            "provider": o.provider,
            "region": o.region,
            "instance_type": o.instance_type,
            "gpu": o.gpu,
            "gpu_count": o.gpu_count,
            "spot": self.spot,
            "price_per_hour": float(self.price_per_hour),
            "tokens_per_second": round(self.tokens_per_second, 1),
            "memory_gb_per_gpu": round(self.memory_gb_per_gpu, 2),
            "micro_batch": self.micro_batch,
            "gradient_checkpointing": self.gradient_checkpointing,
            "hours": round(self.hours, 4),
            "preemption_overhead_hours": round(self.preemption_overhead_hours, 4),
            "expected_cost": float(money(self.expected_cost)),
            "grad_accum": self.grad_accum,
            "expected_hours": round(self.expected_hours, 4),
            "lines": [{"item": l.item, "amount": float(l.amount), "formula": l.formula} for l in self.lines],
        }


@dataclass(frozen=True)
class Rejected:
    offer: Offer
    spot: bool
    reason: str                   # one of REJECT_REASONS
    detail: str                   # "needs 1,130 GB across GPUs; this offer has 640 GB"
    expected_cost: Optional[Decimal] = None  # where it could be computed: to sort "cheapest rejected"

    def to_json(self) -> dict:
        o = self.offer
        return {"provider": o.provider, "region": o.region, "gpu": o.gpu, "gpu_count": o.gpu_count,
                "spot": self.spot, "reason": self.reason, "detail": self.detail}


REJECT_REASONS = ("does_not_fit_memory", "over_max_price", "misses_deadline", "over_budget", "no_spot_market",
                  "unknown_gpu")


@dataclass(frozen=True)
class ManagedQuote:
    """A managed fine-tuning API priced on the same job, for comparison."""

    service: str
    model: str                    # the service's model tier the job maps to
    price_per_million_tokens: Decimal
    cost: Decimal
    note: str = ""                # e.g. OpenAI's 2026 wind-down

    def to_json(self) -> dict:
        return {"service": self.service, "model": self.model,
                "price_per_million_tokens": float(self.price_per_million_tokens),
                "cost": float(money(self.cost)), "note": self.note}


@dataclass(frozen=True)
class Plan:
    job: str
    model_name: str
    params: int
    method: str
    total_tokens: int
    options: tuple[Option, ...]
    rejected: tuple[Rejected, ...]
    managed: tuple[ManagedQuote, ...]
    catalog_snapshot: str         # the date(s) of the prices used, e.g. "bundled 2026-11-22"
    assumptions: dict = field(default_factory=dict)  # calibration and preemption figures used

    @property
    def best(self) -> Optional[Option]:
        return self.options[0] if self.options else None

    def to_json(self) -> dict:
        return {
            "job": self.job,
            "model": {"name": self.model_name, "params": self.params},
            "method": self.method,
            "total_tokens": self.total_tokens,
            "catalog_snapshot": self.catalog_snapshot,
            "options": [o.to_json() for o in self.options],
            "rejected": [r.to_json() for r in self.rejected],
            "managed": [m.to_json() for m in self.managed],
            "assumptions": self.assumptions,
        }
