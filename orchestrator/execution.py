"""The plan's execution configs: what each priced option runs, and a spec's pinned one.

Every option carries the config its price describes (contract/execution.py), built from the same
batch choice and device figures the estimate used; a launch hands the chosen one to the node. A
spec may pin its own `execution:`; the planner then prices exactly that or says why it cannot.
"""
from __future__ import annotations

from typing import Optional

from contract.errors import UserError
from contract.execution import ATTENTION_PLANNED, ExecutionConfig
from orchestrator.estimate import Calibration
from orchestrator.estimate.memory import BatchChoice
from orchestrator.quote import Offer


class PinnedExecutionError(UserError):
    """A spec's own `execution:` section asks for something the planner cannot price."""


def execution_for(offer: Offer, choice: BatchChoice, grad_accum: int, dtype: str, num_nodes: int = 1) -> ExecutionConfig:
    """What an option's price describes, as the node will run it, with the memory figures the
    node checks its device against (per GPU, for the sharding over all N x G GPUs)."""
    memory = choice.memory
    return ExecutionConfig(gpu=offer.gpu, gpu_count=offer.gpu_count, num_nodes=num_nodes, micro_batch=choice.micro_batch,
                           grad_accum=grad_accum, gradient_checkpointing=choice.gradient_checkpointing,
                           attention=ATTENTION_PLANNED, dtype=dtype, sharding=memory.sharding,
                           needs_free_gib=round(memory.needs_free_gib, 3),
                           activations_gib=round(memory.activations_gib, 3))


def check_pinned(spec, cal: Calibration) -> None:
    """A pinned GPU must be one the planner knows, in the dtype the recipe trains in there, with
    the attention kernel the memory and speed models describe."""
    pin = spec.execution
    if pin is None:
        return
    device = cal.device(pin.gpu)
    if device is None:
        raise PinnedExecutionError(f"execution.gpu: unknown GPU '{pin.gpu}' (CPU or a catalog GPU name, e.g. H100, "
                                   "A100-80GB)")
    if pin.dtype != device.dtype:
        raise PinnedExecutionError(f"execution.dtype: {pin.gpu} trains in {device.dtype} (bfloat16 where the GPU has "
                                   f"it, float32 elsewhere); the plan cannot price {pin.dtype} there")
    if pin.attention != ATTENTION_PLANNED:
        raise PinnedExecutionError(f"execution.attention: the planner prices {ATTENTION_PLANNED} only; "
                                   f"{pin.attention} runs by hand (python -m recipes.sft) but has no price")
    if pin.num_nodes > spec.constraints.max_nodes:
        raise PinnedExecutionError(f"execution.num_nodes {pin.num_nodes} is over constraints.max_nodes "
                                   f"{spec.constraints.max_nodes}: raise max_nodes to plan {pin.num_nodes} nodes")


def pinned_allows(offer: Offer, pin: Optional[ExecutionConfig]) -> bool:
    return pin is None or (offer.gpu.lower() == pin.gpu.lower() and offer.gpu_count == pin.gpu_count)


def node_counts(spec, gpu_count: int) -> tuple[int, ...]:
    """The node counts an instance with `gpu_count` GPUs is priced at: 1 to constraints.max_nodes (a
    pinned execution: its own), skipping any N > 1 whose N x gpu_count GPUs batch.global does not
    split evenly over, as the recipe requires (contract/spec.py); none when not even one node's GPUs
    split it."""
    pin = spec.execution
    if pin is not None:
        return (pin.num_nodes,)
    global_batch = spec.batch.global_
    if global_batch % gpu_count:
        return ()   # not even one node: the planner rejects the offer (batch_does_not_split)
    return (1,) + tuple(n for n in range(2, spec.constraints.max_nodes + 1) if global_batch % (gpu_count * n) == 0)
