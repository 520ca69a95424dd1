"""Value objects shared by the catalog, the planner, the ledger and the backends.

Prices are Decimal, parsed exactly from the catalog text, so a ledger row can be traced back
to the catalog line it came from. Estimates (tokens/s, hours) are floats: they are models.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Optional

from contract.execution import ATTENTION_PLANNED, ExecutionConfig
from contract.placement import Placement

CENT = Decimal("0.01")


def money_json(amount) -> Optional[str]:
    """Money in `--json` output: the exact Decimal as a string with all its digits, never a float
    (0.1 + 0.2 is not 0.3 in binary) and never exponent notation; None stays None (JSON null)."""
    if amount is None:
        return None
    return format(amount if isinstance(amount, Decimal) else Decimal(str(amount)), "f")


MICRO = Decimal("0.000001")  # the unit of plan lines and ledger amounts in --json: a micro-dollar


def round_parts(parts: list[Decimal], total: Decimal, unit: Decimal) -> list[Decimal]:
    """Exact parts rounded to `unit` so that they add up to `total` (a multiple of `unit` within one
    unit of their exact sum), each keeping its sign: every part goes to its floor or its ceiling, and
    the units the floors fall short go to the largest remainders (invoices split a sum this way).
    Floor and ceiling of a positive part are >= 0 and of a negative part <= 0, so no part's sign
    turns against the explanation beside it, as a rounded-away remainder would."""
    floors = [(p / unit).to_integral_value(rounding="ROUND_FLOOR") * unit for p in parts]
    short = int(((total - sum(floors, Decimal(0))) / unit).to_integral_value())
    order = sorted(range(len(parts)), key=lambda i: (-(parts[i] - floors[i]), i))
    fractional = [i for i in order if parts[i] != floors[i]]
    if not 0 <= short <= len(fractional):
        raise ValueError(f"total {total} is not within one {unit} of the parts' sum {sum(parts, Decimal(0))}")
    result = list(floors)
    for i in fractional[:short]:
        result[i] += unit
    return [r.quantize(unit) for r in result]


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
class Interval:
    """The range an option's expected hours and cost lie in, and where its speed figure comes from."""

    hours_low: float
    hours_high: float
    cost_low: Decimal
    cost_high: Decimal
    speed_error_factor: float      # tokens/s lies within predicted x/÷ this
    speed_source: str              # "3 runs in your ledger", "shipped calibration"

    def error_text(self) -> str:
        f = self.speed_error_factor
        return f"±{(f - 1) * 100:.0f} %" if f < 1.5 else f"x/÷ {f:.3g}"

    def to_json(self) -> dict:
        return {"hours": [round(self.hours_low, 4), round(self.hours_high, 4)],
                "cost": [money_json(self.cost_low), money_json(self.cost_high)],
                "speed_error_factor": round(self.speed_error_factor, 4), "speed_source": self.speed_source}


@dataclass(frozen=True)
class Option:
    """A feasible way to run the job: an offer, spot or not, with its estimate."""

    rank: int
    offer: Offer                  # one instance; the option spans execution.num_nodes of them
    spot: bool
    price_per_hour: Decimal       # the whole job: num_nodes x the instance's price
    micro_batch: int
    grad_accum: int
    gradient_checkpointing: bool
    tokens_per_second: float      # the whole job, all nodes
    memory_gb_per_gpu: float
    hours: float                  # compute hours with no preemption
    preemption_overhead_hours: float
    expected_cost: Decimal
    lines: tuple[CostLine, ...] = ()
    # The whole config the price describes and the node runs (micro_batch, grad_accum and
    # gradient_checkpointing above are its fields, kept flat for readers of the plan's JSON).
    execution: Optional[ExecutionConfig] = None
    # Where the speed figure comes from ("3 runs in your ledger", "shipped calibration") and the
    # range the time and cost lie in given its known error; None on an Option built by hand.
    interval: Optional["Interval"] = None

    def __post_init__(self) -> None:
        ex = self.execution
        if ex is None:  # an Option built by hand (tests, benches): bf16, one GPU or DDP
            ex = ExecutionConfig(gpu=self.offer.gpu, gpu_count=self.offer.gpu_count, micro_batch=self.micro_batch,
                                 grad_accum=self.grad_accum, gradient_checkpointing=self.gradient_checkpointing,
                                 attention=ATTENTION_PLANNED, dtype="bfloat16",
                                 sharding="none" if self.offer.gpu_count == 1 else "ddp")
            object.__setattr__(self, "execution", ex)
        flat = (self.micro_batch, self.grad_accum, self.gradient_checkpointing, self.offer.gpu, self.offer.gpu_count)
        if flat != (ex.micro_batch, ex.grad_accum, ex.gradient_checkpointing, ex.gpu, ex.gpu_count):
            raise ValueError(f"option {self.rank}: execution {ex.describe()} disagrees with the option's own fields")

    @property
    def expected_hours(self) -> float:
        return self.hours + self.preemption_overhead_hours

    @property
    def num_nodes(self) -> int:
        """Instances of the offer's type training together (the execution config says it once)."""
        return self.execution.num_nodes

    @property
    def placement(self) -> Placement:
        o = self.offer
        return Placement(provider=o.provider, region=o.region, gpu=o.gpu, gpu_count=o.gpu_count, spot=self.spot,
                         price_per_hour=self.price_per_hour, instance_type=o.instance_type, num_nodes=self.num_nodes)

    def to_json(self) -> dict:
        o = self.offer
        return {
            "rank": self.rank,
            "provider": o.provider,
            "region": o.region,
            "instance_type": o.instance_type,
            "gpu": o.gpu,
            "gpu_count": o.gpu_count,
            "num_nodes": self.num_nodes,
            "spot": self.spot,
            "price_per_hour": money_json(self.price_per_hour),
            "tokens_per_second": round(self.tokens_per_second, 1),
            "memory_gb_per_gpu": round(self.memory_gb_per_gpu, 2),
            "micro_batch": self.micro_batch,
            "gradient_checkpointing": self.gradient_checkpointing,
            "hours": round(self.hours, 4),
            "preemption_overhead_hours": round(self.preemption_overhead_hours, 4),
            "expected_cost": money_json(self.expected_cost),   # = the sum of the lines' amounts
            "grad_accum": self.grad_accum,
            "expected_hours": round(self.expected_hours, 4),
            "execution": self.execution.to_json(),
            **({"interval": self.interval.to_json()} if self.interval is not None else {}),
            "lines": [{"item": l.item, "amount": money_json(l.amount), "formula": l.formula} for l in self.lines],
        }


@dataclass(frozen=True)
class Rejected:
    offer: Offer
    spot: bool
    reason: str                   # one of REJECT_REASONS
    detail: str                   # "needs 1,130 GB across GPUs; this offer has 640 GB"
    expected_cost: Optional[Decimal] = None  # where it could be computed: to sort "cheapest rejected"
    num_nodes: int = 1            # instances of the offer's type the rejected variant spans

    def to_json(self) -> dict:
        o = self.offer
        return {"provider": o.provider, "region": o.region, "gpu": o.gpu, "gpu_count": o.gpu_count,
                "num_nodes": self.num_nodes, "spot": self.spot, "reason": self.reason, "detail": self.detail}


# not_launchable: the backend cannot start it (a cloud `sky check` did not enable, a feature the
# cloud lacks); the detail is the backend's own reason. batch_does_not_split: batch.global over the
# instance's GPUs is not whole, and the recipe splits it evenly or refuses the node spec.
REJECT_REASONS = ("does_not_fit_memory", "over_max_price", "misses_deadline", "over_budget", "no_spot_market",
                  "unknown_gpu", "not_launchable", "batch_does_not_split")


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
                "price_per_million_tokens": money_json(self.price_per_million_tokens),
                "cost": money_json(self.cost), "note": self.note}


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
