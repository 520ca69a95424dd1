"""`spotune catalog`: list GPU offers (bundled snapshot + SkyPilot's catalog), cheapest GPU-hour first."""
from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Optional

import typer

from contract.errors import UserError


class CatalogFilterError(UserError):
    """A filter names a GPU or provider the catalog does not know."""


def _per_gpu_hour(offer, spot_only: bool) -> Optional[Decimal]:
    price = offer.price_spot if spot_only else (offer.price_on_demand or offer.price_spot)
    return None if price is None else price / offer.gpu_count


def _check_known(kind: str, wanted: Optional[str], known: set[str]) -> Optional[str]:
    """Case-insensitive match against known names; a one-line error listing them otherwise."""
    if wanted is None:
        return None
    by_lower = {k.lower(): k for k in known}
    if wanted.lower() not in by_lower:
        raise CatalogFilterError(f"unknown {kind} {wanted!r}; known: {', '.join(sorted(known, key=str.lower))}")
    return by_lower[wanted.lower()]


def catalog(
    gpu: Optional[str] = typer.Option(None, "--gpu", help="Only this GPU (SkyPilot name: H100, A100-80GB, L40S, ...)."),
    provider: Optional[str] = typer.Option(None, "--provider", help="Only this provider (aws, gcp, azure, lambda, runpod, vast, nebius, verda, ...)."),
    spot: bool = typer.Option(False, "--spot", help="Only offers with a spot price, ranked by it."),
    region: Optional[str] = typer.Option(None, "--region", help="Only this region (exact, as the provider names it)."),
    max_price: Optional[float] = typer.Option(None, "--max-price", min=0, help="Only offers at most this many USD per instance-hour."),
    as_json: bool = typer.Option(False, "--json", help="Print the offers as JSON."),
    export_sky: Optional[Path] = typer.Option(None, "--export-sky", help="Also write the listed offers as SkyPilot v8 catalogs: DIR/<cloud>/vms.csv."),
    sky_catalog: Optional[Path] = typer.Option(None, "--sky-catalog", help="SkyPilot v8 catalog dir (default ${SKY_RUNTIME_DIR:-$HOME}/.sky/catalogs/v8)."),
    no_sky: bool = typer.Option(False, "--no-sky", help="Use only the bundled snapshot."),
) -> None:
    """List GPU offers, cheapest $/GPU-hour first, with where each price comes from."""
    from orchestrator import catalog as cat

    offers = cat.load_offers(sky_catalog, include_sky=not no_sky)
    gpu = _check_known("GPU", gpu, {o.gpu for o in offers})
    provider = _check_known("provider", provider, {o.provider for o in offers})
    selected = []
    for o in offers:
        if (gpu and o.gpu != gpu) or (provider and o.provider != provider) or (region and o.region != region):
            continue
        price = o.price_spot if spot else (o.price_on_demand or o.price_spot)
        if price is None or (max_price is not None and price > Decimal(str(max_price))):
            continue
        selected.append(o)
    selected.sort(key=lambda o: (_per_gpu_hour(o, spot), o.provider, o.region, o.instance_type))

    if export_sky is not None:
        try:
            written = cat.export_sky(selected, export_sky)
        except OSError as e:
            raise UserError(f"cannot write SkyPilot catalogs to {export_sky}: {e.strerror or e}") from None
        for path in written:
            typer.echo(f"wrote {path}", err=True)
    if as_json:
        typer.echo(json.dumps({"snapshot_date": cat.snapshot_date(), "offers": [_to_json(o, spot) for o in selected]}, indent=2))
        return
    _print_table(selected, spot, cat.snapshot_date())


def _to_json(o, spot: bool) -> dict:
    per_gpu = _per_gpu_hour(o, spot)
    return {
        "provider": o.provider, "region": o.region, "zone": o.zone, "instance_type": o.instance_type,
        "gpu": o.gpu, "gpu_count": o.gpu_count, "vram_gb_per_gpu": o.vram_gb_per_gpu,
        "price_on_demand": None if o.price_on_demand is None else float(o.price_on_demand),
        "price_spot": None if o.price_spot is None else float(o.price_spot),
        "price_per_gpu_hour": None if per_gpu is None else float(per_gpu),
        "source": o.source, "read_on": o.read_on,
    }


def _print_table(offers, spot: bool, snapshot: str) -> None:
    from rich.table import Table

    from orchestrator.commands import make_console
    from orchestrator.format import rate

    table = Table(title=f"GPU offers ({len(offers)}), {'spot' if spot else 'on-demand'} $/GPU-h, bundled snapshot {snapshot}")
    for name, justify in (("provider", "left"), ("region", "left"), ("instance", "left"), ("GPU", "left"),
                          ("VRAM GB", "right"), ("on-demand $/h", "right"), ("spot $/h", "right"),
                          ("$/GPU-h", "right"), ("source / read", "left")):
        table.add_column(name, justify=justify)
    for o in offers:
        source = "bundled" if o.source == "bundled" else f"sky {Path(o.source).parent.name}"
        table.add_row(o.provider, o.region, o.instance_type, f"{o.gpu} x{o.gpu_count}", f"{o.vram_gb_per_gpu:g}",
                      rate(o.price_on_demand), rate(o.price_spot), rate(_per_gpu_hour(o, spot)),
                      f"{source} {o.read_on or ''}".strip())
    make_console().print(table)


def register(app: typer.Typer) -> None:
    app.command("catalog")(catalog)
