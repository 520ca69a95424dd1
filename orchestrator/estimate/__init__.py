"""Estimates for one job: memory per GPU, tokens per second, spot preemption overhead.

The models are code (memory.py, throughput.py, preemption.py); their figures are data, in
calibration.yaml and preemption.yaml beside this file, each with its source, read into the typed
tables of figures.py. `Calibration` bundles them with the catalog's GPU table so the planner
itself does no I/O.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Optional

from orchestrator.datafile import display_path, load_data_file, validate
from orchestrator.estimate.figures import (CalibrationFile, InterNodeScaling, MicroStepFloor, Overheads, PreemptionFile,
                                           PreemptionRisk, QloraDequantization, QloraFp32Upcast, RecipeFigures,
                                           RuntimeFigures)

HERE = Path(__file__).parent
CALIBRATION_PATH = HERE / "calibration.yaml"
PREEMPTION_PATH = HERE / "preemption.yaml"
GIB = 2**30


@dataclass(frozen=True)
class Curve:
    """A figure measured at a few model sizes: interpolated in log(params), flat outside."""

    points: tuple[tuple[float, float], ...]   # (params, value), sorted by params

    def at(self, params: float) -> float:
        xs = [p for p, _ in self.points]
        if params <= xs[0]:
            return self.points[0][1]
        if params >= xs[-1]:
            return self.points[-1][1]
        i = bisect.bisect_right(xs, params)
        (x0, y0), (x1, y1) = self.points[i - 1], self.points[i]
        t = (math.log(params) - math.log(x0)) / (math.log(x1) - math.log(x0))
        return y0 + t * (y1 - y0)


@dataclass(frozen=True)
class DeviceSpec:
    """What the estimates need to know about one accelerator (or the CPU)."""

    name: str
    peak_tflops: float                                 # peak dense TFLOP/s in `dtype`
    vram_gb: Optional[float]
    mfu_override: Optional[dict[str, float]] = None    # per method, for devices the MFU curves do not describe
    dtype: str = "bfloat16"                            # what the recipe trains in here (contract/execution.py)
    speed_error: Optional[float] = None                # its own known error factor (CPU), else the method's
    memory_bandwidth_gbs: Optional[float] = None       # peak; QLoRA's dequantization is bound by it


@dataclass(frozen=True)
class SpeedFit:
    """Measured over predicted tokens/s for one (device, method), fitted from ledger runs
    (orchestrator/calibrate.py): predictions are multiplied by `factor`, and the truth lies within
    x/÷ `error_factor` of them."""

    device: str
    method: str
    factor: float
    error_factor: float
    runs: int
    outliers: int = 0


@dataclass(frozen=True)
class SetupFit:
    """Billed seconds outside training steps, fitted from ledger runs: `local` start-up (without the
    model load term) or cloud `setup`."""

    seconds: float
    error_factor: float
    runs: int


@dataclass(frozen=True)
class CheckpointFit:
    """Checkpoint write rate fitted from the ledger's checkpoint rows (bytes over seconds): `local`
    disk or a `cloud` node's store."""

    gb_per_s: float
    error_factor: float
    writes: int
    outliers: int = 0


@dataclass(frozen=True)
class Calibration:
    """Every figure the estimates use, read once from the data files beside this module."""

    recipe: RecipeFigures
    runtime: RuntimeFigures
    mfu: dict[str, Curve]                  # method -> Curve (full, lora; QLoRA derives from lora)
    qlora_upcast: Optional[QloraFp32Upcast]  # the fp32 parts' rate with the upcast; None without it
    multi_gpu_efficiency: dict[int, float]  # gpu count -> efficiency
    micro_step_floor: MicroStepFloor
    devices: dict[str, DeviceSpec]          # catalog GPUs plus local devices
    overheads: Overheads
    preemption_default: PreemptionRisk
    preemption_providers: dict[str, PreemptionRisk]
    sources: dict = field(default_factory=dict)
    speed_error: dict = field(default_factory=dict)    # method -> shipped error factor
    speed_fits: dict = field(default_factory=dict)     # (device, method) -> SpeedFit from the ledger
    setup_fits: dict = field(default_factory=dict)     # "local" / "cloud" -> SetupFit from the ledger
    checkpoint_fits: dict = field(default_factory=dict)  # "local" / "cloud" -> CheckpointFit from the ledger
    qlora_dequantization: Optional[QloraDequantization] = None   # with the fp32 upcast and without
    multi_gpu_assumed: bool = False                    # multi_gpu_efficiency is an assumption, not measured
    inter_node: Optional[InterNodeScaling] = None      # across nodes (orchestrator/estimate/scaling.py)

    def speed_factor(self, device: str, method: str) -> float:
        fit = self.speed_fits.get((device, method))
        return fit.factor if fit is not None else 1.0

    def speed_uncertainty(self, device: str, method: str) -> tuple[float, str]:
        """(error factor, where the speed figure comes from) for quotes: the ledger fit, else shipped."""
        fit = self.speed_fits.get((device, method))
        if fit is not None:
            runs = f"{fit.runs} run{'s' if fit.runs != 1 else ''} in your ledger"
            if fit.outliers:
                runs += f" ({fit.outliers} outlier{'s' if fit.outliers != 1 else ''} left out)"
            return fit.error_factor, runs
        spec = self.devices.get(device)
        if spec is not None and spec.speed_error is not None:
            return spec.speed_error, "shipped calibration"
        return self.speed_error.get(method, 1.0), "shipped calibration"

    def checkpoint_write(self, kind: str) -> tuple[float, str]:
        """(GB/s, where the figure comes from) for writing checkpoints on `local` disk or from a
        `cloud` node: the ledger fit, else the shipped figure."""
        fit = self.checkpoint_fits.get(kind)
        if fit is not None:
            return fit.gb_per_s, f"{fit.writes} checkpoint write{'s' if fit.writes != 1 else ''} in your ledger"
        return self.overheads.checkpoint_write_gb_per_s, "shipped calibration"

    def device(self, name: str) -> Optional[DeviceSpec]:
        return self.devices.get(name)

    def scaling(self, gpu_count: int) -> float:
        known = sorted(self.multi_gpu_efficiency)
        below = [c for c in known if c <= gpu_count] or known[:1]
        return self.multi_gpu_efficiency[below[-1]]

    def preemption(self, provider: str) -> PreemptionRisk:
        return self.preemption_providers.get(provider, self.preemption_default)

    def assumptions(self) -> dict:
        """The figures a plan used, with sources: printed in the plan, stored with the estimate."""
        return {
            "recipe": self.recipe.model_dump(),
            "runtime": self.runtime.model_dump(exclude={"source"}),
            "mfu": {m: [list(p) for p in c.points] for m, c in self.mfu.items()},
            "qlora_fp32_upcast": self.qlora_upcast.model_dump(exclude={"source"}) if self.qlora_upcast else None,
            "qlora_dequantization": (self.qlora_dequantization.model_dump(exclude={"source"})
                                     if self.qlora_dequantization else None),
            "multi_gpu_efficiency": {str(k): v for k, v in sorted(self.multi_gpu_efficiency.items())},
            "micro_step_floor": self.micro_step_floor.model_dump(exclude={"source"}),
            "scaling": {"intra_node_assumed": self.multi_gpu_assumed,
                        "inter_node": self.inter_node.model_dump(exclude={"source"}) if self.inter_node else None},
            "overheads": self.overheads.model_dump(exclude={"source"}),
            "preemption": {"default": self.preemption_default.model_dump(),
                           **{p: v.model_dump() for p, v in sorted(self.preemption_providers.items())}},
            "throughput_scaling": "MFU measured on the reference GPU, applied to each GPU's peak dense TFLOP/s in the "
                                  "dtype the recipe trains in there (bf16; fp32 on GPUs without bf16)",
            "sources": dict(self.sources),
            "speed_error": dict(self.speed_error),
            "ledger_fit": {"speed": [vars(f) for _, f in sorted(self.speed_fits.items())],
                           "setup": {k: vars(f) for k, f in sorted(self.setup_fits.items())},
                           "checkpoint": {k: vars(f) for k, f in sorted(self.checkpoint_fits.items())}},
        }


def _curve(points, figure: str) -> Curve:
    return Curve(tuple(sorted((p.params, getattr(p, figure)) for p in points)))


def calibration_from_data(calibration: CalibrationFile | dict, preemption: PreemptionFile | dict,
                          gpu_specs: dict) -> Calibration:
    """A Calibration from the two data files (parsed models, or raw YAML to validate) and the
    catalog's GPU table (name -> GpuSpec)."""
    if not isinstance(calibration, CalibrationFile):
        calibration = validate(calibration, CalibrationFile, display_path(CALIBRATION_PATH))
    if not isinstance(preemption, PreemptionFile):
        preemption = validate(preemption, PreemptionFile, display_path(PREEMPTION_PATH))
    tp = calibration.throughput
    upcast = calibration.recipe.qlora_fp32_upcast
    # Priced in the dtype the recipe trains in: bf16, else fp32 at the GPU's fp32 rate (no fp16).
    devices = {name: DeviceSpec(name, s.bf16_tflops, s.vram_gb, memory_bandwidth_gbs=s.memory_bandwidth_gbs) if s.bf16 else
               DeviceSpec(name, s.fp32_tflops, s.vram_gb, dtype="float32", memory_bandwidth_gbs=s.memory_bandwidth_gbs)
               for name, s in gpu_specs.items()}
    for name, d in calibration.devices.items():
        devices[name] = DeviceSpec(name, d.peak_tflops, d.vram_gb, mfu_override=dict(d.mfu) or None, dtype=d.dtype,
                                   speed_error=d.speed_error.factor if d.speed_error else None)
    mfu = {"full": tp.mfu.full, "lora": tp.mfu.lora}
    sources = {
        "recipe": calibration.recipe.source,
        "runtime": calibration.runtime.source,
        "mfu": {m: [p.source for p in points] for m, points in mfu.items()},
        "qlora_dequantization": tp.qlora_dequantization.source,
        **({"qlora_fp32_upcast": tp.qlora_fp32_upcast.source} if upcast else {}),
        "multi_gpu_efficiency": tp.multi_gpu_efficiency.source,
        "micro_step_floor": tp.micro_step_floor.source,
        "inter_node_scaling": calibration.scaling.inter_node.source,
        "devices": {n: d.source for n, d in calibration.devices.items()},
        "overheads": calibration.overheads.source,
        "speed_error": {m: e.source for m, e in tp.speed_error.items()},
    }
    return Calibration(
        recipe=calibration.recipe,
        runtime=calibration.runtime,
        mfu={m: _curve(points, "mfu") for m, points in mfu.items()},
        qlora_upcast=tp.qlora_fp32_upcast if upcast else None,
        qlora_dequantization=tp.qlora_dequantization,
        multi_gpu_efficiency=dict(tp.multi_gpu_efficiency.counts),
        multi_gpu_assumed=tp.multi_gpu_efficiency.assumed,
        inter_node=calibration.scaling.inter_node,
        micro_step_floor=tp.micro_step_floor,
        devices=devices,
        overheads=calibration.overheads,
        preemption_default=preemption.default,
        preemption_providers=dict(preemption.providers),
        sources=sources,
        speed_error={m: e.factor for m, e in tp.speed_error.items()},
    )


@lru_cache(maxsize=1)
def load_calibration() -> Calibration:
    """The bundled calibration with the catalog's GPU table (read once per process); a malformed
    file is a one-line DataFileError naming the file and the field."""
    from orchestrator.catalog import gpu_specs

    return calibration_from_data(load_data_file(CALIBRATION_PATH, CalibrationFile),
                                 load_data_file(PREEMPTION_PATH, PreemptionFile), gpu_specs())
