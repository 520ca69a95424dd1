"""Write offers into SkyPilot v8 catalogs (`<dir>/<cloud>/vms.csv`) so SkyPilot prices what the planner priced.

SkyPilot reads one catalog directory (sky/catalog/common.py, read_catalog): it downloads a cloud's
vms.csv only when the file is missing, and never overwrites a file it did not fetch itself (its
md5 in `.meta` no longer matches). A vms.csv is also everything SkyPilot knows about that cloud:
its CPU instance types too, where it places the jobs controller (4+ vCPUs, 4x memory:
sky/jobs/constants.py). So an export never leaves a partial catalog there:
- into a vms.csv that exists, the offers' prices are merged: each offer updates the rows of its
  instance type and region (and zone, where it has one) and every other row stays as it was, so
  the controller's instance types and every GPU the export did not list keep their prices;
- a cloud whose vms.csv is missing is written fresh only outside SkyPilot's own catalog
  directory (for reading, or for a directory of its own); there it would hide the whole
  catalog SkyPilot has yet to download, so it is skipped with a warning saying what to run.
GCP lists a GPU apart from the host VM it attaches to (host row + accelerator row, per zone): a
merge updates the accelerator row, priced as the offer minus that zone's host, and keeps the host
row, which other GPUs and the CPU-only uses of that VM share.
"""
from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Iterable, Optional

from orchestrator.catalog.sky import SKY_HEADERS
from orchestrator.quote import Offer

log = logging.getLogger(__name__)
_GENERIC_HEADER = SKY_HEADERS["aws"][:-1]


@dataclass(frozen=True)
class Export:
    written: list[Path]                 # files written fresh or merged into
    skipped: dict[str, str] = field(default_factory=dict)   # cloud -> why nothing was written for it
    notes: list[str] = field(default_factory=list)          # offers a merge could not price, in words


def export_sky(offers: Iterable[Offer], out_dir: Path, *, skypilots_dir: Optional[Path] = None) -> list[Path]:
    """export_catalogs, with what it skipped logged as warnings; returns the files written."""
    export = export_catalogs(offers, out_dir, skypilots_dir=skypilots_dir)
    for cloud, why in export.skipped.items():
        log.warning("skipped %s: %s", cloud, why)
    for note in export.notes:
        log.warning("%s", note)
    return export.written


def export_catalogs(offers: Iterable[Offer], out_dir: Path, *, skypilots_dir: Optional[Path] = None) -> Export:
    """Write or merge the offers into `<out_dir>/<provider>/vms.csv`.

    SkyPilot cannot launch an instance type whose vCPUs/MemoryGiB it does not know (its catalog
    code asserts on them), so offers without both are left out, with one counted note. Each
    file is written to a temporary name and renamed, so a failed export leaves no half file.
    `skypilots_dir`: SkyPilot's own catalog directory (default ${SKY_RUNTIME_DIR:-$HOME}/.sky/catalogs/v8)."""
    by_cloud: dict[str, list[Offer]] = {}
    shapeless: dict[str, int] = {}
    for o in offers:
        if o.vcpus is None or o.memory_gib is None:
            shapeless[o.provider] = shapeless.get(o.provider, 0) + 1
            continue
        by_cloud.setdefault(o.provider, []).append(o)
    export = Export(written=[])
    if shapeless:
        counts = ", ".join(f"{n} {cloud}" for cloud, n in sorted(shapeless.items()))
        export.notes.append(f"skipped {sum(shapeless.values())} offer(s) with no vCPUs/MemoryGiB, which SkyPilot "
                            f"needs to launch them ({counts})")
    into_skypilots = _same_dir(Path(out_dir), skypilots_dir)
    for cloud, cloud_offers in sorted(by_cloud.items()):
        target = Path(out_dir) / cloud / "vms.csv"
        if target.exists():
            header, rows = _read(target)
            if cloud == "gcp":
                rows, unpriced = _merge_gcp(header, rows, cloud_offers)
                if unpriced:
                    export.notes.append(f"left {unpriced} gcp offer(s) at SkyPilot's price: the host VM row of "
                                        "their zone is missing or costs more than the offer")
            else:
                rows = _merge(cloud, header, rows, cloud_offers)
        elif into_skypilots:
            export.skipped[cloud] = (f"SkyPilot has not downloaded its {cloud} catalog yet, and a file holding only "
                                     "these offers would stop it from ever fetching the whole one (its jobs "
                                     f"controller's instance types are there); run `sky gpus list --cloud {cloud}` "
                                     "once, then export again")
            continue
        else:
            header = list(SKY_HEADERS.get(cloud, _GENERIC_HEADER))
            rows = _gcp_rows(cloud_offers) if cloud == "gcp" else [_row(cloud, o) for o in cloud_offers]
        _write(target, header, rows)
        export.written.append(target)
    return export


def _same_dir(out_dir: Path, skypilots_dir: Optional[Path]) -> bool:
    if skypilots_dir is None:
        root = os.environ.get("SKY_RUNTIME_DIR") or str(Path.home())
        skypilots_dir = Path(root).expanduser() / ".sky" / "catalogs" / "v8"
    return out_dir.expanduser().resolve() == Path(skypilots_dir).expanduser().resolve()


# --- rows ----------------------------------------------------------------------------------

def _gpu_info(cloud: str, offer: Offer) -> str:
    per_gpu_mib = offer.vram_gb_per_gpu * 1024
    if cloud == "runpod":
        size = offer.vram_gb_per_gpu          # RunPod's field holds GB
    elif cloud == "vast":
        size = per_gpu_mib * offer.gpu_count  # Vast's holds the total
    else:
        size = per_gpu_mib
    size_text = str(int(size)) if float(size).is_integer() else repr(round(size, 4))
    total = offer.vram_gb_per_gpu * offer.gpu_count * (1 if cloud == "runpod" else 1024)
    total_text = str(int(total)) if float(total).is_integer() else repr(round(total, 4))
    gpus = f"[{{'Name': '{offer.gpu}', 'Count': {offer.gpu_count}, 'MemoryInfo': {{'SizeInMiB': {size_text}}}}}]"
    text = f"{{'Gpus': {gpus}, 'TotalGpuMemoryInMiB': {total_text}}}"
    return text.replace("'", '"') if cloud == "verda" else text


def _text(value: Optional[Decimal], none: str = "") -> str:
    return none if value is None else str(value)


def _shape_text(value: Optional[float]) -> str:
    return "" if value is None else str(float(value))  # SkyPilot writes 48.0, 1900.0


def _spot_text(cloud: str, value: Optional[Decimal]) -> str:
    # Vast marks "no spot market" as 0.00; every other cloud leaves the cell empty.
    return _text(value, none="0.00" if cloud == "vast" else "")


def _row(cloud: str, offer: Offer) -> dict[str, str]:
    return {
        "InstanceType": offer.instance_type, "UpstreamCloudId": offer.instance_type,
        "AcceleratorName": offer.gpu, "AcceleratorCount": str(offer.gpu_count),
        "vCPUs": _shape_text(offer.vcpus), "MemoryGiB": _shape_text(offer.memory_gib),
        "GpuInfo": _gpu_info(cloud, offer),
        "Price": _text(offer.price_on_demand), "SpotPrice": _spot_text(cloud, offer.price_spot),
        "Region": offer.region, "AvailabilityZone": offer.zone or "",
        "Arch": "arm64" if offer.instance_type.startswith(("g5g.", "c7g.", "m7g.")) else "x86_64",
        "Generation": "",
    }


def _gcp_rows(offers: list[Offer]) -> list[dict[str, str]]:
    """A GCP offer becomes a host row priced 0 plus an accelerator row with the whole price,
    so host + accelerator (how SkyPilot and this reader price it) is the offer's price. The host
    row carries the host VM's own vCPUs/MemoryGiB (SkyPilot pairs n1 hosts with GPUs by them)."""
    hosts: dict[tuple[str, str, str], dict[str, str]] = {}
    accelerators = []
    for o in offers:
        key = (o.instance_type, o.region, o.zone or "")
        hosts.setdefault(key, {"InstanceType": o.instance_type, "vCPUs": _shape_text(o.vcpus),
                               "MemoryGiB": _shape_text(o.memory_gib), "Region": o.region,
                               "AvailabilityZone": o.zone or "", "Price": "0",
                               "SpotPrice": "0" if o.price_spot is not None else ""})
        accelerators.append(_gcp_accelerator_row(o, o.price_on_demand, o.price_spot))
    return sorted(hosts.values(), key=lambda h: (h["InstanceType"], h["Region"], h["AvailabilityZone"])) + accelerators


def _gcp_accelerator_row(o: Offer, price: Optional[Decimal], spot: Optional[Decimal]) -> dict[str, str]:
    return {"AcceleratorName": o.gpu, "AcceleratorCount": str(o.gpu_count), "GpuInfo": _gpu_info("gcp", o),
            "Region": o.region, "AvailabilityZone": o.zone or "", "Price": _text(price), "SpotPrice": _text(spot)}


# --- merging into a whole catalog ----------------------------------------------------------

def _read(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), [dict(row) for row in reader]


def _write(target: Path, header: list[str], rows: list[dict[str, str]]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=header, extrasaction="ignore", restval="")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(target)


def _at(row: dict[str, str], o: Offer) -> bool:
    """The row is this offer's place: same region, and the same zone where the offer names one."""
    return row.get("Region", "").strip() == o.region and (not o.zone or row.get("AvailabilityZone", "").strip() == o.zone)


def _count(text: str) -> Optional[int]:
    try:
        return int(float(text))
    except (TypeError, ValueError):
        return None


def _merge(cloud: str, header: list[str], rows: list[dict[str, str]], offers: list[Offer]) -> list[dict[str, str]]:
    for o in offers:
        mine = [r for r in rows if r.get("InstanceType", "").strip() == o.instance_type and _at(r, o)]
        for r in mine:
            r["Price"], r["SpotPrice"] = _text(o.price_on_demand), _spot_text(cloud, o.price_spot)
        if not mine:
            rows.append(_row(cloud, o))
    return rows


def _decimal(text: str) -> Optional[Decimal]:
    try:
        return Decimal(text.strip()) if text and text.strip() else None
    except InvalidOperation:
        return None


def _merge_gcp(header: list[str], rows: list[dict[str, str]], offers: list[Offer]) -> tuple[list[dict[str, str]], int]:
    def host_of(o: Offer, zone: str) -> Optional[dict[str, str]]:
        return next((r for r in rows if r.get("InstanceType", "").strip() == o.instance_type
                     and not r.get("AcceleratorName", "").strip() and r.get("Region", "").strip() == o.region
                     and r.get("AvailabilityZone", "").strip() == zone), None)

    unpriced = 0
    for o in offers:
        vm_rows = [r for r in rows if r.get("InstanceType", "").strip() == o.instance_type
                   and r.get("AcceleratorName", "").strip() == o.gpu and _at(r, o)]
        if vm_rows:  # a VM that carries its GPU itself (g2, a2, a3...): priced whole, as on other clouds
            for r in vm_rows:
                r["Price"], r["SpotPrice"] = _text(o.price_on_demand), _text(o.price_spot)
            continue
        accelerator_rows = [r for r in rows if not r.get("InstanceType", "").strip()
                            and r.get("AcceleratorName", "").strip() == o.gpu
                            and _count(r.get("AcceleratorCount", "")) == o.gpu_count and _at(r, o)]
        priced = 0
        for r in accelerator_rows:
            host = host_of(o, r.get("AvailabilityZone", "").strip())
            host_price = _decimal(host.get("Price", "")) if host else None
            host_spot = _decimal(host.get("SpotPrice", "")) if host else None
            if host_price is None or o.price_on_demand is None or o.price_on_demand < host_price:
                continue
            r["Price"] = _text(o.price_on_demand - host_price)
            r["SpotPrice"] = (_text(o.price_spot - host_spot) if o.price_spot is not None and host_spot is not None
                              and o.price_spot >= host_spot else "")
            priced += 1
        if accelerator_rows:
            unpriced += not priced
            continue
        host = host_of(o, o.zone or "")
        if host is None:  # new to this catalog: a host row of its own, priced 0, carries the shape
            rows.append({"InstanceType": o.instance_type, "vCPUs": _shape_text(o.vcpus),
                         "MemoryGiB": _shape_text(o.memory_gib), "Region": o.region,
                         "AvailabilityZone": o.zone or "", "Price": "0", "SpotPrice": "0"})
            rows.append(_gcp_accelerator_row(o, o.price_on_demand, o.price_spot))
            continue
        host_price, host_spot = _decimal(host.get("Price", "")), _decimal(host.get("SpotPrice", ""))
        if host_price is None or o.price_on_demand is None or o.price_on_demand < host_price:
            unpriced += 1
            continue
        spot = o.price_spot - host_spot if o.price_spot is not None and host_spot is not None and o.price_spot >= host_spot else None
        rows.append(_gcp_accelerator_row(o, o.price_on_demand - host_price, spot))
    return rows, unpriced
