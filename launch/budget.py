"""The local supervisor's budget guard (the rule itself: contract/budget.py).

Spent is the ledger's own sum (reconcile.spend): each attempt's wall seconds from its `start` to its
`end` record in attempts.jsonl (an open one up to now), times the placement's $/h. The step, save
and start-up times come from the recipe's events, as the supervisor tails them.
"""
from __future__ import annotations

from decimal import Decimal
from typing import Optional

from contract import budget as rule
from contract.events import CHECKPOINT, START, STEP


class BudgetGuard:
    def __init__(self, budget: Optional[str], price_per_hour: Decimal, records: list[dict],
                 every_minutes: Optional[float] = None, every_steps: Optional[int] = None):
        self.budget = None if budget is None else Decimal(str(budget))
        self.price = Decimal(price_per_hour)
        self.every_minutes, self.every_steps = every_minutes, every_steps
        starts = {r["attempt"]: r["time"] for r in records if r.get("record") == "start"}
        ends = {r["attempt"]: r["time"] for r in records if r.get("record") == "end"}
        self.closed_seconds = sum(max(0.0, ends[n] - starts[n]) for n in starts if n in ends)
        self.current_start: Optional[float] = None
        self.started_recipe: Optional[float] = None   # the attempt's `start` event
        self.last_startup = 0.0                       # the last attempt's, for the next one's
        self.steps: list[tuple[int, float]] = []
        self.save_seconds = 0.0

    def attempt_started(self, at: float) -> None:
        self.current_start, self.started_recipe, self.steps = at, None, []

    def attempt_ended(self, at: float) -> None:
        if self.current_start is not None:
            self.closed_seconds += max(0.0, at - self.current_start)
            if self.started_recipe is not None:
                self.last_startup = max(0.0, self.started_recipe - self.current_start)
        self.current_start = None

    def saw(self, event: dict) -> None:
        if event.get("event") == START and isinstance(event.get("time"), (int, float)):
            self.started_recipe = float(event["time"])
        elif event.get("event") == STEP and isinstance(event.get("step"), int) and isinstance(event.get("time"), (int, float)):
            self.steps = (self.steps + [(event["step"], float(event["time"]))])[-(rule.STEP_WINDOW + 1):]
        elif event.get("event") == CHECKPOINT and isinstance(event.get("seconds"), (int, float)):
            self.save_seconds = float(event["seconds"])

    def spent(self, now: float) -> Decimal:
        seconds = self.closed_seconds + (max(0.0, now - self.current_start) if self.current_start is not None else 0.0)
        return rule.cost(seconds, self.price)

    def over(self, now: float) -> Optional[str]:
        """Why the job must stop now, or None while the budget holds the next checkpoint interval."""
        if self.budget is None:
            return None
        startup = self.last_startup  # between attempts: what the next one will take to start
        if self.current_start is not None:
            startup = max(0.0, (self.started_recipe or now) - self.current_start)
        interval = rule.interval_seconds(self.every_minutes, self.every_steps, rule.seconds_per_step(self.steps),
                                         self.save_seconds, startup)
        return rule.over_budget(self.spent(now), rule.cost(interval, self.price), self.budget)
