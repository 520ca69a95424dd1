"""`spotune ledger --html FILE`, rendered in a real headless Chromium: the page runs without a single
console error, and every figure it shows is the one `spotune ledger --json` gives.

Chromium is Debian's `chromium` package (`.ci/run` installs it); where it is missing the test is
skipped and says so. (docs/ledger-report.png is this page for the README's first command, taken with
tests/chromium.py's `Page.screenshot`.)
"""
from __future__ import annotations

import json
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import pytest
from typer.testing import CliRunner

from chromium import Chromium, find_chromium
from ledger_factory import hand_example, make_option, make_plan, make_spec, observed, spec_yaml

from orchestrator.cli import app
from orchestrator.ledger import Ledger

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(find_chromium() is None,
                                reason="no Chromium here (Debian: apt-get install chromium; .ci/run installs it)")


def invoke(*args: str):
    result = CliRunner().invoke(app, list(args), catch_exceptions=False, env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture
def report(tmp_path):
    """Two jobs: one preempted once and finished (with a loss curve), one stopped over budget."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    with Ledger(url) as ledger:
        preempted = hand_example(ledger, tmp_path)
        plan = make_plan(make_option(price="1.00", hours=0.5, overhead=0.0, expected_cost="0.50"), job="capped")
        capped = ledger.create_job(make_spec("capped", budget=0.3), spec_yaml("capped"), "local", plan, 1)
        ledger.upsert_attempt(capped, observed(1, 0, 18, "over_budget", price="1.00"))
        ledger.set_status(capped, "over_budget", "over budget: spent $0.30")
    page = tmp_path / "report.html"
    invoke("--db", url, "ledger", "--html", str(page))
    data = json.loads(invoke("--db", url, "ledger", "--json").stdout)
    return page, data, preempted, capped


def cents(amount) -> Decimal:
    return Decimal(str(amount)).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)


def dollars(text: str) -> Decimal:
    """`+$1,234.50` -> Decimal('1234.50')"""
    return Decimal(text.replace("$", "").replace(",", ""))


def assert_shows_the_json_figures(row: dict, j: dict) -> None:
    """A table row agrees with the --json figures as the CLI shows them: estimate and actual rounded to
    the cent, the variance their difference, each part within a cent of its exact value and the parts
    adding up to the variance shown (a jobs controller, where there is one, is the fourth part)."""
    estimate, actual = cents(j["estimate"]["cost"]), cents(j["actual"]["cost"])
    assert (dollars(row["estimate"]), dollars(row["actual"])) == (estimate, actual)
    assert dollars(row["variance"]) == actual - estimate
    parts = [dollars(row[p]) for p in ("price", "throughput", "preemption")]
    exact = [Decimal(str(j["variance"][p])) for p in ("price", "throughput", "preemption")]
    assert all(abs(shown - e) < Decimal("0.01") for shown, e in zip(parts, exact)), (parts, exact)
    if not Decimal(str(j["variance"].get("controller") or 0)):
        assert sum(parts) == dollars(row["variance"])


def test_the_page_renders_without_errors_and_shows_the_json_figures(report):
    page_path, data, preempted, capped = report
    with Chromium() as browser:
        page = browser.open(page_path)
        assert page.errors == []
        rows = page.evaluate("""Array.from(document.querySelectorAll('#summary tr[data-job]')).map(r => {
            const o = {job: r.dataset.job};
            r.querySelectorAll('[data-field]').forEach(c => o[c.dataset.field] = c.textContent);
            return o; })""")
        jobs = {j["id"]: j for j in data["jobs"]}
        assert {r["job"] for r in rows} == {preempted, capped, "total"}
        for row in rows:
            if row["job"] == "total":
                continue
            assert row["status"] == jobs[row["job"]]["status"].replace("_", " ")
            assert_shows_the_json_figures(row, jobs[row["job"]])
        total = next(r for r in rows if r["job"] == "total")
        for key in ("estimate", "actual", "variance", "price", "throughput", "preemption"):
            assert dollars(total[key]) == sum(dollars(r[key]) for r in rows if r["job"] != "total"), key

        # Each job: the attempts on the timeline, with costs that add up to its actual cost; the
        # preemption marked; the net variance; the loss curve.
        for job_id, j in jobs.items():
            section = f"section[data-job='{job_id}']"
            labels = page.evaluate(f"Array.from(document.querySelectorAll(\"{section} [data-field=attempt-cost]\")).map(e => e.textContent)")
            assert [label.split(" · ")[0] for label in labels] == [a["end_reason"].replace("_", " ") for a in j["attempts"]]
            shown = [dollars(label.split(" · ")[1]) for label in labels]
            assert sum(shown) == cents(j["actual"]["cost"])
            assert all(abs(s - Decimal(str(a["cost"]))) < Decimal("0.01") for s, a in zip(shown, j["attempts"]))
            marked = page.evaluate(f"Array.from(document.querySelectorAll(\"{section} [data-preemption]\")).map(e => Number(e.dataset.preemption))")
            assert marked == [a["n"] for a in j["attempts"] if a["end_reason"] == "preempted"]
            net = page.evaluate(f"document.querySelector(\"{section} [data-field=variance-total]\").textContent")
            assert dollars(net) == cents(j["actual"]["cost"]) - cents(j["estimate"]["cost"])
        curves = page.evaluate(f"document.querySelectorAll(\"section[data-job='{preempted}'] [data-chart=loss] polyline\").length")
        assert curves == 2  # one line per attempt: the resumed attempt re-runs steps after the checkpoint


def test_the_page_is_one_self_contained_file(report):
    html = report[0].read_text()
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "") and "https://" not in html
    assert "<script src" not in html and "<link" not in html
