"""Estimates for one job: memory per GPU, tokens per second, spot preemption overhead.

The models are code (memory.py, throughput.py, preemption.py); their figures are data, in
calibration.yaml and preemption.yaml beside this file, each with its source. `Calibration`
bundles that data with the catalog's GPU table so the planner itself does no I/O.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Optional

import yaml

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
    peak_tflops: float
    vram_gb: Optional[float]
    mfu_override: Optional[dict] = None    # per method, for devices the MFU curves do not describe


@dataclass(frozen=True)
class Calibration:
    recipe: dict
    runtime: dict
    mfu: dict                      # method -> Curve (full, lora)
    qlora_slowdown: Curve
    multi_gpu_efficiency: dict     # gpu count -> efficiency
    micro_step_floor: dict         # seconds, seconds_per_layer: the least time one micro-step takes
    devices: dict                  # name -> DeviceSpec (catalog GPUs plus local devices)
    overheads: dict
    preemption_default: dict
    preemption_providers: dict
    sources: dict = field(default_factory=dict)

    def device(self, name: str) -> Optional[DeviceSpec]:
        return self.devices.get(name)

    def scaling(self, gpu_count: int) -> float:
        known = sorted(self.multi_gpu_efficiency)
        below = [c for c in known if c <= gpu_count] or known[:1]
        return self.multi_gpu_efficiency[below[-1]]

    def preemption(self, provider: str) -> dict:
        return self.preemption_providers.get(provider, self.preemption_default)

    def assumptions(self) -> dict:
        """The figures a plan used, with sources: printed in the plan, stored with the estimate."""
        return {
            "recipe": {k: v for k, v in self.recipe.items()},
            "runtime": dict(self.runtime),
            "mfu": {m: [list(p) for p in c.points] for m, c in self.mfu.items()},
            "qlora_slowdown": [list(p) for p in self.qlora_slowdown.points],
            "multi_gpu_efficiency": {str(k): v for k, v in sorted(self.multi_gpu_efficiency.items())},
            "micro_step_floor": dict(self.micro_step_floor),
            "overheads": dict(self.overheads),
            "preemption": {"default": dict(self.preemption_default),
                           **{p: dict(v) for p, v in sorted(self.preemption_providers.items())}},
            "throughput_scaling": "MFU measured on the reference GPU, applied to each GPU's peak dense bf16 TFLOP/s",
            "sources": dict(self.sources),
        }


def _curve(entries: list[dict], key: str) -> Curve:
    return Curve(tuple(sorted((float(e["params"]), float(e[key])) for e in entries)))


def calibration_from_data(calibration: dict, preemption: dict, gpu_specs: dict) -> Calibration:
    """Build a Calibration from parsed YAML and the catalog's GPU table (name -> GpuSpec)."""
    tp = calibration["throughput"]
    recipe = dict(calibration["recipe"])
    upcast = "fp32_upcast" if recipe.get("qlora_fp32_upcast") else "bf16"
    devices = {name: DeviceSpec(name, float(s.bf16_tflops), float(s.vram_gb)) for name, s in gpu_specs.items()}
    for name, d in (calibration.get("devices") or {}).items():
        devices[name] = DeviceSpec(name, float(d["peak_tflops"]),
                                   None if d.get("vram_gb") is None else float(d["vram_gb"]),
                                   mfu_override=dict(d.get("mfu") or {}) or None)
    sources = {
        "recipe": recipe.get("source", ""),
        "runtime": calibration["runtime"].get("source", ""),
        "mfu": {m: [e.get("source", "") for e in entries] for m, entries in tp["mfu"].items()},
        "qlora_slowdown": [e.get("source", "") for e in tp["qlora_slowdown"][upcast]],
        "multi_gpu_efficiency": tp["multi_gpu_efficiency"].get("source", ""),
        "micro_step_floor": tp["micro_step_floor"].get("source", ""),
        "devices": {n: d.get("source", "") for n, d in (calibration.get("devices") or {}).items()},
        "overheads": calibration["overheads"].get("source", ""),
    }
    return Calibration(
        recipe=recipe,
        runtime={k: v for k, v in calibration["runtime"].items() if k != "source"},
        mfu={m: _curve(entries, "mfu") for m, entries in tp["mfu"].items()},
        qlora_slowdown=_curve(tp["qlora_slowdown"][upcast], "factor"),
        multi_gpu_efficiency={int(k): float(v) for k, v in tp["multi_gpu_efficiency"]["counts"].items()},
        micro_step_floor={k: float(v) for k, v in tp["micro_step_floor"].items() if k != "source"},
        devices=devices,
        overheads={k: v for k, v in calibration["overheads"].items() if k != "source"},
        preemption_default=dict(preemption["default"]),
        preemption_providers={p: dict(v) for p, v in (preemption.get("providers") or {}).items()},
        sources=sources,
    )


@lru_cache(maxsize=1)
def load_calibration() -> Calibration:
    """The bundled calibration with the catalog's GPU table (read once per process)."""
    from orchestrator.catalog import gpu_specs

    calibration = yaml.safe_load(CALIBRATION_PATH.read_text(encoding="utf-8"))
    preemption = yaml.safe_load(PREEMPTION_PATH.read_text(encoding="utf-8"))
    return calibration_from_data(calibration, preemption, gpu_specs())
