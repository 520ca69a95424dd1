"""GPU spec table: VRAM, peak dense bf16 TFLOP/s, memory bandwidth, per canonical GPU name."""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

# RunPod's plain `Nx_H100_SECURE` is the PCIe card; its SXM and NVL types say so in the name.
_RUNPOD_H100_PCIE = re.compile(r"^\d+x_h100_")

SPECS_PATH = Path(__file__).parent / "data" / "gpu_specs.yaml"


@dataclass(frozen=True)
class GpuSpec:
    name: str
    vram_gb: float
    bf16_tflops: float            # peak dense; the fp16 tensor figure where bf16 is False
    memory_bandwidth_gbs: float
    bf16: bool
    memory_variants_gb: tuple[float, ...]
    source: str

    @property
    def max_vram_gb(self) -> float:
        return max(self.memory_variants_gb)


@lru_cache(maxsize=1)
def _load_specs() -> dict[str, GpuSpec]:
    raw = yaml.safe_load(SPECS_PATH.read_text(encoding="utf-8"))
    specs = {}
    for name, entry in raw.items():
        vram = float(entry["vram_gb"])
        specs[name] = GpuSpec(
            name=name,
            vram_gb=vram,
            bf16_tflops=float(entry["bf16_tflops"]),
            memory_bandwidth_gbs=float(entry["memory_bandwidth_gbs"]),
            bf16=bool(entry["bf16"]),
            memory_variants_gb=tuple(float(v) for v in entry.get("memory_variants_gb", [vram])),
            source=str(entry["source"]),
        )
    return specs


def gpu_specs() -> dict[str, GpuSpec]:
    """Canonical GPU name -> GpuSpec (a fresh dict; the specs themselves are immutable)."""
    return dict(_load_specs())


def spec_for(gpu: str, instance_type: str = "") -> GpuSpec | None:
    """The spec for one offer's GPU, using the instance type to tell H100 variants apart.

    SkyPilot calls several cards `H100`: Lambda's gpu_1x_h100_pcie and RunPod's 1x_H100_SECURE
    are PCIe (~25% slower than SXM), Vast's 1x-H100_NVL-... is an NVL; that matters when ranking.
    """
    specs = _load_specs()
    name = gpu
    lowered = instance_type.lower()
    if gpu == "H100":
        if "nvl" in lowered:
            name = "H100-NVL"
        elif "pcie" in lowered or _RUNPOD_H100_PCIE.match(lowered):
            name = "H100-PCIE"
    return specs.get(name) or specs.get(gpu)
