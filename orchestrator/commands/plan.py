"""`spotune plan SPEC.yaml`: price the job on every GPU offer, spot and on-demand, and on managed APIs."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from orchestrator.format import hours, percent_change, usd, usd_signed

DEFAULT_TOP = 10
SHOW_REJECTED = 5


def _load(spec_path: Path):
    from orchestrator.catalog import load_managed_prices, load_offers
    from orchestrator.planner import make_plan
    from contract.spec import load_spec

    spec = load_spec(spec_path)
    return spec, make_plan(spec, load_offers(), load_managed_prices())


def _gpu(o) -> str:
    return f"{o.offer.gpu} x{o.offer.gpu_count}"


def _print_options(console, plan, top: int) -> None:
    from rich.table import Table

    table = Table(title=f"{plan.job}: {plan.model_name} ({plan.params / 1e9:.2f}B) {plan.method}, "
                        f"{plan.total_tokens:,} tokens · {plan.catalog_snapshot}", title_justify="left")
    for col, justify in (("#", "right"), ("provider", "left"), ("region", "left"), ("GPU x count", "left"),
                         ("spot", "center"), ("$/h", "right"), ("tokens/s", "right"), ("hours", "right"),
                         ("expected cost", "right"), ("memory/GPU", "right")):
        table.add_column(col, justify=justify, no_wrap=col not in ("region",))
    for o in plan.options[:top]:
        table.add_row(str(o.rank), o.offer.provider, o.offer.region, _gpu(o), "spot" if o.spot else "",
                      f"{o.price_per_hour}", f"{o.tokens_per_second:,.0f}", hours(o.expected_hours),
                      usd(o.expected_cost), f"{o.memory_gb_per_gpu:.1f} GB")
    console.print(table)
    feasible = plan.assumptions.get("feasible_options", len(plan.options))
    if feasible > top:
        console.print(f"  ... {feasible - top:,} more feasible options (--top N shows more)")


def _print_managed(console, plan) -> None:
    from rich.table import Table

    from orchestrator.planner import break_even_tokens

    if not plan.managed:
        return
    best = plan.best
    setup = plan.assumptions.get("setup_hours", 0.0)
    table = Table(title="managed fine-tuning APIs, same tokens", title_justify="left")
    for col in ("service", "model tier", "$/M tokens", "cost", f"vs best GPU ({usd(best.expected_cost)})", "note"):
        table.add_column(col, justify="right" if col in ("$/M tokens", "cost") else "left")
    for q in plan.managed:
        ratio = float(q.cost) / float(best.expected_cost) if best.expected_cost else float("inf")
        tokens = break_even_tokens(best, q, plan.total_tokens, setup)
        if tokens is None:
            versus = f"{ratio:.2f}x; cheaper per token at any size"
        else:
            versus = f"{ratio:.1f}x; GPU cheaper above {tokens / 1e6:,.2f}M tokens"
        table.add_row(q.service, q.model, f"{q.price_per_million_tokens}", usd(q.cost), versus, q.note)
    console.print(table)


def _print_rejected(console, plan) -> None:
    if not plan.rejected:
        return
    counts = plan.assumptions.get("rejected_counts", {})
    summary = ", ".join(f"{n:,} {reason}" for reason, n in counts.items())
    console.print(f"[bold]cheapest rejected[/] ({summary}):")
    for r in plan.rejected[:SHOW_REJECTED]:
        o = r.offer
        cost = f" {usd(r.expected_cost)}" if r.expected_cost is not None else ""
        console.print(f"  {o.gpu} x{o.gpu_count} {o.provider} {o.region} {'spot' if r.spot else 'on-demand'}{cost}: "
                      f"{r.reason}: {r.detail}", markup=False)


def _print_assumptions(console, plan) -> None:
    dataset = plan.assumptions.get("dataset", {})
    held_out = dataset.get("validation_fraction") or 0
    split = f" x {1 - held_out:g} (validation held out)" if held_out else ""
    console.print(f"tokens: {dataset.get('examples', 0):,} examples, {dataset.get('tokens_per_epoch', 0):,} tokens per "
                  f"epoch ({dataset.get('counted')}){split} x {dataset.get('epochs'):g} epochs = {plan.total_tokens:,}"
                  + (" (capped by train.max_steps x batch.global x seq_len)" if dataset.get("capped_by_max_steps") else ""),
                  markup=False)
    calibration = plan.assumptions.get("calibration", {})
    console.print(f"speed: {calibration.get('throughput_scaling', '')}; memory and speed calibrated on H100 "
                  f"anchors (orchestrator/estimate/calibration.yaml)", markup=False)


def _explain(console, spec, plan) -> None:
    from orchestrator.estimate import load_calibration
    from orchestrator.estimate.memory import estimate_memory
    from orchestrator.architectures import resolve_architecture
    from orchestrator.quote import money

    best = plan.best
    mem = estimate_memory(resolve_architecture(spec.model), spec.method, seq_len=spec.seq_len, micro_batch=best.micro_batch,
                          gradient_checkpointing=best.gradient_checkpointing, gpu_count=best.offer.gpu_count,
                          cal=load_calibration(), lora_r=spec.lora.r, target_modules=spec.lora.target_modules,
                          lora_dropout=spec.lora.dropout)
    o = best.offer
    console.print(f"\n[bold]best option[/]: {o.gpu} x{o.gpu_count} {o.provider} {o.region} ({o.instance_type}), "
                  f"{'spot' if best.spot else 'on-demand'}")
    shard = f", model states sharded over {o.gpu_count} GPUs" if o.gpu_count > 1 else ""
    console.print(f"memory per GPU: micro-batch {best.micro_batch} x {spec.seq_len} tokens, gradient checkpointing "
                  f"{'on' if best.gradient_checkpointing else 'off'}, gradient accumulation {best.grad_accum}{shard}")
    for item, gib in mem.breakdown():
        if item.startswith("FSDP") and o.gpu_count == 1:
            continue
        console.print(f"  {item:<42} {gib:>9.2f} GB", markup=False)
    console.print(f"  {'total':<42} {mem.total_gib:>9.2f} GB  of {o.vram_gb_per_gpu:g} GB", markup=False)
    console.print("cost:")
    for line in best.lines:
        console.print(f"  {line.item:<28} ${money(line.amount):>10,}   {line.formula}", markup=False)
    console.print(f"  {'expected total':<28} ${money(best.expected_cost):>10,}   "
                  f"{best.expected_hours:.3f} h x ${best.price_per_hour}/h", markup=False)


def _diff(console, plan_a, plan_b, name_a: str, name_b: str) -> None:
    from orchestrator.quote import money

    a, b = plan_a.best, plan_b.best
    d_cost = money(b.expected_cost) - money(a.expected_cost)
    d_hours = b.expected_hours - a.expected_hours
    console.print(f"\n[bold]diff[/] best option {name_a} -> {name_b}:")
    console.print(f"  {name_a}: {_gpu(a)} {a.offer.provider} {'spot' if a.spot else 'on-demand'}, "
                  f"{usd(a.expected_cost)}, {a.expected_hours:.2f} h, {plan_a.total_tokens:,} tokens", markup=False)
    console.print(f"  {name_b}: {_gpu(b)} {b.offer.provider} {'spot' if b.spot else 'on-demand'}, "
                  f"{usd(b.expected_cost)}, {b.expected_hours:.2f} h, {plan_b.total_tokens:,} tokens", markup=False)
    console.print(f"  cost {usd_signed(d_cost)} ({percent_change(b.expected_cost, a.expected_cost)}), "
                  f"time {d_hours:+.2f} h ({percent_change(b.expected_hours, a.expected_hours)})", markup=False)


def plan_command(
    spec: Path = typer.Argument(..., help="Job spec YAML."),
    top: int = typer.Option(DEFAULT_TOP, "--top", min=1, help="How many ranked options to show."),
    as_json: bool = typer.Option(False, "--json", help="Print the whole plan as one JSON object."),
    explain: bool = typer.Option(False, "--explain", help="Memory breakdown and cost lines of the best option."),
    diff: Optional[Path] = typer.Option(None, "--diff", help="Another spec: what it changes in the best option's cost and time."),
) -> None:
    """Rank every GPU offer (spot and on-demand) by expected cost, beside managed fine-tuning APIs."""
    job_spec, plan = _load(spec)
    if as_json:
        typer.echo(json.dumps(plan.to_json()))
        return
    from orchestrator.commands import make_console

    console = make_console()
    _print_options(console, plan, top)
    _print_managed(console, plan)
    _print_rejected(console, plan)
    _print_assumptions(console, plan)
    if explain:
        _explain(console, job_spec, plan)
    if diff is not None:
        _, other = _load(diff)
        _diff(console, plan, other, spec.name, diff.name)


def register(app: typer.Typer) -> None:
    app.command("plan")(plan_command)
