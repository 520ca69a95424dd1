"""Training tokens per second of one instance.

    tokens/s = peak TFLOP/s x GPUs x multi-GPU efficiency x MFU(method, size) / FLOPs per token
               (/ QLoRA slowdown)

capped by a fixed least time per micro-step (eager PyTorch overhead), which only binds for models
far smaller than the anchors.

FLOPs per token follow the anchors' accounting: 6N for full fine-tuning (forward 2N, backward
4N), 4N with a frozen base (no weight gradients), plus causal attention 6 x layers x hidden x
seq, plus a recomputed forward (2N) with gradient checkpointing. MFU is measured on the
reference GPU (calibration.yaml) and applied unchanged to other GPUs' peak TFLOP/s.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from orchestrator.estimate import Calibration, DeviceSpec
from orchestrator.architectures import ModelArch


def flops_per_token(arch: ModelArch, method: str, seq_len: int, gradient_checkpointing: bool) -> float:
    n = arch.params
    per_token = (6 if method == "full" else 4) * n + 6 * arch.layers * arch.hidden * seq_len
    if gradient_checkpointing:
        per_token += 2 * n
    return per_token


def model_flops_utilisation(arch: ModelArch, method: str, cal: Calibration, device: DeviceSpec | None = None) -> float:
    """MFU for this method and model size; QLoRA is LoRA's MFU divided by its slowdown."""
    if device is not None and device.mfu_override and method in device.mfu_override:
        return float(device.mfu_override[method])
    base = "full" if method == "full" else "lora"
    mfu = cal.mfu[base].at(arch.params)
    if method == "qlora":
        mfu /= cal.qlora_slowdown.at(arch.params)
    return mfu


@dataclass(frozen=True)
class ThroughputEstimate:
    tokens_per_second: float
    flops_per_token: float
    mfu: float
    peak_tflops_per_gpu: float
    gpu_count: int
    scaling: float
    floor_seconds: float = 0.0      # the micro-step floor, when it (not compute) sets the speed
    micro_step_tokens: int = 0

    def formula(self) -> str:
        if self.floor_seconds:
            return (f"{self.micro_step_tokens:,} tokens per micro-step x {self.gpu_count} GPU x {self.scaling:g} "
                    f"scaling / {self.floor_seconds:.3f} s least micro-step time = {self.tokens_per_second:,.0f} tokens/s")
        return (f"{self.peak_tflops_per_gpu:g} TFLOP/s x {self.gpu_count} GPU x {self.scaling:g} scaling x "
                f"MFU {self.mfu:.3f} / {self.flops_per_token / 1e9:.4g} GFLOP per token "
                f"= {self.tokens_per_second:,.0f} tokens/s")


def estimate_throughput(arch: ModelArch, method: str, *, seq_len: int, gradient_checkpointing: bool,
                        device: DeviceSpec, gpu_count: int, cal: Calibration,
                        micro_batch: Optional[int] = None) -> ThroughputEstimate:
    """`micro_batch` (per GPU) enables the micro-step floor; without it, compute alone sets the speed."""
    fpt = flops_per_token(arch, method, seq_len, gradient_checkpointing)
    mfu = model_flops_utilisation(arch, method, cal, device)
    scaling = cal.scaling(gpu_count)
    tps = device.peak_tflops * 1e12 * gpu_count * scaling * mfu / fpt
    if micro_batch:
        tokens = micro_batch * seq_len
        floor = cal.micro_step_floor.seconds + cal.micro_step_floor.seconds_per_layer * arch.layers
        capped = tokens * gpu_count * scaling / floor
        if capped < tps:
            return ThroughputEstimate(capped, fpt, mfu, device.peak_tflops, gpu_count, scaling, floor, tokens)
    return ThroughputEstimate(tps, fpt, mfu, device.peak_tflops, gpu_count, scaling)
