"""The bundled, dated price snapshot: `data/offers.csv` (one row per offer, with its source and
the date its price was read) and `data/snapshot.yaml` (the snapshot's date and provenance)."""
from __future__ import annotations

import csv
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Optional

import yaml

from orchestrator.quote import Offer

DATA_DIR = Path(__file__).parent / "data"
OFFERS_PATH = DATA_DIR / "offers.csv"
SNAPSHOT_META_PATH = DATA_DIR / "snapshot.yaml"
COLUMNS = ("provider", "region", "zone", "instance_type", "gpu", "gpu_count", "vram_gb_per_gpu",
           "price_on_demand", "price_spot", "source", "read_on", "vcpus", "memory_gib")


def _decimal(text: str) -> Optional[Decimal]:
    text = text.strip()
    return Decimal(text) if text else None


def _float(text: Optional[str]) -> Optional[float]:
    text = (text or "").strip()
    return float(text) if text else None


@lru_cache(maxsize=4)
def _read(path: str, mtime_ns: int) -> tuple[tuple[Offer, ...], tuple[str, ...]]:
    del mtime_ns  # cache key only
    offers, sources = [], []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            offers.append(Offer(
                provider=row["provider"], region=row["region"], instance_type=row["instance_type"],
                gpu=row["gpu"], gpu_count=int(row["gpu_count"]), vram_gb_per_gpu=float(row["vram_gb_per_gpu"]),
                price_on_demand=_decimal(row["price_on_demand"]), price_spot=_decimal(row["price_spot"]),
                zone=row["zone"] or None, source="bundled", read_on=row["read_on"],
                vcpus=_float(row.get("vcpus")), memory_gib=_float(row.get("memory_gib")),
            ))
            sources.append(row["source"])
    return tuple(offers), tuple(sources)


def load_snapshot(path: Path = OFFERS_PATH) -> tuple[Offer, ...]:
    """The bundled offers; Offer.source is "bundled" (the row's own source is in the CSV)."""
    return _read(str(path), Path(path).stat().st_mtime_ns)[0]


def snapshot_signature(path: Path = OFFERS_PATH) -> tuple[str, int]:
    return str(path), Path(path).stat().st_mtime_ns


def snapshot_rows(path: Path = OFFERS_PATH) -> list[tuple[Offer, str]]:
    """Each bundled offer with the source its price was read from."""
    offers, sources = _read(str(path), Path(path).stat().st_mtime_ns)
    return list(zip(offers, sources))


@lru_cache(maxsize=1)
def _meta() -> dict:
    return yaml.safe_load(SNAPSHOT_META_PATH.read_text(encoding="utf-8"))


def snapshot_date() -> str:
    """ISO date the bundled snapshot was assembled (no price in it was read later)."""
    return str(_meta()["snapshot_date"])


def write_snapshot(rows: Iterable[tuple[Offer, str]], path: Path = OFFERS_PATH) -> None:
    """Write (offer, source) rows in the bundled format; used to refresh the snapshot."""
    tmp = Path(path).with_suffix(".csv.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(COLUMNS)
        for o, source in rows:
            writer.writerow([o.provider, o.region, o.zone or "", o.instance_type, o.gpu, o.gpu_count,
                             f"{o.vram_gb_per_gpu:g}", "" if o.price_on_demand is None else str(o.price_on_demand),
                             "" if o.price_spot is None else str(o.price_spot), source, o.read_on or "",
                             "" if o.vcpus is None else f"{o.vcpus:g}",
                             "" if o.memory_gib is None else f"{o.memory_gib:g}"])
    tmp.replace(path)
