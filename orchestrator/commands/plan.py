"""`spotune plan SPEC.yaml`: price the job on every GPU offer, spot and on-demand, and on managed APIs.

`--diff B.yaml` prints only what B changes (both plans are computed, neither is printed whole);
with `--json` the diff is the plan object's `diff` member (docs/json.md).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer

from orchestrator.format import (count, hours, percent_change, phrases, rate_exact, region_label, usd, usd_exact,
                                 usd_signed)

DEFAULT_TOP = 10
SHOW_REJECTED = 5


def _load(spec_path: Path, backend=None, price_per_hour: Optional[float] = None, calibration=None):
    """The spec and its plan: for `backend` exactly as `spotune launch` plans it (this machine at
    its hourly price, for local and ray), else every catalog offer ranked. `calibration`: with the
    ledger's fit where `spotune calibrate` wrote one."""
    from contract.spec import load_spec

    spec = load_spec(spec_path)
    if backend is not None:
        from orchestrator.jobs import make_job_plan

        plan = make_job_plan(spec, backend, price_per_hour, calibration)
        if backend.pricing == "catalog" and spec.constraints.max_nodes > 1 and "nodes" not in plan.assumptions:
            from dataclasses import replace

            from orchestrator.planner import explain_nodes

            # The backend could not launch the planner's best: say why its own best spans the nodes it does.
            plan = replace(plan, assumptions={**plan.assumptions, "nodes": explain_nodes(spec, plan.best, calibration)})
        return spec, plan
    from orchestrator.catalog import load_managed_prices, load_offers
    from orchestrator.planner import make_plan

    return spec, make_plan(spec, load_offers(), load_managed_prices(), calibration)


def _gpu(o) -> str:
    """H100 x8, or on several nodes: H100 x8 x 2 nodes (an Option or a Rejected)."""
    return f"{o.offer.gpu} x{o.offer.gpu_count}" + (f" x {o.num_nodes} nodes" if o.num_nodes > 1 else "")


def _scaling_notes(gpu_count: int, num_nodes: int) -> list[str]:
    from orchestrator.estimate import load_calibration
    from orchestrator.estimate.scaling import assumption_notes

    return assumption_notes(gpu_count, num_nodes, load_calibration())


def _headline(plan) -> str:
    return (f"{plan.job}: {plan.model_name} ({count(plan.params)} parameters) {plan.method}, "
            f"{plan.total_tokens:,} tokens")


def _table(**kw):
    from rich import box
    from rich.table import Table

    return Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True, title_justify="left", **kw)


def _cost_range(o) -> str:
    i = o.interval
    return "" if i is None else f"{usd(i.cost_low)}-{usd(i.cost_high)}"


def _print_sources(console, options, method: str) -> None:
    """Where each speed figure shown comes from, once per device and source, and the best option's range."""
    seen = {}
    for o in options:
        if o.interval is not None:
            seen.setdefault((o.execution.gpu, o.interval.speed_source), o.interval)
    for (gpu, source), i in seen.items():
        console.print(f"  {gpu} {method} speed: {source}, {i.error_text()}", markup=False, style="dim")
    spans = next((o for o in options if o.num_nodes > 1), None)
    if spans is not None:  # a speed over several nodes rests on scaling figures no run has measured yet
        for note in _scaling_notes(spans.offer.gpu_count, spans.num_nodes):
            console.print(f"  {note}", markup=False, style="dim")
    best = options[0] if options else None
    if best is not None and best.interval is not None:
        i = best.interval
        console.print(f"  option {best.rank}: {best.expected_hours:.3g} h ({i.hours_low:.3g} to {i.hours_high:.3g} h), "
                      f"{usd(best.expected_cost)} ({usd(i.cost_low)} to {usd(i.cost_high)})", markup=False)


def _print_options(console, plan, top: int) -> None:
    console.print(_headline(plan), markup=False)
    console.print(plan.catalog_snapshot, markup=False, style="dim")
    table = _table(padding=(0, 1, 0, 1))
    for col, justify in (("#", "right"), ("where", "left"), ("GPU", "left"), ("spot", "left"), ("$/h", "right"),
                         ("tokens/s", "right"), ("hours", "right"), ("cost", "right"), ("cost range", "right"),
                         ("GB/GPU", "right")):
        # Figures never wrap; a long place name folds instead.
        table.add_column(col, justify=justify, no_wrap=col != "where", overflow="fold",
                         min_width=14 if col == "where" else None)
    for o in plan.options[:top]:
        table.add_row(str(o.rank), f"{o.offer.provider} {region_label(o.offer.region)}", _gpu(o),
                      "spot" if o.spot else "", rate_exact(o.price_per_hour), f"{o.tokens_per_second:,.0f}",
                      hours(o.expected_hours), usd(o.expected_cost), _cost_range(o), f"{o.memory_gb_per_gpu:.1f}")
    console.print(table)
    _print_sources(console, plan.options[:top], plan.method)
    feasible = plan.assumptions.get("feasible_options", len(plan.options))
    if feasible > top:
        console.print(f"  ... {feasible - top:,} more feasible options (--top N shows more)")


def _print_managed(console, plan) -> None:
    from orchestrator.planner import break_even_tokens

    if not plan.managed:
        return
    best = plan.best
    setup = plan.assumptions.get("setup_hours", 0.0)
    console.print()
    console.print(f"managed fine-tuning APIs, same tokens (best GPU option: {usd(best.expected_cost)})", markup=False)
    table = _table()
    for col in ("service", "model tier", "$/M tokens", "cost", "vs GPU", "GPU cheaper above"):
        table.add_column(col, justify="right" if col in ("$/M tokens", "cost", "vs GPU") else "left", no_wrap=True)
    notes = []
    for q in plan.managed:
        ratio = float(q.cost) / float(best.expected_cost) if best.expected_cost else float("inf")
        tokens = break_even_tokens(best, q, plan.total_tokens, setup)
        above = "never (cheaper per token)" if tokens is None else count(tokens, " tokens")
        table.add_row(q.service, q.model, f"{q.price_per_million_tokens}", usd(q.cost), f"{ratio:,.1f}x", above)
        if q.note:
            notes.append(f"  {q.service} {q.model}: {q.note}")
    console.print(table)
    from rich.padding import Padding
    from rich.text import Text

    for note in dict.fromkeys(notes):
        console.print(Padding(Text(note.strip(), style="dim"), (0, 0, 0, 2)))


def _rejected_line(r) -> list[str]:
    o = r.offer
    cost = f"would cost {usd(r.expected_cost)}" if r.expected_cost is not None else ""
    return [f"  {_gpu(r)}", f"{o.provider} {region_label(o.region)}", "spot" if r.spot else "on-demand",
            cost, f"{r.reason.replace('_', ' ')}: {r.detail}"]


def _print_rejected(console, plan) -> None:
    if not plan.rejected:
        return
    counts = plan.assumptions.get("rejected_counts", {})
    summary = ", ".join(f"{n:,} {reason.replace('_', ' ')}" for reason, n in counts.items())
    console.print()
    console.print(f"[bold]cheapest rejected[/] ({summary}):")
    for r in plan.rejected[:SHOW_REJECTED]:
        console.print(phrases(_rejected_line(r), console.width - 2, indent="    "), markup=False, highlight=False)


def _print_assumptions(console, plan) -> None:
    dataset = plan.assumptions.get("dataset", {})
    held_out = dataset.get("validation_fraction") or 0
    console.print()
    if dataset.get("steps") is not None:
        # Read from the file: the recipe's own arithmetic, whose total its start event will report.
        parts = [f"tokens: {dataset.get('examples', 0):,} examples, {dataset.get('tokens_per_epoch', 0):,} tokens",
                 f"({dataset.get('counted')});", f"{dataset['train_tokens_per_epoch']:,} after holding out "
                 f"{held_out:g} for validation,", f"packed into {dataset['blocks_per_epoch']:,} blocks of {dataset['seq_len']:,};",
                 f"{dataset['steps']:,} steps x {dataset['global_batch']:,} blocks"
                 + (" (train.max_steps)" if dataset.get("capped_by_max_steps") else f" ({dataset.get('epochs', 0):g} epochs)"),
                 f"= {plan.total_tokens:,} tokens trained (padding excluded)"]
    else:
        parts = [f"tokens: {dataset.get('examples', 0):,} examples", f"{dataset.get('tokens_per_epoch', 0):,} tokens per epoch",
                 f"({dataset.get('counted')})", f"x {1 - held_out:g} (validation held out)" if held_out else "",
                 f"x {dataset.get('epochs', 0):g} epochs = {plan.total_tokens:,}",
                 "(capped by train.max_steps x batch.global x seq_len)" if dataset.get("capped_by_max_steps") else ""]
    console.print(phrases(parts, console.width, sep=" ", indent="  "), markup=False)
    calibration = plan.assumptions.get("calibration", {})
    from rich.padding import Padding
    from rich.text import Text

    console.print("speed and memory: calibrated on H100 anchors (orchestrator/estimate/calibration.yaml);", markup=False)
    for f in calibration.get("ledger_fit", {}).get("speed", ()):
        console.print(f"  {f['device']} {f['method']} speed x {f['factor']:.4g}: fitted to {f['runs']} run(s) in your "
                      f"ledger by `spotune calibrate`", markup=False)
    if calibration.get("throughput_scaling"):
        console.print(Padding(Text(str(calibration["throughput_scaling"])), (0, 0, 0, 2)))


def _explain(console, spec, plan) -> None:
    from orchestrator.estimate import load_calibration
    from orchestrator.estimate.memory import estimate_memory
    from orchestrator.architectures import resolve_architecture
    from orchestrator.quote import money

    best = plan.best
    world = best.execution.world_size
    mem = estimate_memory(resolve_architecture(spec.model), spec.method, seq_len=spec.seq_len, micro_batch=best.micro_batch,
                          gradient_checkpointing=best.gradient_checkpointing, gpu_count=world,
                          cal=load_calibration(), lora_r=spec.lora.r, target_modules=spec.lora.target_modules,
                          lora_dropout=spec.lora.dropout, dtype=best.execution.dtype)
    o = best.offer
    console.print(f"\n[bold]best option[/]: {_gpu(best)} {o.provider} {region_label(o.region)} "
                  f"({o.instance_type}), {'spot' if best.spot else 'on-demand'}")
    nodes = plan.assumptions.get("nodes")
    if nodes:
        console.print(f"nodes: {nodes['why']}", markup=False)
    gpus = f"{best.num_nodes} nodes x {o.gpu_count} = {world} GPUs" if best.num_nodes > 1 else f"{o.gpu_count} GPUs"
    shard = {"fsdp": f", model states sharded over {gpus} (FSDP)",
             "ddp": f", the whole model on each of {gpus} (DDP)"}.get(best.execution.sharding, "")
    console.print(phrases([f"memory per GPU: micro-batch {best.micro_batch} x {spec.seq_len} tokens",
                           f"gradient checkpointing {'on' if best.gradient_checkpointing else 'off'}",
                           f"gradient accumulation {best.grad_accum}",
                           f"{best.execution.attention}, {best.execution.dtype}{shard}"], console.width, sep=", "))
    for item, gib in mem.breakdown():
        if item.startswith("FSDP") and world == 1:
            continue
        console.print(f"  {item:<42} {gib:>9.2f} GB", markup=False)
    console.print(f"  {'total':<42} {mem.total_gib:>9.2f} GB  of {o.vram_gb_per_gpu:g} GB", markup=False)
    for note in _scaling_notes(o.gpu_count, best.num_nodes):
        console.print(f"speed: {note}", markup=False)
    console.print("cost:")
    for line in best.lines:
        console.print(f"  {line.item:<28} ${money(line.amount):>10,}   {line.formula}", markup=False)
    console.print(f"  {'expected total':<28} ${money(best.expected_cost):>10,}   "
                  f"{best.expected_hours:.3f} h x ${best.price_per_hour}/h", markup=False)


def spec_names(a: Path, b: Path) -> tuple[str, str]:
    """How the two specs are named in a diff: their file names, or, where those are the same, the
    shortest trailing paths that tell them apart (`v1/tiny-demo.yaml -> v2/tiny-demo.yaml`)."""
    pa, pb = Path(os.path.abspath(a)).parts, Path(os.path.abspath(b)).parts
    for n in range(1, max(len(pa), len(pb)) + 1):
        name_a, name_b = str(Path(*pa[-n:])), str(Path(*pb[-n:]))
        if name_a != name_b:
            return name_a, name_b
    return str(a), str(b)  # the same file twice


def diff_json(plan_a, plan_b, name_a: str, name_b: str) -> dict:
    """What B changes in the best option, exact: the `diff` member of `spotune plan A --diff B --json`."""
    from orchestrator.quote import money_json

    def side(plan, name):
        o = plan.best
        return {"spec": name, "job": plan.job, "provider": o.offer.provider, "region": o.offer.region,
                "gpu": o.offer.gpu, "gpu_count": o.offer.gpu_count, "num_nodes": o.num_nodes, "spot": o.spot,
                "expected_cost": money_json(o.expected_cost), "expected_hours": round(o.expected_hours, 6),
                "total_tokens": plan.total_tokens}

    a, b = plan_a.best, plan_b.best
    cost_pct = float((b.expected_cost - a.expected_cost) / a.expected_cost * 100) if a.expected_cost else None
    hours_pct = (b.expected_hours - a.expected_hours) / a.expected_hours * 100 if a.expected_hours else None
    return {"a": side(plan_a, name_a), "b": side(plan_b, name_b),
            "cost_change": money_json(b.expected_cost - a.expected_cost), "cost_change_percent": cost_pct,
            "hours_change": round(b.expected_hours - a.expected_hours, 6), "hours_change_percent": hours_pct}


def _print_diff(console, plan_a, plan_b, name_a: str, name_b: str) -> None:
    a, b = plan_a.best, plan_b.best
    console.print(f"[bold]diff[/] of the best option, {name_a} -> {name_b}:", highlight=False)
    for name, plan, o in ((name_a, plan_a, a), (name_b, plan_b, b)):
        console.print(phrases([f"  {name}: {_gpu(o)} {o.offer.provider} {'spot' if o.spot else 'on-demand'}",
                               f"{usd(o.expected_cost)}", f"{o.expected_hours:.2f} h", f"{plan.total_tokens:,} tokens"],
                              console.width, sep=", ", indent="    "), markup=False)
    # Percentages from the exact figures, not from the rounded cents shown.
    console.print(f"  cost {usd_signed(b.expected_cost - a.expected_cost)} ({percent_change(b.expected_cost, a.expected_cost)}), "
                  f"time {b.expected_hours - a.expected_hours:+.2f} h ({percent_change(b.expected_hours, a.expected_hours)})",
                  markup=False)


def plan_command(
    ctx: typer.Context,
    spec: Path = typer.Argument(..., help="Job spec YAML."),
    top: int = typer.Option(DEFAULT_TOP, "--top", min=1, help="How many ranked options to show."),
    as_json: bool = typer.Option(False, "--json", help="Print the whole plan as one JSON object (docs/json.md)."),
    explain: bool = typer.Option(False, "--explain", help="Memory breakdown and cost lines of the best option."),
    diff: Optional[Path] = typer.Option(None, "--diff", metavar="B.yaml",
                                        help="Another spec: print only what it changes in the best option's cost and time."),
    backend: Optional[str] = typer.Option(None, "--backend", "-b", help="Plan as `spotune launch --backend` will run it: "
                                          "local or ray (your own hardware at its hourly price), skypilot (the catalog, "
                                          "as without this option)."),
    price_per_hour: Optional[float] = typer.Option(None, "--price-per-hour", help="With --backend local or ray: what an "
                                                   "hour of the machine costs (default: spec local.price_per_hour)."),
) -> None:
    """Rank every GPU offer (spot and on-demand) by expected cost, beside managed fine-tuning APIs."""
    chosen_backend = None
    if backend is not None:
        from orchestrator.jobs import make_backend
        from orchestrator.settings import global_options

        chosen_backend = make_backend(backend, global_options(ctx).state_path())
    elif price_per_hour is not None:
        from contract.errors import UserError

        raise UserError("--price-per-hour applies with --backend local or ray (your own hardware at an hourly price)")
    from orchestrator.calibrate import fitted_calibration
    from orchestrator.settings import global_options

    cal = fitted_calibration(global_options(ctx).state_path())
    job_spec, plan = _load(spec, chosen_backend, price_per_hour, cal)
    other = _load(diff, chosen_backend, price_per_hour, cal)[1] if diff is not None else None
    names = spec_names(spec, diff) if diff is not None else None
    if as_json:
        out = plan.to_json()
        if backend is not None:
            out["backend"] = backend
        if other is not None:
            out["diff"] = diff_json(plan, other, *names)
        typer.echo(json.dumps(out))
        return
    from orchestrator.commands import make_console

    console = make_console()
    if other is not None:
        _print_diff(console, plan, other, *names)
        return
    _print_options(console, plan, top)
    _print_managed(console, plan)
    _print_rejected(console, plan)
    _print_assumptions(console, plan)
    if chosen_backend is not None:
        from rich.markup import escape

        from orchestrator.jobs import chosen_line

        console.print(f"\n[bold]spotune launch --backend {backend}[/] would run: {escape(chosen_line(plan, plan.best))}")
        if not explain:  # the lines --explain prints anyway; here they show what the one option is made of
            for line in plan.best.lines:
                console.print(f"  {line.item:<28} {usd_exact(line.amount):>12}   {line.formula}", markup=False)
    if explain:
        _explain(console, job_spec, plan)


def register(app: typer.Typer) -> None:
    app.command("plan")(plan_command)
