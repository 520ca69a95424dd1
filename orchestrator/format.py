"""How the CLI writes money, time, sizes and places: one formatter each, used by every command.

Amounts are USD. Decimal amounts round half up to the cent, as invoices do (`quote.money`);
floats are taken as the exact figure they print as.
"""
from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal
from typing import Optional, Union

Number = Union[int, float, Decimal]


def _decimal(amount: Number) -> Decimal:
    return amount if isinstance(amount, Decimal) else Decimal(str(amount))


def usd(amount: Number) -> str:
    """To the cent: $1,234.50, -$0.32."""
    value = _decimal(amount).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
    return f"{'-' if value < 0 else ''}${abs(value):,.2f}"


def usd_signed(amount: Number) -> str:
    """A difference, to the cent, always with its sign: +$0.40, -$0.32."""
    value = _decimal(amount).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
    return f"{'-' if value < 0 else '+'}${abs(value):,.2f}"


def usd_fine(amount: Number) -> str:
    """Cents, or four decimals for the sub-dollar amounts tiny jobs cost: $12.35, $0.0042."""
    value = _decimal(amount)
    if abs(value) >= 1:
        return usd(value)
    value = value.quantize(Decimal("0.0001"), rounding=ROUND_HALF_UP)
    return f"{'-' if value < 0 else ''}${abs(value):,.4f}"


def per_hour(price: Number) -> str:
    """An hourly price as the ledger quotes it, to four decimals: $0.4178/h."""
    return f"${_decimal(price):,.4f}/h"


def rate(price: Optional[Number]) -> str:
    """A table cell of USD per hour, without the $: 2.73, 0.418 (three decimals under a dollar), '-' for none."""
    if price is None:
        return "-"
    value = _decimal(price)
    return f"{value:.2f}" if value >= 1 else f"{value:.3f}"


def hours(h: Number) -> str:
    """A table cell of hours, without the unit: 0.42, 12.50, 1,234 (no decimals from 100 h)."""
    h = float(h)
    return f"{h:,.2f}" if h < 100 else f"{h:,.0f}"


def duration(seconds: Number) -> str:
    """Wall-clock time: m:ss under an hour, h:mm:ss from an hour."""
    s = int(round(float(seconds)))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def percent_change(new: Number, old: Number) -> str:
    """(new - old) / old as a signed percentage: +12.5%, -3.0%; n/a when old is zero."""
    return f"{(float(new) - float(old)) / float(old) * 100:+.1f}%" if old else "n/a"


def size(n: Optional[int]) -> str:
    """Bytes in decimal units: 512 B, 1.5 MB, 12.0 GB; '-' for unknown."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1000
    return "-"


def placement_label(where, with_price: bool = True) -> str:
    """Where something runs, as `Placement.label()` says it: aws/us-east-1 2xH100 spot at $4.10/h.

    Takes a Placement, or any record with its fields (a ledger attempt or estimate)."""
    from contract.placement import Placement

    if not isinstance(where, Placement):
        where = Placement(provider=where.provider, region=where.region, gpu=where.gpu, gpu_count=where.gpu_count,
                          spot=where.spot, price_per_hour=_decimal(where.price_per_hour))
    return where.label(with_price)
