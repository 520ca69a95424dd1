"""The shape of calibration.yaml and preemption.yaml: every figure the estimates read, typed.

Field names are the YAML keys, so a figure's name in code is the name beside its source in the
data. Each table carries its `source`: a figure without one is an error, not an unexplained number.
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, StrictBool, field_validator

from orchestrator.datafile import DataModel, Number, PositiveNumber, PositiveReal, Real

Method = Literal["full", "lora", "qlora"]


class BytesPerParam(DataModel):
    weights: Number
    gradients: Number
    optimizer: Number


class LogitsBytes(DataModel):
    """Bytes per (token x vocabulary entry) at the loss's peak, by the dtype of the LM head."""

    bf16_head: PositiveNumber
    fp32_head: PositiveNumber


class RecipeFigures(DataModel):
    """What the training loop keeps in memory; measured with the recipe the anchors describe."""

    full_bytes_per_param: BytesPerParam
    adapter_bytes_per_param: BytesPerParam
    nf4_bytes_per_param: PositiveNumber
    nf4_constants_bytes_per_param: Number
    qlora_fp32_upcast: StrictBool = False
    logits_bytes_per_token_vocab: LogitsBytes
    source: str


class RuntimeFigures(DataModel):
    """Memory outside the model's tensors: CUDA context and allocator slack."""

    cuda_context_gib: Number
    allocator_fragmentation: Number
    source: str


class MfuPoint(DataModel):
    params: PositiveReal
    mfu: PositiveReal
    source: str


class MfuByMethod(DataModel):
    # QLoRA has no curve of its own: LoRA's MFU, plus its dequantization (and fp32 parts with the upcast).
    full: list[MfuPoint] = Field(min_length=1)
    lora: list[MfuPoint] = Field(min_length=1)


class QloraFp32Upcast(DataModel):
    """QLoRA with prepare_model_for_kbit_training's fp32 upcast (the anchors' naive loop): attention
    and the frozen head run in fp32, at the GPU's fp32 peak x fp32_mfu."""

    fp32_peak_per_bf16_peak: PositiveReal   # the fp32 rate, from each GPU's dense bf16 peak
    fp32_mfu: PositiveReal                  # achieved / fp32 peak for those parts
    source: str


class QloraDequantization(DataModel):
    """QLoRA runs LoRA's bf16 matmuls plus, on every pass over a layer, one dequantization of its NF4
    linear weights to bf16: a memory-bound kernel, bytes over bandwidth."""

    bytes_per_param: PositiveReal        # read NF4 and its constants, write the bf16 copy
    passes: int = Field(ge=1)             # per micro-step without gradient checkpointing
    recompute_passes: int = Field(ge=0)   # added by gradient checkpointing
    bandwidth_efficiency: PositiveReal    # achieved / peak memory bandwidth
    source: str


class MicroStepFloor(DataModel):
    """The least time one micro-step takes, whatever the model size (eager PyTorch overhead)."""

    seconds: Real
    seconds_per_layer: Real
    source: str


class MultiGpuEfficiency(DataModel):
    counts: dict[int, PositiveReal] = Field(min_length=1)   # GPU count -> fraction of linear scaling
    assumed: StrictBool = False   # true until a measured run replaces the figures: plans say so
    source: str


class InterNodeScaling(DataModel):
    """Training over N nodes of one instance type: efficiency(N) = per_doubling ** log2(N)
    (orchestrator/estimate/scaling.py). Above 0.5, so that a node always adds speed."""

    per_doubling: PositiveReal
    assumed: StrictBool
    source: str

    @field_validator("per_doubling")
    @classmethod
    def _adds_speed(cls, value: float) -> float:
        if not 0.5 < value <= 1.0:
            raise ValueError("must be above 0.5 (each doubling of the nodes still speeds training up) and at most 1")
        return value


class ScalingFigures(DataModel):
    """Across nodes; within one node it is throughput.multi_gpu_efficiency."""

    inter_node: InterNodeScaling


class SpeedError(DataModel):
    """How far the shipped speed model can be off, as a factor: the truth lies within predicted
    x/÷ factor. The planner's interval with no ledger history."""

    factor: PositiveReal
    source: str


class ThroughputFigures(DataModel):
    reference_gpu: str
    reference_peak_tflops: PositiveReal
    mfu: MfuByMethod
    qlora_fp32_upcast: QloraFp32Upcast
    qlora_dequantization: QloraDequantization
    micro_step_floor: MicroStepFloor
    multi_gpu_efficiency: MultiGpuEfficiency
    speed_error: dict[Method, SpeedError] = Field(default_factory=dict)


class DeviceFigures(DataModel):
    """A device outside the catalog's GPU table (this machine's CPU), with its own measured MFU."""

    peak_tflops: PositiveReal                  # in `dtype`
    vram_gb: Optional[PositiveReal] = None     # None: memory is not checked (host RAM)
    dtype: Literal["bfloat16", "float32"] = "float32"   # what the recipe trains in there: fp32 on the CPU
    mfu: dict[Method, PositiveNumber] = Field(default_factory=dict)
    speed_error: Optional[SpeedError] = None   # this device's own, over the methods' GPU figures
    source: str


class LocalStartup(DataModel):
    """A local run's billed seconds outside training steps: process start, imports, data, model
    build or load, first-step warm-up, final save and exit."""

    seconds: Number                        # for a model too small to take time to load
    model_load_gb_per_s: PositiveNumber    # reading 16-bit weights from local disk
    error_factor: PositiveReal = 1.0   # start-up lies within seconds x/÷ this
    source: str


class Overheads(DataModel):
    """Time billed outside training steps."""

    setup_minutes: Number
    setup_error_factor: PositiveReal = 1.0   # setup lies within minutes x/÷ this
    checkpoint_write_gb_per_s: PositiveNumber
    local_startup: LocalStartup
    source: str


class CalibrationFile(DataModel):
    """calibration.yaml."""

    recipe: RecipeFigures
    runtime: RuntimeFigures
    throughput: ThroughputFigures
    devices: dict[str, DeviceFigures] = Field(default_factory=dict)
    overheads: Overheads
    scaling: ScalingFigures


class PreemptionRisk(DataModel):
    """One provider's spot preemption rate and the time a recovery takes."""

    rate_per_hour: Number
    restart_minutes: Number
    source: str


class PreemptionFile(DataModel):
    """preemption.yaml: a default plus per-provider figures."""

    default: PreemptionRisk
    providers: dict[str, PreemptionRisk] = Field(default_factory=dict)
