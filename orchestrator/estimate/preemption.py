"""Time a run spends outside useful training: spot preemptions and checkpoint writes.

    preemption overhead hours = rate/h x compute hours x (checkpoint interval / 2 + restart time)

A preemption loses, on average, half a checkpoint interval of work, then waits for a new
instance and reloads the checkpoint. Rates and restart times are per provider in
preemption.yaml. Checkpoint writes pause training on spot and on-demand alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from orchestrator.estimate import Calibration
from orchestrator.architectures import ModelArch


def checkpoint_interval_hours(every_minutes: Optional[float], every_steps: Optional[int],
                              step_seconds: float, run_hours: float) -> float:
    """Hours between checkpoints: the sooner of the two triggers; none at all means the whole run."""
    intervals = []
    if every_minutes:
        intervals.append(every_minutes / 60)
    if every_steps:
        intervals.append(every_steps * step_seconds / 3600)
    return min(intervals) if intervals else max(run_hours, 0.0)


def checkpoint_bytes(arch: ModelArch, method: str, lora_r: int, target_modules, cal: Calibration) -> float:
    """What a resumable checkpoint holds: trainable weights and optimizer states (not a frozen base)."""
    if method == "full":
        per_param = cal.recipe.full_bytes_per_param
        return arch.params * (per_param.weights + per_param.optimizer)
    per_param = cal.recipe.adapter_bytes_per_param
    return arch.lora_params(lora_r, target_modules) * (per_param.weights + per_param.optimizer)


def checkpoint_writes(run_hours: float, interval_hours: float, bytes_per_checkpoint: float,
                      cal: Calibration) -> tuple[int, float]:
    """(checkpoints written during the run, seconds each): training pauses while one is written."""
    if interval_hours <= 0 or run_hours <= 0:
        return 0, 0.0
    return int(run_hours // interval_hours), bytes_per_checkpoint / (cal.overheads.checkpoint_write_gb_per_s * 1e9)


@dataclass(frozen=True)
class PreemptionOverhead:
    """Expected extra hours of a spot run, with the figures that gave them (for the cost line)."""

    hours: float
    rate_per_hour: float
    restart_hours: float
    interval_hours: float
    source: str


def preemption_overhead_hours(provider: str, run_hours: float, interval_hours: float,
                              cal: Calibration) -> PreemptionOverhead:
    """The expected extra hours on spot for this provider."""
    risk = cal.preemption(provider)
    rate = float(risk.rate_per_hour)
    restart_hours = float(risk.restart_minutes) / 60
    extra = rate * run_hours * (interval_hours / 2 + restart_hours)
    return PreemptionOverhead(extra, rate, restart_hours, interval_hours, risk.source)
