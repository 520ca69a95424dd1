"""ExecutionConfig: how a run trains, decided once.

GPU type and count, micro-batch, gradient accumulation, gradient checkpointing, attention kernel,
compute dtype and sharding. The planner decides one per option it prices (that is what the price
describes); a launch writes the chosen option's config into the node spec's `execution:` section;
the recipe runs exactly that, or emits a `deviation` event naming what it ran instead and why
(recipes/execution.py). A recipe run by hand on a spec without `execution:` decides by its own
fallback, and its start event says `decided_by: recipe`. Either way one procedure decides a run.

dtype: bf16 where the GPU has it, float32 elsewhere (V100, T4, P100, Turing cards, the CPU). The
recipe does not train in fp16 (that needs loss scaling, fp32 master weights for full fine-tuning
and the scaler's state in every checkpoint), so the planner prices those GPUs at their fp32
rate and fp32 memory, never at fp16 tensor-core speed.
"""
from __future__ import annotations

import math
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

Attention = Literal["sdpa", "flash_attention_2"]
Dtype = Literal["bfloat16", "float32"]
Sharding = Literal["none", "ddp", "fsdp"]
DecidedBy = Literal["plan", "recipe"]

ATTENTION_PLANNED = "sdpa"     # what the memory and speed models describe (the anchors ran SDPA)
CPU = "CPU"                    # the `gpu` of a config that trains on the host


def sharding_for(method: str, gpu_count: int) -> Sharding:
    """How the recipe spreads one instance's GPUs (recipes/modeling.py wrap_distributed): FSDP
    shards a full fine-tune's weights, gradients and optimizer; adapters are small enough that
    DDP replicates the frozen base on every GPU."""
    if gpu_count <= 1:
        return "none"
    return "fsdp" if method == "full" else "ddp"


def grad_accum_for(global_batch: int, micro_batch: int, gpu_count: int) -> int:
    """Micro-steps per optimizer step on each GPU (the last one may be short)."""
    return math.ceil(global_batch / (micro_batch * gpu_count))


class ExecutionConfig(BaseModel):
    """One run's execution, as planned or as it ran. Also the spec's `execution:` section."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    gpu: str = Field(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")  # catalog GPU name, CPU, or the hardware's
    gpu_count: int = Field(ge=1, le=4_096)  # training processes (GPUs) on each node
    num_nodes: int = Field(1, ge=1, le=1_024)  # nodes training together; world size = gpu_count x num_nodes
    micro_batch: int = Field(ge=1, le=65_536)  # packed sequences per GPU per forward
    grad_accum: int = Field(ge=1, le=65_536)
    gradient_checkpointing: bool
    attention: Attention = ATTENTION_PLANNED
    dtype: Dtype
    sharding: Sharding
    # What the plan's memory model says this needs per GPU, so the node can check the device it
    # got: free memory once the process holds its CUDA context, and the part of it that grows
    # with the micro-batch (activations, logits). None: the plan checked no memory (the CPU).
    needs_free_gib: Optional[float] = Field(None, gt=0, le=1e6)
    activations_gib: Optional[float] = Field(None, ge=0, le=1e6)

    @property
    def world_size(self) -> int:
        """Training processes over all nodes: what the global batch is split over."""
        return self.gpu_count * self.num_nodes

    @model_validator(mode="after")
    def _consistent(self) -> "ExecutionConfig":
        if self.sharding == "none" and self.world_size > 1:
            raise ValueError(f"sharding 'none' cannot train on {self.world_size} GPUs (ddp or fsdp)")
        if self.sharding != "none" and self.world_size == 1:
            raise ValueError(f"sharding '{self.sharding}' needs more than one GPU")
        if self.activations_gib is not None and (self.needs_free_gib is None or self.activations_gib > self.needs_free_gib):
            raise ValueError("activations_gib is part of needs_free_gib and cannot exceed it")
        return self

    def to_json(self) -> dict[str, Any]:
        # One node is the default and stays unwritten, so single-node specs and events read as before.
        return self.model_dump(mode="json", exclude_none=True, exclude={"num_nodes"} if self.num_nodes == 1 else None)

    def ran(self) -> dict[str, Any]:
        """The fields that say what ran (no memory hints): the start event's and the ledger's."""
        hints = {"needs_free_gib", "activations_gib"}
        return self.model_dump(mode="json", exclude=hints | {"num_nodes"} if self.num_nodes == 1 else hints)

    def describe(self) -> str:
        """1xH100: micro-batch 4 x 8 accumulation, checkpointing off, sdpa, bfloat16."""
        nodes = f"{self.num_nodes} nodes x " if self.num_nodes > 1 else ""
        return (f"{nodes}{self.gpu_count}x{self.gpu}: micro-batch {self.micro_batch} x {self.grad_accum} accumulation, "
                f"checkpointing {'on' if self.gradient_checkpointing else 'off'}, {self.attention}, {self.dtype}"
                + (f", {self.sharding}" if self.sharding != "none" else ""))
