"""Managed fine-tuning API prices (per 1M training tokens) and quotes for one job."""
from __future__ import annotations

from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Literal, Optional, Sequence

from pydantic import Field, StrictBool

from contract.errors import UserError
from orchestrator.datafile import DataModel, DateText, Money, Real, load_data_file
from orchestrator.quote import ManagedQuote

MANAGED_PATH = Path(__file__).parent / "data" / "managed.yaml"
METHODS = ("full", "lora", "qlora")
MILLION = Decimal(1_000_000)


class ManagedPrice(DataModel):
    """One row of managed.yaml."""

    service: str                  # together, openai, vertex-ai
    model: str                    # the service's tier or model name
    methods: tuple[Literal["full", "lora", "qlora"], ...] = Field(min_length=1)   # spotune methods it prices
    price_per_million_tokens: Money
    min_params: Real = 0.0        # exclusive lower bound of the size tier (open-weight services)
    max_params: Optional[Real] = None  # inclusive upper bound; None: any size
    closed_model: StrictBool = False   # fine-tunes the service's own model, not the user's
    price_range: Optional[tuple[Money, Money]] = None  # where the source gives only a range
    note: str = ""
    source: str
    read_on: DateText

    def applies_to(self, params: int, method: str) -> bool:
        if method not in self.methods:
            return False
        if self.closed_model:
            return True
        return params > self.min_params and (self.max_params is None or params <= self.max_params)


class ManagedFile(DataModel):
    """managed.yaml."""

    prices: tuple[ManagedPrice, ...]


@lru_cache(maxsize=1)
def _load() -> tuple[ManagedPrice, ...]:
    """The bundled prices, read once; a malformed file is a one-line DataFileError naming the field."""
    return load_data_file(MANAGED_PATH, ManagedFile).prices


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
