"""Following the plan's execution config on the device the node really has. Imports no torch.

The plan decided micro-batch, accumulation, checkpointing, attention, dtype and sharding for the
hardware it priced (contract/execution.py). The recipe never re-decides them; it only checks that
the node can run them, and where it cannot, changes the least that makes the run possible and says
so in one `deviation` per change:

- device:    planned a GPU, running on the CPU (or the other way round)
- gpu:       a GPU other than the one planned (a fallback placement): the config is kept
- gpu_count: another number of training processes: accumulation and sharding follow
- dtype:     bf16 planned, the device lacks it: float32
- attention: flash-attention planned, not installed or not usable here: sdpa
- memory:    less free memory than the plan needs: the largest smaller micro-batch that fits by
             the plan's own figures, else gradient checkpointing at micro-batch 1

The device's facts come from recipes/modeling.py (`device_facts`), so this logic is tested
without a GPU.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from contract.execution import CPU, ExecutionConfig, grad_accum_for, sharding_for


@dataclass(frozen=True)
class DeviceFacts:
    """What the node has, as the recipe sees it before loading the model."""

    kind: str                       # "cuda" or "cpu"
    name: Optional[str]             # torch.cuda.get_device_name; None on the CPU
    count: int                      # training processes (the world size, over all nodes)
    bf16: bool
    flash_attention: bool           # flash-attn is installed and can run on this device
    free_gib: Optional[float] = None  # free memory on this GPU, with this process's CUDA context held
    nodes: int = 1                  # nodes the world spans (torchrun/Ray Train: WORLD_SIZE / LOCAL_WORLD_SIZE)


@dataclass(frozen=True)
class Deviation:
    kind: str
    reason: str
    planned: dict = field(default_factory=dict)
    running: dict = field(default_factory=dict)

    def payload(self) -> dict:
        return {"kind": self.kind, "reason": self.reason, "planned": self.planned, "running": self.running}


def same_gpu(planned: str, reported: Optional[str]) -> bool:
    """Whether the hardware's name ('NVIDIA H100 80GB HBM3') is the catalog GPU planned ('H100',
    'A100-80GB', 'RTX6000-Ada'): the planned name's model part, not followed by another digit."""
    if reported is None:
        return False
    model = re.sub(r"[^A-Z0-9]", "", planned.split("-")[0].upper())
    text = reported.upper()
    kept = [i for i, ch in enumerate(text) if ch.isalnum()]     # where each letter/digit sits in the name
    squashed = "".join(text[i] for i in kept)
    start = squashed.find(model)
    while model and start >= 0:
        after = kept[start + len(model) - 1] + 1                 # the name's next character, separators kept
        if after == len(text) or not text[after].isdigit():     # 'A10' is not 'A100', 'H100' is 'H100 80GB'
            return True
        start = squashed.find(model, start + 1)
    return False


def _fit_memory(ex: ExecutionConfig, free_gib: float, widened: bool) -> tuple[int, bool, Optional[str]]:
    """(micro-batch, checkpointing, why) that fits `free_gib` by the plan's figures; why is None
    when the plan fits as it is. float32 where bf16 was planned: every figure doubles."""
    scale = 2.0 if widened else 1.0
    need = ex.needs_free_gib * scale
    if need <= free_gib:
        return ex.micro_batch, ex.gradient_checkpointing, None
    activations = (ex.activations_gib or 0.0) * scale
    fixed = need - activations
    said = f"the plan needs {need:.1f} GiB free per GPU at micro-batch {ex.micro_batch}; {free_gib:.1f} GiB is free here"
    micro = ex.micro_batch // 2
    while micro >= 1:
        if fixed + activations * micro / ex.micro_batch <= free_gib:
            return micro, ex.gradient_checkpointing, f"{said}: micro-batch {micro} needs " \
                   f"{fixed + activations * micro / ex.micro_batch:.1f} GiB"
        micro //= 2
    if not ex.gradient_checkpointing:
        return 1, True, f"{said}: no micro-batch fits without gradient checkpointing; trying micro-batch 1 with it"
    return 1, True, f"{said}: micro-batch 1 is the least there is, and may not fit"


def follow_plan(ex: ExecutionConfig, method: str, global_batch: int,
                device: DeviceFacts) -> tuple[ExecutionConfig, list[Deviation]]:
    """The config this node runs for the planned `ex`, and each way it differs from the plan."""
    deviations: list[Deviation] = []

    def deviate(kind: str, reason: str, planned: dict, running: dict) -> None:
        deviations.append(Deviation(kind, reason, planned, running))

    gpu = ex.gpu
    on_gpu = device.kind == "cuda"
    if (ex.gpu == CPU) == on_gpu:
        gpu = device.name if on_gpu else CPU
        deviate("device", f"planned {ex.gpu_count}x{ex.gpu}; this node trains on {gpu}",
                {"gpu": ex.gpu}, {"gpu": gpu})
    elif on_gpu and not same_gpu(ex.gpu, device.name):
        gpu = device.name
        deviate("gpu", f"planned {ex.gpu}; this node has {device.name}: the plan's config is kept, its speed "
                       "and memory figures were made for the other GPU", {"gpu": ex.gpu}, {"gpu": device.name})
    count = device.count
    if count != ex.world_size:
        deviate("gpu_count", f"planned {ex.world_size} training processes; this run has {count}",
                {"gpu_count": ex.gpu_count, "num_nodes": ex.num_nodes},
                {"gpu_count": count // device.nodes, "num_nodes": device.nodes})
    dtype = ex.dtype
    if dtype == "bfloat16" and not device.bf16:
        dtype = "float32"
        deviate("dtype", f"planned bfloat16; {gpu} has no bf16: training in float32 (about twice the memory)",
                {"dtype": ex.dtype}, {"dtype": dtype})
    attention = ex.attention
    if attention == "flash_attention_2" and not device.flash_attention:
        attention = "sdpa"
        deviate("attention", "planned flash_attention_2; flash-attn is not installed or cannot run here: sdpa",
                {"attention": ex.attention}, {"attention": attention})
    micro, checkpointing = ex.micro_batch, ex.gradient_checkpointing
    if on_gpu and ex.needs_free_gib is not None and device.free_gib is not None:
        micro, checkpointing, why = _fit_memory(ex, device.free_gib, widened=dtype != ex.dtype)
        if why is not None:
            deviate("memory", why, {"micro_batch": ex.micro_batch, "gradient_checkpointing": ex.gradient_checkpointing},
                    {"micro_batch": micro, "gradient_checkpointing": checkpointing})
    running = ExecutionConfig(
        gpu=gpu, gpu_count=count // device.nodes, num_nodes=device.nodes, micro_batch=micro,
        grad_accum=grad_accum_for(global_batch, micro, count),
        gradient_checkpointing=checkpointing, attention=attention, dtype=dtype, sharding=sharding_for(method, count))
    return running, deviations


def recipe_decision(device: DeviceFacts, method: str, global_batch: int, micro_batch: int, gradient_checkpointing: bool,
                    attention: str, dtype: str) -> ExecutionConfig:
    """The config the recipe's fallback chose (a spec without `execution:`), as one value."""
    return ExecutionConfig(
        gpu=(device.name or "GPU") if device.kind == "cuda" else CPU, gpu_count=device.count // device.nodes,
        num_nodes=device.nodes, micro_batch=micro_batch,
        grad_accum=grad_accum_for(global_batch, micro_batch, device.count), gradient_checkpointing=gradient_checkpointing,
        attention=attention, dtype=dtype, sharding=sharding_for(method, device.count))
