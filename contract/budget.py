"""The budget rule, written once for the two places that enforce it with no one watching.

The local supervisor (launch/budget.py) and, on a cloud node, the recipe itself (recipes/budget.py)
stop a job with a checkpoint once what it has spent plus what running to the next checkpoint would
cost passes `constraints.budget`. Running on would either pass the budget or lose the work since
the last checkpoint; stopping now keeps both the money and the work.

What running on would add is the next checkpoint interval (`every_minutes`, or `every_steps` at
the measured step time, whichever comes first) plus what stopping itself costs: one more save (the
last save's duration) and the process's exit, estimated by its start-up (imports, model load), which
it never exceeds in practice. Before the recipe has started, its start-up so far stands in for it.

The node's spend file (`spend.json`, kept with the checkpoints so every attempt on every node sees
it) lists one entry per attempt process: its hours so far and the $/h it ran at. Each attempt
appends its own entry and rewrites it at every checkpoint, so a SIGKILLed attempt is short by at
most one checkpoint interval (the work it loses is as long). The node cannot see provisioning time:
its count is a lower bound of the bill, which the ledger keeps.
"""
from __future__ import annotations

import json
import statistics
from decimal import Decimal, InvalidOperation
from typing import Optional, Sequence

SPEND_FILE = "spend.json"
# The plan's $/h of the chosen placement, in the node's environment (not a secret).
PRICE_ENV = "SPOTUNE_PRICE_PER_HOUR"
# Step times: the median of the latest few, so one slow step (the first, a checkpoint's) neither
# stops a job early nor late.
STEP_WINDOW = 5


def usd(amount: Decimal) -> str:
    return f"${amount:,.2f}" if abs(amount) >= 1 else f"${amount:.4f}"


def seconds_per_step(samples: Sequence[tuple[int, float]]) -> Optional[float]:
    """Median seconds per step over (step, time) samples, oldest first; None with fewer than two."""
    rates = [(t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in zip(samples, samples[1:]) if s1 > s0]
    return statistics.median(rates) if rates else None


def interval_seconds(every_minutes: Optional[float], every_steps: Optional[int], step_seconds: Optional[float],
                     save_seconds: float, startup_seconds: float) -> float:
    """Seconds from now to a stopped process if the job runs on to its next checkpoint. With
    `every_steps` set, the interval is unknown until a step time is measured: counted as none then,
    rather than as `every_minutes`, which may be far later than the step-count checkpoint."""
    candidates = [every_minutes * 60] if every_minutes else []
    if every_steps:
        candidates = [every_steps * step_seconds] + candidates if step_seconds is not None else [0.0]
    return (min(candidates) if candidates else 0.0) + save_seconds + startup_seconds


def cost(seconds: float, price_per_hour: Decimal) -> Decimal:
    return Decimal(str(seconds)) * Decimal(price_per_hour) / 3600


def over_budget(spent: Decimal, next_interval: Decimal, budget: Optional[Decimal]) -> Optional[str]:
    """Why the job must stop now, or None while the budget still holds the next checkpoint interval."""
    if budget is None or spent + next_interval <= budget:
        return None
    return (f"over budget: spent {usd(spent)} + {usd(next_interval)} to reach the next checkpoint and stop would pass the "
            f"budget of {usd(budget)}")


# --- the node's spend file ------------------------------------------------------------------

def parse_spend(text: Optional[str]) -> list[dict]:
    """The entries of a spend file; a missing, torn or foreign file counts as no spend so far (the
    ledger still bills every hour)."""
    if not text:
        return []
    try:
        entries = json.loads(text).get("attempts", [])
    except (ValueError, AttributeError):
        return []
    return [e for e in entries if isinstance(e, dict) and isinstance(e.get("hours"), (int, float))
            and isinstance(e.get("price_per_hour"), str) and isinstance(e.get("key"), str)]


def spent(entries: Sequence[dict]) -> Decimal:
    total = Decimal(0)
    for e in entries:
        try:
            total += Decimal(str(e["hours"])) * Decimal(e["price_per_hour"])
        except InvalidOperation:
            continue
    return total


def with_entry(entries: Sequence[dict], entry: dict) -> str:
    """The spend file's text with `entry` added, or replacing the one with the same key."""
    kept = [e for e in entries if e["key"] != entry["key"]]
    return json.dumps({"attempts": [*kept, entry]}, indent=1)
