"""`spotune calibrate`: fit the speed, setup and checkpoint-write models to the runs in the ledger,
over the shipped calibration, and write the fit to `<state dir>/calibration.json`, which `plan` and `launch` then use.
"""
from __future__ import annotations

import json

import typer


def calibrate_command(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Print the fit as one JSON object."),
) -> None:
    """Fit tokens/s, start-up time and checkpoint write rate to your ledger's runs; plans use the fit from then on."""
    from orchestrator.calibrate import checkpoint_writes_from_ledger, fit, measurements_from_ledger, write_fit
    from orchestrator.commands import make_console
    from orchestrator.estimate import load_calibration
    from orchestrator.settings import global_options

    options = global_options(ctx)
    opened = options.existing_ledger()
    cal = load_calibration()
    measurements, skipped, writes = [], [], []
    if opened is not None:
        with opened as ledger:
            measurements, skipped = measurements_from_ledger(ledger, cal)
            writes = checkpoint_writes_from_ledger(ledger)
    data = fit(measurements, cal, writes)
    path = write_fit(options.state_path(), {**data, "skipped": skipped})
    if as_json:
        typer.echo(json.dumps({**data, "skipped": skipped, "path": str(path)}))
        return
    console = make_console()
    console.print(f"{len(measurements)} finished attempt(s) in the {options.ledger_label()}", markup=False)
    for f in data["speed"]:
        error = f["error_factor"]
        spread = f"±{(error - 1) * 100:.0f} %" if error < 1.5 else f"x/÷ {error:.3g}"
        console.print(f"  {f['device']} {f['method']} speed: {f['runs']} run(s), measured = {f['factor']:.4g} x the "
                      f"shipped prediction, {spread}" + (f", {f['outliers']} outlier(s) left out" if f["outliers"] else ""),
                      markup=False)
    for kind, f in data["setup"].items():
        what = "start-up (without model load)" if kind == "local" else "setup"
        console.print(f"  {kind} {what}: {f['seconds']:.1f} s over {f['runs']} run(s), x/÷ {f['error_factor']:.3g}",
                      markup=False)
    for kind, f in data["checkpoint"].items():
        where = "local disk" if kind == "local" else "cloud node"
        console.print(f"  {kind} checkpoint writes ({where}): {f['gb_per_s']:.3g} GB/s over {f['writes']} write(s), "
                      f"x/÷ {f['error_factor']:.3g}" + (f", {f['outliers']} outlier(s) left out" if f["outliers"] else ""),
                      markup=False)
    for o in data["checkpoint_outliers"]:
        console.print(f"  outlier: {o['job']} attempt {o['attempt']} checkpoint at step {o['step']} wrote at "
                      f"{o['gb_per_s']:.3g} GB/s against the fit's {o['fit']:.3g}", markup=False)
    for o in data["outliers"]:
        console.print(f"  outlier: {o['job']} attempt {o['attempt']} ({o['device']} {o['method']}) ran at "
                      f"{o['measured_over_predicted']:g} x the prediction against the fit's {o['fit']:g}", markup=False)
    for why in skipped:
        console.print(f"  skipped {why}", markup=False, style="dim")
    console.print(f"wrote {path}", markup=False)


def register(app: typer.Typer) -> None:
    app.command("calibrate")(calibrate_command)
