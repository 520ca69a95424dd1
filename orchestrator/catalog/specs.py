"""GPU spec table: VRAM, peak dense bf16 TFLOP/s, memory bandwidth, per canonical GPU name."""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

from pydantic import Field, StrictBool, model_validator

from orchestrator.datafile import DataModel, PositiveReal, display_path, read_yaml, validate

# RunPod's plain `Nx_H100_SECURE` is the PCIe card; its SXM and NVL types say so in the name.
_RUNPOD_H100_PCIE = re.compile(r"^\d+x_h100_")

SPECS_PATH = Path(__file__).parent / "data" / "gpu_specs.yaml"


class GpuSpec(DataModel):
    """One GPU of gpu_specs.yaml; `name` is its key there."""

    name: str
    vram_gb: PositiveReal
    bf16_tflops: PositiveReal     # peak dense; the fp16 tensor figure where bf16 is False
    memory_bandwidth_gbs: PositiveReal
    bf16: StrictBool
    # Peak fp32 (non-tensor) TFLOP/s: what the recipe trains at where there is no bf16, so the
    # planner prices those GPUs at it (contract/execution.py). Required where bf16 is False.
    fp32_tflops: Optional[PositiveReal] = None
    memory_variants_gb: tuple[PositiveReal, ...] = Field(min_length=1)
    source: str

    @model_validator(mode="before")
    @classmethod
    def _sold_in_one_size(cls, data: Any) -> Any:
        # Most GPUs are sold with one memory size, so the file lists variants only where there are several.
        if isinstance(data, dict) and "memory_variants_gb" not in data and "vram_gb" in data:
            return {**data, "memory_variants_gb": [data["vram_gb"]]}
        return data

    @model_validator(mode="after")
    def _fp32_rate_where_no_bf16(self) -> "GpuSpec":
        if not self.bf16 and self.fp32_tflops is None:
            raise ValueError("fp32_tflops is required where bf16 is false (the recipe trains in float32 there)")
        return self

    @property
    def max_vram_gb(self) -> float:
        return max(self.memory_variants_gb)


@lru_cache(maxsize=1)
def _load_specs() -> dict[str, GpuSpec]:
    """The bundled table, read once; a malformed entry is a one-line DataFileError naming GPU and field."""
    where = display_path(SPECS_PATH)
    entries = validate(read_yaml(SPECS_PATH), dict[str, dict], where)
    return {name: validate({**entry, "name": name}, GpuSpec, where, prefix=(name,)) for name, entry in entries.items()}


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
