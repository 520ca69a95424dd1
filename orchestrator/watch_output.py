"""What a watching CLI prints, tick by tick: attempt starts and ends, progress every 10 %, and once,
early, a line when the measured speed is far from the plan (a busy machine, a slower GPU), so a
first run that will miss its estimate says why where it happens instead of only in the ledger.
"""
from __future__ import annotations

from decimal import Decimal
from typing import TYPE_CHECKING, Optional

from orchestrator.format import duration, phrases, placement_label, usd_fine

if TYPE_CHECKING:
    from orchestrator.watch import Tick

# "Far from the plan": measured tokens/s outside [1/FAR, FAR] x planned. Ordinary noise (a
# checkpoint step, a warm-up) stays well inside; the busy-machine case that prompted this was 20x.
FAR = 1.5
# Steps of an attempt to wait for before judging its speed: the first steps include warm-up.
JUDGE_AFTER_STEPS = 3


def speed_verdict(measured: float, planned: float) -> Optional[list[str]]:
    """The phrases of one note when the measured speed is far from the planned one; None when close."""
    if not measured or not planned:
        return None
    ratio = measured / planned
    if 1 / FAR <= ratio <= FAR:
        return None
    head = f"measured {measured:,.0f} tokens/s in the first steps against {planned:,.0f} planned ({ratio:.2g}x):"
    if ratio < 1:
        return [head, "this machine is slower than calibrated (busy, or another device),",
                f"so time and cost will run about {1 / ratio:.1f}x the estimate"]
    return [head, "faster than calibrated,", "so time and cost should come in under the estimate"]


class ProgressPrinter:
    """Prints what changed since the last tick: attempt starts and ends, progress every 10%."""

    def __init__(self, console):
        self.console = console
        self.started: set[int] = set()
        self.ended: set[int] = set()
        self.last_decile = -1
        self.status: Optional[str] = None
        self.judged = False
        self.first_step: dict[int, int] = {}

    def _say(self, parts: list[str]) -> None:
        self.console.print(phrases(parts, self.console.width, indent="    "), highlight=False)

    def __call__(self, tick: "Tick") -> None:
        p = tick.progress
        attempts = [a for a in tick.attempts if a.kind != "controller"]  # the jobs controller is no attempt
        for a in attempts:
            if a.n not in self.started and (a.n in p.started_attempts or a.ended_at is not None):
                self.started.add(a.n)
                resumed = f"resuming from step {a.resumed_from_step}" if a.resumed_from_step else ""
                self._say([f"[bold]attempt {a.n}[/] started on {placement_label(a)}", resumed])
        if p.step is not None and p.total_steps:
            decile = min(10, p.step * 10 // p.total_steps)
            if decile > self.last_decile:
                self.last_decile = decile
                self._say([f"  step {p.step}/{p.total_steps}",
                           f"loss {p.loss:.3f}" if p.loss is not None else "",
                           f"{p.tokens_per_second:,.0f} tokens/s" if p.tokens_per_second else "",
                           f"spent {usd_fine(tick.spent)}"])
            self._judge_speed(tick)
        for a in attempts:
            if a.ended_at is not None and a.n not in self.ended:
                self.ended.add(a.n)
                self.started.add(a.n)
                seconds = (a.ended_at - a.started_at).total_seconds()
                cost = Decimal(str(seconds)) / 3600 * a.price_per_hour
                colour = {"finished": "green", "preempted": "yellow"}.get(a.end_reason, "red")
                self._say([f"[bold]attempt {a.n}[/] [{colour}]{a.end_reason}[/] after {duration(seconds)}",
                           usd_fine(cost), a.detail or ""])
        if tick.job.status != self.status:
            self.status = tick.job.status
            if tick.job.status in ("recovering", "over_budget", "failed", "cancelled"):
                why = tick.job.failure_reason or tick.detail
                self.console.print(f"job [bold]{tick.job.status}[/]" + (f": {why}" if why else ""), highlight=False)

    def _judge_speed(self, tick: "Tick") -> None:
        """Once per watch: as soon as the current attempt has run a few steps, compare its speed with
        the plan's (the median of its latest rates, as the budget guard uses)."""
        p = tick.progress
        if self.judged or not p.tokens_per_second or not tick.attempts:
            return
        n = tick.attempts[-1].n
        first = self.first_step.setdefault(n, p.step)
        if p.step - first < JUDGE_AFTER_STEPS and p.step < (p.total_steps or 0):
            return
        self.judged = True
        verdict = speed_verdict(p.tokens_per_second, tick.job.estimate.tokens_per_second)
        if verdict:
            self.console.print(phrases(["[yellow]note[/]:", *verdict], self.console.width + len("[yellow][/]"), sep=" "),
                               highlight=False)
