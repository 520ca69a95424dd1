"""`spotune catalog`: list GPU offers (bundled snapshot + SkyPilot's catalog), cheapest GPU-hour first."""
from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Optional

import typer

from contract.errors import UserError
from orchestrator.commands import flags


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
    max_price: Optional[float] = typer.Option(None, "--max-price", callback=flags.price_per_hour, help="Only offers at most this many USD per instance-hour."),
    as_json: bool = typer.Option(False, "--json", help="Print the offers as JSON."),
    export_sky: Optional[Path] = typer.Option(None, "--export-sky", help="Also write the listed offers' prices into SkyPilot v8 catalogs, DIR/<cloud>/vms.csv: merged into a file that is there (every other row kept); a missing one is written only outside SkyPilot's own catalog dir."),
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
        from orchestrator.catalog.sky_export import export_catalogs

        try:
            export = export_catalogs(selected, export_sky)
        except OSError as e:
            raise UserError(f"cannot write SkyPilot catalogs to {export_sky}: {e.strerror or e}") from None
        for path in export.written:
            typer.echo(f"wrote {path}", err=True)
        for cloud, why in export.skipped.items():
            typer.echo(f"skipped {cloud}: {why}", err=True)
        for note in export.notes:
            typer.echo(note, err=True)
    if as_json:
        typer.echo(json.dumps({"snapshot_date": cat.snapshot_date(), "offers": [_to_json(o, spot) for o in selected]}, indent=2))
        return
    _print_table(selected, spot, cat.snapshot_date())


def _to_json(o, spot: bool) -> dict:
    from orchestrator.quote import money_json

    per_gpu = _per_gpu_hour(o, spot)
    return {
        "provider": o.provider, "region": o.region, "zone": o.zone, "instance_type": o.instance_type,
        "gpu": o.gpu, "gpu_count": o.gpu_count, "vram_gb_per_gpu": o.vram_gb_per_gpu,
        # Exact Decimal strings, as the catalog text has them (orchestrator.quote.money_json).
        "price_on_demand": money_json(o.price_on_demand),
        "price_spot": money_json(o.price_spot),
        "price_per_gpu_hour": money_json(per_gpu),
        "source": o.source, "read_on": o.read_on,
    }


def read_dates(offers) -> str:
    """When the listed prices were read, as the rows say it: one date, or the range. The snapshot's
    own date is when it was assembled, which says nothing about how old a row's price is."""
    dates = sorted({o.read_on for o in offers if o.read_on})
    if not dates:
        return "read dates unknown"
    return f"read {dates[0]}" if len(dates) == 1 else f"read {dates[0]} to {dates[-1]}"


def _print_table(offers, spot: bool, snapshot: str) -> None:
    from rich import box
    from rich.table import Table

    from orchestrator.commands import make_console
    from orchestrator.format import phrases, rate, region_label

    console = make_console()
    console.print(phrases([f"GPU offers ({len(offers):,}), cheapest {'spot' if spot else 'on-demand'} $/GPU-hour first;",
                           f"prices {read_dates(offers)}", f"(bundled snapshot assembled {snapshot})"],
                          console.width, sep=" "), highlight=False)
    # Narrow terminals drop the instance type (--json keeps it) rather than fold every figure.
    wide = console.width >= 110
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for name, justify in (("where", "left"), *((("instance", "left"),) if wide else ()), ("GPU", "left"),
                          ("GB", "right"), ("on-demand", "right"), ("spot", "right"), ("$/GPU-h", "right"),
                          ("read", "left")):
        table.add_column(name, justify=justify, overflow="fold", no_wrap=name not in ("where", "instance"),
                         min_width=12 if name == "where" else None)
    no_discount = 0
    for o in offers:
        # Some sources (RunPod's API, through SkyPilot's catalog) list a spot price equal to on-demand.
        same = o.price_spot is not None and o.price_spot == o.price_on_demand
        no_discount += same
        read = f"{o.read_on or '-'}{'' if o.source == 'bundled' else ' sky'}"
        table.add_row(f"{o.provider} {region_label(o.region)}", *((o.instance_type,) if wide else ()),
                      f"{o.gpu} x{o.gpu_count}", f"{o.vram_gb_per_gpu:g}", rate(o.price_on_demand),
                      rate(o.price_spot) + ("*" if same else ""), rate(_per_gpu_hour(o, spot)), read)
    console.print(table)
    if no_discount:
        console.print(f"* {no_discount:,} offers list a spot price equal to on-demand, as their source does "
                      "(no discount, and a spot instance can be preempted): the planner ranks the on-demand one first.",
                      highlight=False)


def register(app: typer.Typer) -> None:
    app.command("catalog")(catalog)
