"""GPU offers and managed fine-tuning prices: a bundled dated snapshot plus SkyPilot's catalog.

Public API (docs/contracts.md):
    load_offers(sky_catalog_dir=None, include_sky=True) -> list[Offer]
    load_managed_prices() -> list[ManagedPrice]
    managed_quotes(params, method, total_tokens) -> list[ManagedQuote]
    gpu_specs() -> dict[str, GpuSpec]
    snapshot_date() -> str
    export_sky(offers, out_dir) -> list[Path]

Loading is cached by (path, mtime), so planning over thousands of offers stays fast.
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Optional

from orchestrator.catalog.managed import ManagedPrice, load_managed_prices, managed_quotes
from orchestrator.catalog.sky import SKY_CLOUDS, read_sky_catalog, read_sky_catalog_files, sky_catalog_files
from orchestrator.catalog.sky_export import export_sky
from orchestrator.catalog.snapshot import load_snapshot, snapshot_date, snapshot_signature
from orchestrator.catalog.specs import GpuSpec, gpu_specs
from orchestrator.quote import Offer

__all__ = [
    "GpuSpec", "ManagedPrice", "Offer", "SKY_CLOUDS", "default_sky_catalog_dir", "export_sky",
    "gpu_specs", "load_managed_prices", "load_offers", "managed_quotes", "read_sky_catalog",
    "snapshot_date",
]


def default_sky_catalog_dir() -> Path:
    """Where SkyPilot keeps its downloaded catalogs: ${SKY_RUNTIME_DIR:-$HOME}/.sky/catalogs/v8."""
    root = os.environ.get("SKY_RUNTIME_DIR") or str(Path.home())
    return Path(root).expanduser() / ".sky" / "catalogs" / "v8"


def load_offers(sky_catalog_dir: Optional[Path] = None, include_sky: bool = True) -> list[Offer]:
    """The bundled snapshot, overlaid with SkyPilot's catalog where it is present.

    Offers are keyed by (provider, region, instance_type): when SkyPilot lists that key at all,
    its rows replace every bundled row for it (SkyPilot's catalog is the fresher of the two).
    Cached until a catalog file changes; each call returns a new list of the same offers.
    """
    if not include_sky:
        return list(load_snapshot())
    sky_dir = Path(sky_catalog_dir) if sky_catalog_dir is not None else default_sky_catalog_dir()
    return list(_merged(sky_catalog_files(sky_dir), snapshot_signature()))


@lru_cache(maxsize=8)
def _merged(sky_files: tuple, bundled_signature: tuple) -> tuple[Offer, ...]:
    del bundled_signature  # cache key only
    bundled = load_snapshot()
    sky_offers = read_sky_catalog_files(sky_files)
    if not sky_offers:
        return bundled
    sky_keys = {(o.provider, o.region, o.instance_type) for o in sky_offers}
    kept = tuple(o for o in bundled if (o.provider, o.region, o.instance_type) not in sky_keys)
    return kept + sky_offers
