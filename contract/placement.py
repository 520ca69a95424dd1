"""Placement: where an attempt runs (provider, region, instance, GPUs, spot) and its hourly price.

One value object from the plan's chosen option to the backend, the ledger and the CLI, with
one serialisation (`to_json` / `from_json`). The price is the whole instance's USD/h, kept as a
Decimal string so it round-trips exactly.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from decimal import Decimal
from typing import Any, Mapping, Optional


@dataclass(frozen=True)
class Placement:
    provider: str
    region: str
    gpu: str
    gpu_count: int
    spot: bool
    price_per_hour: Decimal
    instance_type: Optional[str] = None

    def columns(self) -> dict[str, Any]:
        """The fields by name, price as Decimal: what a ledger row or a record stores."""
        return asdict(self)

    @classmethod
    def of(cls, record: Any) -> "Placement":
        """The placement of anything that stores its fields (a ledger record, a row)."""
        return cls(**{name: getattr(record, name) for name in cls.__dataclass_fields__})

    def to_json(self) -> dict[str, Any]:
        return {**self.columns(), "price_per_hour": str(self.price_per_hour)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Placement":
        return cls(provider=str(d["provider"]), region=str(d["region"]), gpu=str(d["gpu"]),
                   gpu_count=int(d["gpu_count"]), spot=bool(d["spot"]),
                   price_per_hour=Decimal(str(d["price_per_hour"])),
                   instance_type=d.get("instance_type"))

    def label(self, with_price: bool = True) -> str:
        """aws/us-east-1 2xH100 spot at $4.10/h; local/this-machine CPU."""
        count = f"{self.gpu_count}x" if self.gpu_count > 1 else ""
        kind = " spot" if self.spot else ""
        price = f" at ${self.price_per_hour:,.2f}/h" if with_price else ""
        return f"{self.provider}/{self.region} {count}{self.gpu}{kind}{price}"
