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


def rate_exact(price: Number) -> str:
    """Every digit the price has, and at least cents, without trailing zeros: 20.00, 38.5062."""
    value = _decimal(price)
    digits = -value.normalize().as_tuple().exponent
    return f"{value:.{max(2, digits)}f}"


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
                          spot=where.spot, price_per_hour=_decimal(where.price_per_hour),
                          num_nodes=getattr(where, "num_nodes", None) or 1)
    return where.label(with_price)


def usd_exact(amount: Number) -> str:
    """An amount as given, never rounded away: $50.00, $0.0001, $12.345 (at least the cents)."""
    value = _decimal(amount).normalize()
    decimals = max(2, -value.as_tuple().exponent if value.as_tuple().exponent < 0 else 0)
    return f"{'-' if value < 0 else ''}${abs(value):,.{decimals}f}"


def count(n: Optional[Number], unit: str = "") -> str:
    """A large count in the unit that reads: 8.03B, 4.6M, 510K, 950 (params, tokens); '-' for none."""
    if n is None:
        return "-"
    value = float(n)
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            shown = value / scale
            digits = 2 if shown < 10 else 1 if shown < 100 else 0
            return f"{shown:,.{digits}f}{suffix}{unit}"
    return f"{value:,.0f}{unit}"


def region_label(region: str) -> str:
    """A region as people read it. Vast names regions `City, CC, Continent` and leaves the city empty
    where it is unknown (`, CN, AS`); the name itself stays as the provider spells it for launching."""
    return region.strip().lstrip(",").strip() or region


def cents_that_add_up(parts: list[Number], total: Optional[Number] = None) -> list[Decimal]:
    """Each part rounded to the cent so that the rounded parts add up to the rounded total (the sum of
    the parts unless given): the largest-remainder method, as invoices split a sum. $0.304 + $0.294 +
    $0.094 = $0.692 shows as $0.31 + $0.29 + $0.09 = $0.69, not $0.30 + $0.29 + $0.09 = $0.68."""
    exact = [_decimal(p) for p in parts]
    target = _decimal(sum(exact) if total is None else total).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
    cent = Decimal("0.01")
    floors = [(p / cent).to_integral_value(rounding="ROUND_FLOOR") * cent for p in exact]
    short = int(((target - sum(floors, Decimal(0))) / cent).to_integral_value())
    # Hand the missing cents to the parts that lost the most to the floor (ties: the earlier part).
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - floors[i]), i))
    result = list(floors)
    for i in (order[:short] if short >= 0 else order[::-1][:-short]):
        result[i] += cent if short >= 0 else -cent
    return [r.quantize(cent) for r in result]


def phrases(parts: list[str], width: int, sep: str = " · ", indent: str = "  ") -> str:
    """Join phrases on one line, breaking only between them (never inside `expected $0.02`): a
    continuation starts with `indent`. A phrase longer than the width gets a line of its own."""
    lines: list[str] = []
    current = ""
    for part in (p for p in parts if p):
        candidate = part if not current else f"{current}{sep}{part}"
        if current and len(candidate) > width:
            lines.append(current)
            current = indent + part
        else:
            current = candidate
    if current:
        lines.append(current)
    return "\n".join(lines)
