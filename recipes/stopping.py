"""Stopping inside an optimizer step: SIGTERM is honoured before the next micro-batch, not the next step.

A step of many accumulated micro-batches can take minutes, and SkyPilot allows 30 s between
SIGTERM and SIGKILL. So the trainer asks before every micro-batch whether to stop; if so it drops
the partial step and saves the last completed one (docs/stopping.md).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from recipes.checkpoint import restore_rng_state


class StepInterrupted(Exception):
    """A stop request arrived inside an optimizer step; the partial step has been dropped."""

    def __init__(self, dropped_micro_batches: int):
        super().__init__(f"stopped after {dropped_micro_batches} micro-batches of a step")
        self.dropped_micro_batches = dropped_micro_batches


class StopVote:
    """Whether to stop now. Every rank must answer alike at the same micro-batch; under torchrun
    they vote over a CPU (gloo) group, which costs no GPU synchronisation per micro-batch. Built
    by every rank at setup, in the same order (creating a group is collective)."""

    def __init__(self, preemption, world_size: int):
        self.preemption = preemption
        self._group = dist.new_group(backend="gloo") if world_size > 1 else None

    def __call__(self) -> bool:
        if self._group is None:
            return self.preemption.requested
        vote = torch.tensor([int(self.preemption.requested)])
        dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=self._group)
        return bool(vote.item())


def drop_partial_step(optimizer: torch.optim.Optimizer, rng_at_step_start: dict) -> None:
    """Back to the last completed step. Parameters and optimizer state have not moved (only
    optimizer.step moves them), and the data position and scheduler move after it: what is left
    to undo is the gradients accumulated so far and the dropped micro-batches' RNG draws."""
    optimizer.zero_grad(set_to_none=True)
    restore_rng_state(rng_at_step_start)
