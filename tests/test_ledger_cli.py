"""`spotune ledger`: every job's estimate, actual and variance split, as tables, JSON, CSV and a plot."""
from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ledger_factory import hand_example, make_offer, make_option, make_plan, make_spec, observed, spec_yaml
from orchestrator.cli import app
from orchestrator.ledger import Ledger


@pytest.fixture
def seeded(ledger_url, tmp_path):
    """The hand-computed job from test_reconcile, plus a QLoRA job that came in under estimate."""
    with Ledger(ledger_url) as ledger:
        demo = hand_example(ledger, tmp_path, "demo")
        offer = make_offer("gcp", "europe-west4", "L4", spot_price="0.41783")
        plan = make_plan(make_option(offer=offer, price="0.41783", hours=3.0, overhead=0.25), job="cheap", method="qlora")
        cheap = ledger.create_job(make_spec("cheap", method="qlora"), spec_yaml("cheap", "qlora"), "skypilot", plan, 1)
        ledger.upsert_attempt(cheap, observed(1, 0, 150, "finished", price="0.41783", provider="gcp",
                                              region="europe-west4", gpu="L4"))
        ledger.set_status(demo, "succeeded")
        ledger.set_status(cheap, "succeeded")
    return ledger_url, demo, cheap


def spotune(*args: str):
    result = CliRunner().invoke(app, list(args), catch_exceptions=False, env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    return result.output


def test_json_is_one_object_with_every_job_split_and_totals(seeded):
    url, demo, cheap = seeded
    report = json.loads(spotune("--db", url, "ledger", "--json"))
    assert set(report) == {"ledger", "jobs", "totals"} and report["ledger"].startswith("ledger ")
    by_id = {j["id"]: j for j in report["jobs"]}
    d = by_id[demo]
    assert (d["name"], d["status"], d["backend"]) == ("demo", "succeeded", "local")
    assert d["estimate"].items() >= {"cost": "2.200000", "hours": 1.1, "tokens_per_second": 1000.0, "provider": "aws",
                                     "gpu": "A10G", "gpu_count": 1, "spot": True, "price_per_hour": "2.000000"}.items()
    assert d["actual"].items() >= {"cost": "3.200000", "hours": 1.4, "tokens": 69000, "tokens_per_second": 1027.0}.items()
    assert d["variance"].items() >= {"total": "1.000000", "price": "0.400000", "throughput": "0.400000",
                                     "preemption": "0.200000"}.items()
    assert d["story"].startswith("cost $3.20 vs $2.20 estimated (+45.5%): +$0.40 price")
    first, second = d["attempts"]
    assert first.items() >= {"n": 1, "provider": "aws", "region": "us-east-1", "gpu": "A10G", "gpu_count": 1, "spot": True,
                             "price_per_hour": "2.000000", "started_at": "2026-11-20T09:00:00Z",
                             "ended_at": "2026-11-20T09:36:00Z", "end_reason": "preempted", "resumed_from_step": None,
                             "tokens": 32000, "hours": 0.6, "cost": "1.200000"}.items()
    assert (second["resumed_from_step"], second["tokens"], Decimal(second["price_per_hour"])) == (27, 42000, Decimal("2.5"))
    # Money is exact in JSON: cheap ran 2.5 h x $0.41783 against 3.25 h x $0.41783 planned.
    c = by_id[cheap]
    assert (Decimal(c["estimate"]["cost"]), Decimal(c["actual"]["cost"]), Decimal(c["variance"]["total"])) == (
        Decimal("1.357948"), Decimal("1.044575"), Decimal("-0.313373"))
    parts = ("price", "throughput", "preemption", "controller")
    for job in (d, c):
        assert sum(Decimal(job["variance"][p]) for p in parts) == Decimal(job["variance"]["total"])
        assert sum(Decimal(a["cost"]) for a in job["attempts"]) == Decimal(job["actual"]["cost"])
    totals = report["totals"]
    assert (totals["jobs"], Decimal(totals["estimate"]), Decimal(totals["actual"])) == (
        2, Decimal("3.557948"), Decimal("4.244575"))
    assert Decimal(totals["variance"]["total"]) == Decimal("0.686627")
    assert {r["provider"]: Decimal(r["actual"]) for r in totals["by_provider"]} == {
        "aws": Decimal("3.2"), "gcp": Decimal("1.044575")}
    assert {r["method"]: (r["jobs"], Decimal(r["estimate"])) for r in totals["by_method"]} == {
        "lora": (1, Decimal("2.2")), "qlora": (1, Decimal("1.357948"))}
    assert {r["gpu"] for r in totals["by_gpu"]} == {"A10G", "L4"} and len(totals["by_month"]) == 1


def test_one_job_shows_its_timeline_checkpoints_and_variance_story(seeded):
    url, demo, _ = seeded
    out = spotune("--db", url, "ledger", demo[:-2])
    assert demo in out and "Attempts" in out and "Checkpoints" in out
    assert "preempted" in out and "step 27" in out and "us-west-2" in out
    assert "cost $3.20 vs $2.20 estimated (+45.5%): +$0.40 price" in " ".join(out.split())


def test_table_view_lists_jobs_and_totals_by_provider_gpu_method_month(seeded):
    url, demo, cheap = seeded
    out = spotune("--db", url, "ledger")
    for text in (demo, cheap, "By provider", "By gpu", "By method", "By month", "$3.20", "-$0.32", "total, 2 jobs"):
        assert text in out, text


def test_csv_has_one_row_per_job(seeded):
    url, demo, cheap = seeded
    rows = list(csv.DictReader(io.StringIO(spotune("--db", url, "ledger", "--csv"))))
    assert [r["id"] for r in rows] == [demo, cheap]
    # Exact decimals (micro-dollars), as in --json: 2.5 h x $0.41783 = $1.044575 vs 3.25 h planned = $1.357948
    assert (rows[0]["actual_cost"], rows[0]["preemption"], rows[1]["variance"]) == ("3.200000", "0.200000", "-0.313373")


def test_plot_writes_a_png(seeded, tmp_path):
    pytest.importorskip("matplotlib", reason="--plot needs the plot extra")
    url, _, _ = seeded
    png = tmp_path / "ledger.png"
    out = spotune("--db", url, "ledger", "--plot", str(png))
    assert f"plot written to {png}" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def run_cli(*args: str, cwd=None):
    # The installed entry point, as a user runs it.
    spotune_bin = Path(sys.executable).parent / "spotune"
    return subprocess.run([str(spotune_bin), *args], capture_output=True, text=True, cwd=cwd)


def test_unknown_job_and_conflicting_flags_are_one_line_errors(seeded):
    url, _, _ = seeded
    for args, message in ((("ledger", "nope"), "error: no job matching 'nope' in the ledger"),
                          (("ledger", "--json", "--csv"), "error: --json and --csv are alternatives; give one"),
                          (("ledger", "--plot", "/no/such/dir/x.png"), "error: cannot write plot: directory /no/such/dir")):
        result = run_cli("--db", url, *args)
        assert result.returncode == 2
        assert result.stderr.startswith(message) and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_reading_an_empty_state_dir_creates_nothing(tmp_path):
    state = tmp_path / "state"
    result = run_cli("--state-dir", str(state), "ledger", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["jobs"] == [] and not state.exists()
