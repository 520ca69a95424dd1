"""Placement: where an attempt runs (provider, region, instance, GPUs, nodes, spot) and its hourly price.

One value object from the plan's chosen option to the backend, the ledger and the CLI, with
one serialisation (`to_json` / `from_json`). `gpu_count` is the GPUs on each node and
`num_nodes` the instances of that type that train together. The price is what all of them cost
together in USD/h (num_nodes x the instance's price), kept as a Decimal string so it round-trips
exactly: an attempt costs wall hours x price_per_hour however many nodes it spans.
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
    num_nodes: int = 1

    @property
    def node_price_per_hour(self) -> Decimal:
        """One instance's USD/h."""
        return self.price_per_hour / self.num_nodes

    @property
    def total_gpus(self) -> int:
        return self.gpu_count * self.num_nodes

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
                   instance_type=d.get("instance_type"), num_nodes=int(d.get("num_nodes", 1)))

    def label(self, with_price: bool = True) -> str:
        """aws/us-east-1 2xH100 spot at $4.10/h; aws/us-east-1 4 nodes x 8xH100 at $...; local/this-machine CPU."""
        count = f"{self.gpu_count}x" if self.gpu_count > 1 else ""
        if self.num_nodes > 1:
            count = f"{self.num_nodes} nodes x {self.gpu_count}x"
        kind = " spot" if self.spot else ""
        price = f" at ${self.price_per_hour:,.2f}/h" if with_price else ""
        return f"{self.provider}/{self.region} {count}{self.gpu}{kind}{price}"
