"""Managed fine-tuning API prices (per 1M training tokens) and quotes for one job."""
from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence

import yaml

from orchestrator.errors import UserError
from orchestrator.quote import ManagedQuote

MANAGED_PATH = Path(__file__).parent / "data" / "managed.yaml"
METHODS = ("full", "lora", "qlora")
MILLION = Decimal(1_000_000)


@dataclass(frozen=True)
class ManagedPrice:
    service: str                  # together, openai, vertex-ai
    model: str                    # the service's tier or model name
    methods: tuple[str, ...]      # spotune methods this price applies to
    price_per_million_tokens: Decimal
    min_params: float = 0.0       # exclusive lower bound of the size tier (open-weight services)
    max_params: Optional[float] = None  # inclusive upper bound; None: any size
    closed_model: bool = False    # fine-tunes the service's own model, not the user's
    price_range: Optional[tuple[Decimal, Decimal]] = None  # where the source gives only a range
    note: str = ""
    source: str = ""
    read_on: str = ""

    def applies_to(self, params: int, method: str) -> bool:
        if method not in self.methods:
            return False
        if self.closed_model:
            return True
        return params > self.min_params and (self.max_params is None or params <= self.max_params)


@lru_cache(maxsize=1)
def _load() -> tuple[ManagedPrice, ...]:
    raw = yaml.safe_load(MANAGED_PATH.read_text(encoding="utf-8"))
    prices = []
    for entry in raw["prices"]:
        price_range = entry.get("price_range")
        prices.append(ManagedPrice(
            service=entry["service"], model=str(entry["model"]), methods=tuple(entry["methods"]),
            price_per_million_tokens=Decimal(str(entry["price_per_million_tokens"])),
            min_params=float(entry.get("min_params", 0)),
            max_params=float(entry["max_params"]) if entry.get("max_params") is not None else None,
            closed_model=bool(entry.get("closed_model", False)),
            price_range=tuple(Decimal(str(x)) for x in price_range) if price_range else None,
            note=str(entry.get("note", "")), source=str(entry["source"]), read_on=str(entry["read_on"]),
        ))
    return tuple(prices)


def load_managed_prices() -> list[ManagedPrice]:
    return list(_load())


def managed_quotes(params: int, method: str, total_tokens: int,
                   prices: Optional[Sequence[ManagedPrice]] = None) -> list[ManagedQuote]:
    """What each applicable managed service would charge to train on `total_tokens`
    (examples x tokens per example x epochs): cost = tokens / 1e6 x price. Cheapest first."""
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    if params <= 0 or total_tokens < 0:
        raise UserError(f"params must be positive and total_tokens not negative (got {params}, {total_tokens})")
    quotes = []
    for price in (prices if prices is not None else _load()):
        if not price.applies_to(params, method):
            continue
        millions = Decimal(total_tokens) / MILLION
        note = price.note
        if price.price_range:
            low, high = (millions * p for p in price.price_range)
            note = f"{note}; range ${low:.2f}-${high:.2f}" if note else f"range ${low:.2f}-${high:.2f}"
        if method == "qlora" and not price.closed_model:
            note = f"{note}; QLoRA priced as LoRA" if note else "QLoRA priced as LoRA"
        quotes.append(ManagedQuote(service=price.service, model=price.model,
                                   price_per_million_tokens=price.price_per_million_tokens,
                                   cost=millions * price.price_per_million_tokens, note=note))
    return sorted(quotes, key=lambda q: q.cost)
