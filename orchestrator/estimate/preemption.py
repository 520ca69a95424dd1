"""Time a run spends outside useful training: spot preemptions and checkpoint writes.

    preemption overhead hours = N nodes x rate/h x compute hours x (checkpoint interval / 2 + restart time)

A preemption loses, on average, half a checkpoint interval of work, then waits for a new
instance and reloads the checkpoint. Rates and restart times are per provider in
preemption.yaml. On N spot nodes the preemption of any one stops every rank (a collective cannot
finish without it) and the whole job restarts from its last complete checkpoint, so the job is
preempted N times as often; the restart time stays one node's, as the nodes are replaced in
parallel. Checkpoint writes pause training on spot and on-demand alike.
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
                      cal: Calibration, kind: str = "cloud") -> tuple[int, float]:
    """(checkpoints written during the run, seconds each): training pauses while one is written.
    `kind`: `local` disk or a `cloud` node, whose write rates the ledger fits apart."""
    if interval_hours <= 0 or run_hours <= 0:
        return 0, 0.0
    return int(run_hours // interval_hours), bytes_per_checkpoint / (cal.checkpoint_write(kind)[0] * 1e9)


@dataclass(frozen=True)
class PreemptionOverhead:
    """Expected extra hours of a spot run, with the figures that gave them (for the cost line)."""

    hours: float
    rate_per_hour: float
    restart_hours: float
    interval_hours: float
    source: str
    num_nodes: int = 1
    node_rate_per_hour: float = 0.0   # one node's; rate_per_hour is the job's, num_nodes x this

    def rate_text(self) -> str:
        """The rate as the cost line shows it: 0.05/h, or 2 nodes x 0.05/h."""
        if self.num_nodes > 1:
            return f"{self.num_nodes} nodes x {self.node_rate_per_hour:g}/h"
        return f"{self.rate_per_hour:g}/h"


def preemption_overhead_hours(provider: str, run_hours: float, interval_hours: float,
                              cal: Calibration, num_nodes: int = 1) -> PreemptionOverhead:
    """The expected extra hours on spot for this provider, for a job spanning `num_nodes` spot nodes."""
    risk = cal.preemption(provider)
    node_rate = float(risk.rate_per_hour)
    rate = node_rate * num_nodes
    restart_hours = float(risk.restart_minutes) / 60
    extra = rate * run_hours * (interval_hours / 2 + restart_hours)
    return PreemptionOverhead(extra, rate, restart_hours, interval_hours, risk.source, num_nodes, node_rate)
