"""Training tokens per second of one instance.

    tokens/s = peak TFLOP/s x GPUs x multi-GPU efficiency x MFU(method, size) / FLOPs per token

capped by a fixed least time per micro-step (eager PyTorch overhead), which only binds for models
far smaller than the anchors.

QLoRA runs LoRA's matmuls at LoRA's MFU and adds its NF4 dequantization per micro-step: bytes over
memory bandwidth (calibration.yaml qlora_dequantization), so its cost per token falls as
micro-batch x seq_len grows. With prepare_model_for_kbit_training's fp32 upcast
(recipe.qlora_fp32_upcast) attention and the frozen head run in fp32: those FLOPs per token go at
the GPU's fp32 rate x fp32_mfu (calibration.yaml qlora_fp32_upcast), the rest as above.

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
    """MFU for this method and model size; QLoRA's matmuls run at LoRA's (its extra costs are
    modelled apart: dequantization, and the fp32 parts with the upcast)."""
    if device is not None and device.mfu_override and method in device.mfu_override:
        return float(device.mfu_override[method])
    return cal.mfu["full" if method == "full" else "lora"].at(arch.params)


def upcast_fp32_flops_per_token(arch: ModelArch, method: str, seq_len: int, device: DeviceSpec, cal: Calibration) -> float:
    """FLOPs per token that run in fp32 under the QLoRA upcast: causal attention (q, k and v come back
    from bitsandbytes in the fp32 input's dtype) 6 x layers x hidden x seq, as flops_per_token counts
    it, and the frozen fp32 head's forward and input gradient 4 x hidden x vocab. 0 without the
    upcast, for other methods, on devices with their own MFU, and where training is fp32 anyway."""
    if (method != "qlora" or cal.qlora_upcast is None or device.mfu_override or device.dtype == "float32"):
        return 0.0
    return 6 * arch.layers * arch.hidden * seq_len + 4 * arch.hidden * arch.vocab


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
    fitted_factor: float = 1.0      # measured / predicted from the ledger's runs (orchestrator/calibrate.py)
    dequantization_seconds: float = 0.0   # QLoRA: NF4 -> bf16 per micro-step, added to the compute time
    fp32_flops_per_token: float = 0.0     # QLoRA with the fp32 upcast: the part of flops_per_token run in fp32
    fp32_tflops_per_gpu: float = 0.0      # ... at this rate (fp32 peak x fp32_mfu)

    def formula(self) -> str:
        fitted = f" x {self.fitted_factor:.4g} fitted to your runs" if self.fitted_factor != 1.0 else ""
        if self.floor_seconds:
            return (f"{self.micro_step_tokens:,} tokens per micro-step x {self.gpu_count} GPU x {self.scaling:g} "
                    f"scaling / {self.floor_seconds:.3f} s least micro-step time{fitted} = {self.tokens_per_second:,.0f} tokens/s")
        dequant = (f" + {self.dequantization_seconds * 1000:.3g} ms NF4 dequantization per {self.micro_step_tokens:,}-token "
                   f"micro-step" if self.dequantization_seconds else "")
        if self.fp32_flops_per_token:
            return (f"{(self.flops_per_token - self.fp32_flops_per_token) / 1e9:.4g} GFLOP per token at "
                    f"{self.peak_tflops_per_gpu:g} TFLOP/s x MFU {self.mfu:.3f} + {self.fp32_flops_per_token / 1e9:.4g} GFLOP "
                    f"per token in fp32 (attention, head) at {self.fp32_tflops_per_gpu:.3g} TFLOP/s, x {self.gpu_count} GPU x "
                    f"{self.scaling:g} scaling{dequant}{fitted} = {self.tokens_per_second:,.0f} tokens/s")
        return (f"{self.peak_tflops_per_gpu:g} TFLOP/s x {self.gpu_count} GPU x {self.scaling:g} scaling x "
                f"MFU {self.mfu:.3f} / {self.flops_per_token / 1e9:.4g} GFLOP per token{dequant}{fitted} "
                f"= {self.tokens_per_second:,.0f} tokens/s")


def estimate_throughput(arch: ModelArch, method: str, *, seq_len: int, gradient_checkpointing: bool,
                        device: DeviceSpec, gpu_count: int, cal: Calibration,
                        micro_batch: Optional[int] = None, fitted: bool = True) -> ThroughputEstimate:
    """`micro_batch` (per GPU) enables the micro-step floor; without it, compute alone sets the speed.
    `fitted`: scale by the ledger fit for this device and method where `cal` carries one (the
    fit itself compares runs against the unfitted prediction)."""
    fpt = flops_per_token(arch, method, seq_len, gradient_checkpointing)
    mfu = model_flops_utilisation(arch, method, cal, device)
    scaling = cal.scaling(gpu_count)
    factor = cal.speed_factor(device.name, method) if fitted else 1.0
    fp32 = upcast_fp32_flops_per_token(arch, method, seq_len, device, cal)
    fp32_tflops = device.peak_tflops * cal.qlora_upcast.fp32_peak_per_bf16_peak * cal.qlora_upcast.fp32_mfu if fp32 else 0.0
    instance = gpu_count * scaling * 1e12
    tps = 1 / ((fpt - fp32) / (device.peak_tflops * mfu * instance) + (fp32 / (fp32_tflops * instance) if fp32 else 0.0))
    dequant = dequantization_seconds(arch, method, gradient_checkpointing, device, cal) if micro_batch else 0.0
    if dequant:   # per GPU: each one dequantizes its own copy of the frozen base every micro-step
        tokens = micro_batch * seq_len * gpu_count * scaling
        tps = tokens / (tokens / tps + dequant)
    if micro_batch:
        tokens = micro_batch * seq_len
        floor = cal.micro_step_floor.seconds + cal.micro_step_floor.seconds_per_layer * arch.layers
        capped = tokens * gpu_count * scaling / floor
        if capped < tps:
            return ThroughputEstimate(capped * factor, fpt, mfu, device.peak_tflops, gpu_count, scaling, floor, tokens,
                                      factor)
    return ThroughputEstimate(tps * factor, fpt, mfu, device.peak_tflops, gpu_count, scaling,
                              micro_step_tokens=micro_batch * seq_len if micro_batch else 0, fitted_factor=factor,
                              dequantization_seconds=dequant, fp32_flops_per_token=fp32, fp32_tflops_per_gpu=fp32_tflops)


def dequantization_seconds(arch: ModelArch, method: str, gradient_checkpointing: bool, device: DeviceSpec,
                           cal: Calibration) -> float:
    """QLoRA's NF4 -> bf16 dequantization of every linear weight, once per pass, per micro-step:
    memory-bound, so bytes over bandwidth (0 for other methods and on devices with their own
    measured MFU). The same with the fp32 upcast: bitsandbytes dequantizes to its compute dtype."""
    d = cal.qlora_dequantization
    if method != "qlora" or d is None or not device.memory_bandwidth_gbs or device.mfu_override:
        return 0.0
    passes = d.passes + (d.recompute_passes if gradient_checkpointing else 0)
    return passes * d.bytes_per_param * arch.linear_params / (device.memory_bandwidth_gbs * 1e9 * d.bandwidth_efficiency)
