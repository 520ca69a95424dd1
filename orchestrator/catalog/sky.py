"""Read SkyPilot's v8 price catalogs (`<dir>/<cloud>/vms.csv`); writing them is sky_export.py.

Columns are read by header name: their order differs per cloud. The per-cloud quirks handled
here are the ones in SkyPilot's own files (see tests/test_catalog.py, one test each):
RunPod GpuInfo memory in GB, Vast memory as the total across GPUs and SpotPrice 0.00 for "no
spot market", empty prices meaning "not offered", and GCP pricing a GPU VM as a host row plus
an accelerator row in the same zone (as sky/catalog/gcp_catalog.py does).
"""
from __future__ import annotations

import csv
import datetime as dt
import math
import re
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Optional

from orchestrator.catalog.specs import GpuSpec, gpu_specs
from contract.errors import UserError
from orchestrator.quote import Offer


class CatalogError(UserError):
    """A catalog file spotune cannot read."""


REQUIRED_COLUMNS = ("InstanceType", "AcceleratorName", "AcceleratorCount", "Price", "SpotPrice", "Region")

# Headers exactly as SkyPilot writes them; export uses the one for the offer's cloud.
SKY_HEADERS: dict[str, tuple[str, ...]] = {
    "lambda": ("InstanceType", "AcceleratorName", "AcceleratorCount", "vCPUs", "MemoryGiB", "Price", "Region", "GpuInfo", "SpotPrice"),
    "runpod": ("InstanceType", "AcceleratorName", "AcceleratorCount", "vCPUs", "MemoryGiB", "Region", "SpotPrice", "Price", "AvailabilityZone", "GpuInfo"),
    "vast": ("InstanceType", "AcceleratorName", "AcceleratorCount", "vCPUs", "MemoryGiB", "GpuInfo", "Price", "SpotPrice", "Region"),
    "nebius": ("InstanceType", "AcceleratorName", "AcceleratorCount", "vCPUs", "MemoryGiB", "Price", "Region", "GpuInfo", "SpotPrice"),
    "verda": ("InstanceType", "UpstreamCloudId", "vCPUs", "MemoryGiB", "AcceleratorName", "AcceleratorCount", "GpuInfo", "Region", "Price", "SpotPrice"),
    "aws": ("InstanceType", "AcceleratorName", "AcceleratorCount", "vCPUs", "MemoryGiB", "GpuInfo", "Price", "SpotPrice", "Region", "AvailabilityZone", "Arch"),
    "gcp": ("InstanceType", "vCPUs", "MemoryGiB", "AcceleratorName", "AcceleratorCount", "GpuInfo", "Region", "AvailabilityZone", "Price", "SpotPrice"),
    "azure": ("InstanceType", "AcceleratorName", "AcceleratorCount", "vCPUs", "MemoryGiB", "GpuInfo", "Price", "SpotPrice", "Region", "Generation"),
}
SKY_CLOUDS = tuple(SKY_HEADERS)

# GCP: which host VM carries which accelerator (sky/catalog/gcp_catalog.py _ACC_INSTANCE_TYPE_DICTS).
_GCP_HOSTS: dict[str, dict[int, tuple[str, ...]]] = {
    "A100": {1: ("a2-highgpu-1g",), 2: ("a2-highgpu-2g",), 4: ("a2-highgpu-4g",), 8: ("a2-highgpu-8g",), 16: ("a2-megagpu-16g",)},
    "A100-80GB": {1: ("a2-ultragpu-1g",), 2: ("a2-ultragpu-2g",), 4: ("a2-ultragpu-4g",), 8: ("a2-ultragpu-8g",)},
    "L4": {1: ("g2-standard-4", "g2-standard-8", "g2-standard-12", "g2-standard-16", "g2-standard-32"),
           2: ("g2-standard-24",), 4: ("g2-standard-48",), 8: ("g2-standard-96",)},
    "H100": {1: ("a3-highgpu-1g",), 2: ("a3-highgpu-2g",), 4: ("a3-highgpu-4g",), 8: ("a3-highgpu-8g",)},
    "H100-MEGA": {8: ("a3-megagpu-8g",)},
    "H200": {8: ("a3-ultragpu-8g",)},
    "B200": {8: ("a4-highgpu-8g",)},
    "RTXPRO6000": {1: ("g4-standard-48",), 2: ("g4-standard-96",), 4: ("g4-standard-192",), 8: ("g4-standard-384",)},
}
# Other GCP GPUs attach to an n1 host with at least this many vCPUs (and 4 GiB RAM per vCPU).
_GCP_N1_FAMILIES = ("n1-standard-", "n1-highmem-", "n1-highcpu-")
_GCP_N1_CPUS: dict[str, dict[int, int]] = {
    "K80": {1: 4, 2: 8, 4: 16, 8: 32, 16: 64},
    "V100": {1: 8, 2: 16, 4: 32, 8: 64},
    "T4": {1: 4, 2: 8, 4: 48},
    "P100": {1: 8, 2: 16, 4: 32, 8: 64},
    "DEFAULT": {1: 8, 2: 16, 4: 32, 8: 64, 16: 128},
}

# Both the Python-dict (single quotes) and the JSON (double quotes) spellings of GpuInfo.
_SIZE_IN_MIB = re.compile(r"""['"]SizeInMiB['"]\s*:\s*([0-9.]+)""")
# A per-GPU figure this far above every size a GPU is sold with is a catalog error, not a card.
_VRAM_TOLERANCE = 1.10


def _price(text: str, allow_zero: bool = False) -> Optional[Decimal]:
    """Parse a price exactly; empty means not offered. Zero means "no market" (Vast's spot
    column), never "free", except on GCP host rows where the GPU row carries the whole price."""
    text = text.strip()
    if not text:
        return None
    try:
        value = Decimal(text)
    except InvalidOperation:
        return None
    if not value.is_finite() or value < 0 or (value == 0 and not allow_zero):
        return None
    return value


def _shape(text: str) -> Optional[float]:
    """vCPUs or MemoryGiB; empty, unreadable or zero means unknown."""
    try:
        value = float(text) if text and text.strip() else 0.0
    except ValueError:
        return None
    return value if math.isfinite(value) and value > 0 else None


def _count(text: str) -> int:
    """GPUs per instance, written `8`, `8.0`; anything unreadable counts as none (row skipped)."""
    try:
        return int(float(text)) if text.strip() else 0
    except ValueError:
        return 0


def _vram_gb_per_gpu(cloud: str, gpu: str, gpu_count: int, gpu_info: str,
                     specs: dict[str, GpuSpec]) -> Optional[float]:
    spec = specs.get(gpu)
    match = _SIZE_IN_MIB.search(gpu_info) if gpu_info else None
    size = float(match.group(1)) if match else 0.0
    if size <= 0:
        return spec.vram_gb if spec else None
    # RunPod writes GB in the MiB field; no real GPU has under 1 GiB, so small figures are GB too.
    gb = size if (cloud == "runpod" or size < 1024) else size / 1024
    if cloud == "vast":
        gb /= gpu_count  # Vast's SizeInMiB is the total over all GPUs of the instance
    if spec is not None and gb > spec.max_vram_gb * _VRAM_TOLERANCE:
        gb = spec.max_vram_gb
    return round(gb, 2)


def _file_date(path: Path) -> str:
    return dt.datetime.fromtimestamp(path.stat().st_mtime, tz=dt.timezone.utc).date().isoformat()


def _rows(path: Path, gpu_only: bool = False) -> Iterable[dict[str, str]]:
    """Rows as {header: cell}; `gpu_only` drops rows without an AcceleratorName before building
    the dict (most of a big cloud's catalog is CPU instance types)."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            return
        names = [h.strip() for h in header]
        missing = [c for c in REQUIRED_COLUMNS if c not in names]
        if missing:
            raise CatalogError(f"{path}: not a SkyPilot vms.csv (no {', '.join(missing)} column)")
        width = len(names)
        accelerator = names.index("AcceleratorName")
        for row in reader:
            if not row or (gpu_only and (len(row) <= accelerator or not row[accelerator].strip())):
                continue
            if len(row) < width:
                row = row + [""] * (width - len(row))
            yield dict(zip(names, row))


def _plain_offers(cloud: str, path: Path) -> list[Offer]:
    return _rows_to_offers(cloud, _rows(path, gpu_only=True), gpu_specs(), str(path), _file_date(path))


def _gcp_offers(path: Path) -> list[Offer]:
    """GCP lists GPUs apart from their host VM: price = accelerator row + host row, same zone."""
    specs = gpu_specs()
    source, read_on = str(path), _file_date(path)
    hosts: dict[tuple[str, str], list[tuple[str, float, float, Optional[Decimal], Optional[Decimal]]]] = {}
    accelerators = []
    offers = []
    for row in _rows(path):
        instance = row.get("InstanceType", "").strip()
        gpu = row.get("AcceleratorName", "").strip()
        region, zone = row.get("Region", "").strip(), row.get("AvailabilityZone", "").strip()
        if not instance:
            if gpu and not gpu.lower().startswith("tpu-"):
                accelerators.append(row)
            continue
        if gpu:  # a VM row that carries its GPU itself: priced as on every other cloud
            offers.extend(_rows_to_offers("gcp", [row], specs, source, read_on))
            continue
        hosts.setdefault((region, zone), []).append((
            instance, float(row.get("vCPUs") or 0), float(row.get("MemoryGiB") or 0),
            _price(row.get("Price", ""), allow_zero=True), _price(row.get("SpotPrice", ""), allow_zero=True)))
    for row in accelerators:
        gpu = row["AcceleratorName"].strip()
        count = _count(row.get("AcceleratorCount", ""))
        region, zone = row.get("Region", "").strip(), row.get("AvailabilityZone", "").strip()
        host = _gcp_host(gpu, count, hosts.get((region, zone), ()))
        gpu_price = _price(row.get("Price", ""))
        if host is None or gpu_price is None:
            continue  # SkyPilot cannot launch it there either
        instance, host_vcpus, host_memory, host_price, host_spot = host
        gpu_spot = _price(row.get("SpotPrice", ""))
        spot = gpu_spot + host_spot if gpu_spot is not None and host_spot is not None else None
        vram = _vram_gb_per_gpu("gcp", gpu, count, row.get("GpuInfo", ""), specs)
        if vram is None:
            continue
        offers.append(Offer(
            provider="gcp", region=region, instance_type=instance, gpu=gpu, gpu_count=count,
            vram_gb_per_gpu=vram, price_on_demand=gpu_price + host_price, price_spot=spot,
            zone=zone or None, source=source, read_on=read_on,
            vcpus=host_vcpus or None, memory_gib=host_memory or None,
        ))
    return offers


def _gcp_host(gpu: str, count: int, candidates):
    """The cheapest host VM in the zone that SkyPilot would pair with `count` x `gpu`."""
    if gpu in _GCP_HOSTS:
        names = _GCP_HOSTS[gpu].get(count, ())
        fitting = [h for h in candidates if h[0] in names]
    else:
        cpus = _GCP_N1_CPUS.get(gpu, _GCP_N1_CPUS["DEFAULT"]).get(count)
        if cpus is None:
            return None
        fitting = [h for h in candidates
                   if h[0].startswith(_GCP_N1_FAMILIES) and h[1] >= cpus and h[2] >= 4 * cpus]
    fitting = [h for h in fitting if h[3] is not None]
    return min(fitting, key=lambda h: h[3]) if fitting else None


def _rows_to_offers(cloud, rows, specs, source, read_on) -> list[Offer]:
    """Rows that name their GPU and price the whole instance (every cloud but GCP's a2/a3)."""
    out = []
    for row in rows:
        gpu, count = row["AcceleratorName"].strip(), _count(row.get("AcceleratorCount", ""))
        on_demand, spot = _price(row.get("Price", "")), _price(row.get("SpotPrice", ""))
        if count <= 0 or (on_demand is None and spot is None):
            continue
        vram = _vram_gb_per_gpu(cloud, gpu, count, row.get("GpuInfo", ""), specs)
        if vram is None:
            continue  # neither the catalog nor the spec table knows its memory: cannot plan on it
        out.append(Offer(provider=cloud, region=row.get("Region", "").strip(), instance_type=row["InstanceType"].strip(),
                         gpu=gpu, gpu_count=count, vram_gb_per_gpu=vram, price_on_demand=on_demand,
                         price_spot=spot, zone=row.get("AvailabilityZone", "").strip() or None,
                         source=source, read_on=read_on, vcpus=_shape(row.get("vCPUs", "")),
                         memory_gib=_shape(row.get("MemoryGiB", ""))))
    return out


@lru_cache(maxsize=64)
def _read_vms_csv_cached(path: str, cloud: str, mtime_ns: int, size: int) -> tuple[Offer, ...]:
    del mtime_ns, size  # cache key only: a rewritten file is read again
    p = Path(path)
    return tuple(_gcp_offers(p) if cloud == "gcp" else _plain_offers(cloud, p))


def read_vms_csv(path: Path, cloud: str) -> tuple[Offer, ...]:
    """GPU offers from one SkyPilot `vms.csv`; cached until the file changes."""
    st = Path(path).stat()
    return _read_vms_csv_cached(str(path), cloud, st.st_mtime_ns, st.st_size)


def sky_catalog_files(catalog_dir: Path) -> tuple[tuple[str, str, int, int], ...]:
    """(cloud, path, mtime_ns, size) for every `<cloud>/vms.csv` under the dir: a cache key."""
    catalog_dir = Path(catalog_dir)
    if not catalog_dir.is_dir():
        return ()
    files = []
    for cloud_dir in sorted(catalog_dir.iterdir()):
        vms = cloud_dir / "vms.csv"
        if vms.is_file():
            st = vms.stat()
            files.append((cloud_dir.name, str(vms), st.st_mtime_ns, st.st_size))
    return tuple(files)


def read_sky_catalog(catalog_dir: Path) -> tuple[Offer, ...]:
    """Every `<cloud>/vms.csv` under a SkyPilot v8 catalog dir; empty when there is none."""
    return read_sky_catalog_files(sky_catalog_files(catalog_dir))


def read_sky_catalog_files(files: tuple[tuple[str, str, int, int], ...]) -> tuple[Offer, ...]:
    offers: list[Offer] = []
    for cloud, path, mtime_ns, size in files:
        offers.extend(_read_vms_csv_cached(path, cloud, mtime_ns, size))
    return tuple(offers)
