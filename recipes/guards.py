"""What stops a run that must not go on: a budget spent with no one watching, and a loss gone NaN.

NodeBudget is the node's half of the budget guard (the rule: contract/budget.py). On a cloud node
nothing else runs for the job's whole life, so the recipe keeps its own count: the plan's $/h
arrives in $SPOTUNE_PRICE_PER_HOUR, earlier attempts' hours in the spend file kept with the
checkpoints, and this attempt appends its own entry there at start and at every checkpoint. Once
spent plus the next checkpoint interval would pass `constraints.budget`, the trainer saves, emits
`over_budget` and exits 80. Rank 0 alone reads and writes the file; every rank acts on the vote.

Divergence: a loss that is NaN or inf, or weights that went non-finite in the last update, stop
the job as `diverged at step N`; the weights are never saved, so the newest checkpoint is the last
finite one.
"""
from __future__ import annotations

import math
import os
import time
import uuid
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Optional

import torch

from contract import budget as rule


def process_started() -> float:
    """When this process started (unix seconds): the node's bill starts before Python has imported
    torch and loaded the model."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


class NodeBudget:
    def __init__(self, budget: Decimal, price_per_hour: Decimal, location: str, attempt: int,
                 every_minutes: Optional[float], every_steps: Optional[int], started: Optional[float] = None):
        self.budget, self.price = budget, price_per_hour
        self.path = location.rstrip("/") + "/" + rule.SPEND_FILE
        self.every_minutes, self.every_steps = every_minutes, every_steps
        self.started = process_started() if started is None else started
        self.key = f"attempt-{attempt}-{uuid.uuid4().hex[:8]}"  # one entry per process, even on a reused number
        self.attempt = attempt
        self.steps: list[tuple[int, float]] = []
        self.save_seconds = 0.0
        self.startup_seconds: Optional[float] = None
        self._entries = rule.parse_spend(self._read())
        self.earlier = rule.spent(self._entries)

    @classmethod
    def for_run(cls, cfg, location: str, attempt: int) -> Optional["NodeBudget"]:
        """The guard for this run, or None without a budget or without the plan's price."""
        budget, price = cfg.constraints.budget, os.environ.get(rule.PRICE_ENV)
        if budget is None or not price:
            return None
        try:
            price_per_hour = Decimal(price)
        except InvalidOperation:
            return None
        if not price_per_hour.is_finite() or price_per_hour <= 0:
            return None
        return cls(Decimal(str(budget)), price_per_hour, str(location), attempt,
                   cfg.checkpoint.every_minutes, cfg.checkpoint.every_steps)

    # --- the spend file: a local path or an object-store URL --------------------------------
    def _read(self) -> Optional[str]:
        try:
            if "://" in self.path:
                import fsspec

                with fsspec.open(self.path, "r") as f:
                    return f.read()
            return Path(self.path).read_text()
        except (FileNotFoundError, OSError, ValueError):
            return None

    def record(self, now: Optional[float] = None) -> None:
        """This attempt's hours so far, into the spend file (whole-file replace: local or object store)."""
        hours = max(0.0, (now or time.time()) - self.started) / 3600
        text = rule.with_entry(self._entries, {"key": self.key, "attempt": self.attempt, "hours": hours,
                                               "price_per_hour": str(self.price)})
        if "://" in self.path:
            import fsspec

            with fsspec.open(self.path, "w") as f:
                f.write(text)
            return
        path = Path(self.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)

    # --- the rule -----------------------------------------------------------------------------
    def saw_start(self, at: float) -> None:
        self.startup_seconds = max(0.0, at - self.started)

    def saw_step(self, step: int, at: float) -> None:
        self.steps = (self.steps + [(step, at)])[-(rule.STEP_WINDOW + 1):]

    def saw_save(self, seconds: float) -> None:
        self.save_seconds = seconds

    def spent(self, now: Optional[float] = None) -> Decimal:
        return self.earlier + rule.cost(max(0.0, (now or time.time()) - self.started), self.price)

    def next_interval(self, now: Optional[float] = None) -> Decimal:
        startup = self.startup_seconds if self.startup_seconds is not None else max(0.0, (now or time.time()) - self.started)
        seconds = rule.interval_seconds(self.every_minutes, self.every_steps, rule.seconds_per_step(self.steps),
                                        self.save_seconds, startup)
        return rule.cost(seconds, self.price)

    def over(self, now: Optional[float] = None) -> Optional[str]:
        now = now or time.time()
        return rule.over_budget(self.spent(now), self.next_interval(now), self.budget)

    def event(self, step: int, message: str) -> dict:
        """The `over_budget` event's payload."""
        return {"step": step, "spent": float(self.spent()), "budget": float(self.budget),
                "price_per_hour": float(self.price), "next_interval_cost": float(self.next_interval()),
                "message": message}


class Diverged(Exception):
    """The loss (or the weights after an update) stopped being finite at `step`."""

    def __init__(self, step: int, loss: Optional[float], checkpoint_step: Optional[int]):
        self.step, self.loss, self.checkpoint_step = step, loss, checkpoint_step
        kept = (f"kept the last finite checkpoint (step {checkpoint_step})" if checkpoint_step
                else "no checkpoint had been saved")
        what = f"loss {loss}" if loss is not None and not math.isfinite(loss) else "weights not finite after the update"
        super().__init__(f"diverged at step {step} ({what}); {kept}")

    def event(self) -> dict:
        return {"step": self.step, "loss": self.loss, "checkpoint_step": self.checkpoint_step, "message": str(self)}


def all_finite(params) -> bool:
    """Whether every trainable tensor is finite, with one device sync."""
    checks = [torch.isfinite(p.detach()).all() for p in params]
    return bool(torch.stack(checks).all()) if checks else True
