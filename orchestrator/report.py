"""The ledger report in the terminal: what every job cost against its estimate, and why (price,
throughput, preemption), as rich tables; one job's attempts timeline, checkpoints and variance
story. `spotune ledger` prints it, `spotune launch | resume | status JOB` end with one job's
entry. The figures, their totals and their JSON and CSV forms are in `report_data.py` (re-exported
here); the PNG is in `report_plot.py`, the HTML page in `report_html.py`.
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import TYPE_CHECKING, Optional

from orchestrator.format import per_hour, phrases, placement_label, usd, usd_exact, usd_signed
from orchestrator.report_checkpoints import checkpoint_table
from orchestrator.report_data import (CONTROLLER, CSV_COLUMNS, GROUPS, SPLIT, Entry, build_entries, shown_totals,
                                      to_csv_text, to_json, to_json_text, totals)

if TYPE_CHECKING:
    from orchestrator.ledger import Ledger

__all__ = ["CONTROLLER", "CSV_COLUMNS", "GROUPS", "SPLIT", "Entry", "build_entries", "totals", "to_json",
           "to_json_text", "to_csv_text", "render_all", "render_job", "print_job"]


def _execution_text(record) -> str:
    """micro-batch 4 x 8, checkpointing off, sdpa, bfloat16 (planned and ran, side by side)."""
    if record.micro_batch is None:
        return "-"
    return (f"micro-batch {record.micro_batch} x {record.grad_accum}, checkpointing "
            f"{'on' if record.gradient_checkpointing else 'off'}, {record.attention}, {record.dtype}")


def _table(title: Optional[str] = None, **kw):
    from rich import box
    from rich.table import Table

    return Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False,
                 collapse_padding=True, **kw)


def render_all(console, entries: list[Entry], report: dict) -> None:
    report = shown_totals(entries)  # the cents the rows show, summed: a total is the sum of its rows
    table = _table("Jobs: estimate vs actual, and the variance split")
    # Money never wraps or truncates. On a narrow terminal the status goes under the job id (which
    # folds if it must), so that every figure keeps its column.
    narrow = console.width < 100
    table.add_column("job", overflow="fold", min_width=14)
    if not narrow:
        table.add_column("status", no_wrap=True)
    with_controller = any(e.controller for e in entries)
    for col in ("estimate", "actual", "variance", "price", "thruput", "preempt", *(("ctrl",) if with_controller else ())):
        table.add_column(col, justify="right", no_wrap=True)
    for e in entries:
        j = e.cents()
        v = j["variance"]
        table.add_row(*((f"{e.job.id}\n  {e.job.status}",) if narrow else (e.job.id, e.job.status)),
                      usd(j["estimate"]["cost"]), usd(j["actual"]["cost"]),
                      usd_signed(v["total"]), usd_signed(v["price"]), usd_signed(v["throughput"]),
                      usd_signed(v["preemption"]), *((usd_signed(v[CONTROLLER]),) if with_controller else ()))
    v = report["variance"]
    table.add_section()
    table.add_row(f"total, {report['jobs']} job{'s' if report['jobs'] != 1 else ''}", *(() if narrow else ("",)),
                  usd(report["estimate"]),
                  usd(report["actual"]), usd_signed(v["total"]), usd_signed(v["price"]), usd_signed(v["throughput"]),
                  usd_signed(v["preemption"]), *((usd_signed(v[CONTROLLER]),) if with_controller else ()))
    console.print(table)
    for group in GROUPS:
        t = _table(f"By {group}")
        t.add_column(group)
        for col in ("jobs", "estimate", "actual", "variance"):
            t.add_column(col, justify="right")
        for row in report[f"by_{group}"]:
            t.add_row(str(row[group]), str(row["jobs"]), usd(row["estimate"]), usd(row["actual"]),
                      usd_signed(row["variance"]))
        console.print()
        console.print(t)
    console.print(phrases(["Estimates count where a job was planned to run;", "actual spend where each attempt ran."],
                          console.width, sep=" ", indent=""))


def _estimate_vs_actual(e: Entry):
    """The job's headline figures side by side: what was planned, what happened."""
    est, rec = e.job.estimate, e.rec
    table = _table("Estimate vs actual")
    for column in ("", "estimate", "actual"):
        table.add_column(column, justify="right" if column else "left", overflow="fold")
    table.add_row("where", placement_label(est, with_price=False),
                  ", ".join(sorted({placement_label(a, with_price=False) for a in e.attempts})) or "-")
    table.add_row("$/h", f"${est.price_per_hour:,.4f}",
                  ", ".join(sorted({f"${a.price_per_hour:,.4f}" for a in e.attempts})) or "-")
    table.add_row("tokens", f"{est.total_tokens:,}", f"{rec.tokens:,}" if rec.tokens is not None else "-")
    table.add_row("tokens/s", f"{est.tokens_per_second:,.0f}",
                  f"{rec.tokens_per_second:,.0f}" if rec.tokens_per_second is not None else "-")
    table.add_row("execution", _execution_text(est),
                  ", ".join(dict.fromkeys(_execution_text(a) for a in e.attempts if a.micro_batch is not None)) or "-")
    table.add_row("hours", f"{rec.estimate_hours:.4f}", f"{float(rec.actual_hours):.4f}")
    table.add_row("attempts / preemptions", "1", f"{len(rec.attempts)} / {rec.preemptions}")
    table.add_row("cost", usd(rec.estimate_cost), usd(rec.actual_cost) + (" so far" if rec.open else ""))
    return table


def _place_in_words(a) -> str:
    """An attempt or estimate's place in full words: aws/us-east-1 1xA10G on-demand."""
    return f"{a.provider}/{a.region} {a.gpu_count}x{a.gpu} {'spot' if a.spot else 'on-demand'}"


def _priced(snapshot: str) -> str:
    """Where the estimate's prices came from, as a phrase: a catalog's read dates, or this machine's rate."""
    return "priced at the hourly rate given for this machine" if snapshot == "local price" else snapshot


def _print_story(console, story: str) -> None:
    """The variance story, one clause a line (`+$0.40 price (...)`), a long clause wrapped under itself."""
    import re

    from rich.padding import Padding
    from rich.text import Text

    head, _, rest = story.partition(": ")
    console.print(Text(head + (":" if rest else "")))
    for clause in (re.split(r"(?<=\)), ", rest) if rest else []):
        console.print(Padding(Text(clause), (0, 0, 0, 2)))


def render_job(console, e: Entry) -> None:
    from rich.markup import escape

    job, est, rec = e.job, e.job.estimate, e.rec
    width = console.width
    console.print(phrases([f"[bold]{job.id}[/]  {job.status} on {job.backend}",
                           f"({escape(job.external_id)})" if job.external_id else ""], width, sep=" "), highlight=False)
    console.print(phrases([f"{escape(job.model)} {job.method}", f"spec sha256 {job.spec_hash[:12]}",
                           f"submitted {job.created_at:%Y-%m-%d %H:%M} UTC"], width, sep=", "), highlight=False)
    if job.failure_reason:
        console.print(f"reason: {escape(job.failure_reason)}", highlight=False)
    console.print(phrases([f"planned: {_place_in_words(est)} at {per_hour(est.price_per_hour)}",
                           f"{est.tokens_per_second:,.0f} tokens/s",
                           f"{est.hours:.3f} h compute + {est.preemption_overhead_hours:.3f} h preemption = {usd(rec.estimate_cost)}",
                           f"option {est.chosen_rank} of {len(est.plan.get('options', []))}, {escape(_priced(est.catalog_snapshot))}"],
                          width, sep=", "), highlight=False)
    if job.budget is not None or e.budget_changes:
        changes = [f"raised from {usd_exact(b.old_budget) if b.old_budget is not None else 'none'} "
                   f"at {usd(b.spent)} spent ({b.time:%Y-%m-%d %H:%M})" for b in e.budget_changes]
        console.print(phrases([f"budget: {usd_exact(job.budget) if job.budget is not None else 'none'}", *changes],
                              width, sep="; "), highlight=False)
    console.print()
    console.print(_estimate_vs_actual(e))
    console.print("[bold]Attempts[/] (UTC)" if e.attempts else "no attempts recorded yet")
    for a, c, cents in zip(e.attempts, rec.attempts, e.attempt_cents):
        end = "now" if a.ended_at is None else f"{a.ended_at:%H:%M:%S}"
        console.print(f"  {a.n}  {a.started_at:%Y-%m-%d %H:%M:%S} -> {end}  {_place_in_words(a)}", highlight=False)
        facts = [f"{float(c.hours):.3f} h at {per_hour(a.price_per_hour)}: {usd(cents)}", a.end_reason or "running"]
        if a.resumed_from_step is not None:
            facts.append(f"resumed from step {a.resumed_from_step}")
        if c.lost_hours:
            parts = [f"{float(h):.3f} h {name}" for name, h in (("restart", c.restart_hours), ("rework", c.rework_hours)) if h]
            facts.append(f"lost {float(c.lost_hours):.3f} h ({', '.join(parts)})")
        if a.tokens is not None:
            facts.append(f"{a.tokens:,} tokens")
        if a.detail:
            facts.append(escape(a.detail))
        console.print(phrases(facts, width - 5, sep="; ", indent="     ").replace("", "     ", 1), highlight=False)
        for deviation in e.deviations.get(a.n, []):
            console.print(f"     deviated from the plan ({escape(str(deviation['kind']))}): {escape(str(deviation['reason']))}",
                          highlight=False)
    for c in e.controller[-1:]:
        end = "now" if c.ended_at is None else f"{c.ended_at:%H:%M:%S}"
        where = f"{c.provider}/{c.region} {c.instance_type or ''}".rstrip()
        console.print(f"  controller  {c.started_at:%Y-%m-%d %H:%M:%S} -> {end}  {escape(where)}", highlight=False)
        facts = [f"{float(rec.controller_hours):.3f} h at {per_hour(c.price_per_hour)}: {usd(e.controller_cents)}",
                 "SkyPilot's jobs controller, not in the estimate", escape(c.detail or "")]
        console.print(phrases(facts, width - 5, sep="; ", indent="     ").replace("", "     ", 1), highlight=False)
    shares = [*e.attempt_cents, *([e.controller_cents] if e.controller else [])]
    if len(shares) > 1:
        console.print(f"     {' + '.join(usd(x) for x in shares)} = {usd(rec.actual_cost)}", highlight=False)
    if e.checkpoints:
        console.print()
        console.print(checkpoint_table(e.job, e.checkpoints))
    console.print()
    _print_story(console, rec.story())


def print_job(console, ledger: "Ledger", job_id: str, now: Optional[datetime] = None) -> None:
    """One job's entry, read from the ledger: what `spotune ledger JOB` shows."""
    job = ledger.get_job(job_id)
    render_job(console, build_entries(ledger, [job], now or datetime.now(timezone.utc))[0])
